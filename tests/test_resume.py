"""Checkpoints: a stopped and resumed run ends bit-identical to an uninterrupted one, and a checkpoint cut off
mid-write is never picked by resume=auto."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fabric_align import checkpoints, kto, loop, spin
from fabric_align.checkpoints import checkpoint_dirs, find_resume_path
from fabric_align.errors import ConfigError
from fabric_align.modeling import EMBEDDED_MODEL_DIR

from conftest import FAST, KTO_TEN_STEPS, column, load_safetensors, read_metrics, run_cli

ARGS = KTO_TEN_STEPS


class Crash(RuntimeError):
    pass


def test_stop_and_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(kto.setup, [*ARGS, f"--out_dir={straight}"])

    # The second run dies while writing its step-9 checkpoint: the model and optimizer shards are on disk, the
    # RNG files and meta.json are not.
    real_save = checkpoints.torch.save

    def crash_in_step_9(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if ".tmp-step-000009" in str(path):
            raise Crash("power cut")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", crash_in_step_9)
    with pytest.raises(Crash):
        run_cli(kto.setup, [*ARGS, f"--out_dir={resumed}"])
    monkeypatch.undo()
    assert (resumed / ".tmp-step-000009" / "state").exists()
    (resumed / "step-000008").mkdir()  # a stray, incomplete directory with a checkpoint's name
    # What other interrupted writes leave (the export, the reference cache), and a step that a publish set aside.
    for leftover in (".tmp-final", "cache/.tmp-kto-reference-0a1b", ".old-step-000006"):
        (resumed / leftover).mkdir()
        (resumed / leftover / "meta.json").write_text("{}")
    assert [s for s, _ in checkpoint_dirs(resumed)] == [3, 6]
    assert find_resume_path(resumed, "auto") == resumed / "step-000006"

    run_cli(kto.setup, [*ARGS, f"--out_dir={resumed}", "--resume=auto"])
    a = load_safetensors(straight / "final" / "model.safetensors")
    b = load_safetensors(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The resumed run's log has each step once, with the same losses as the uninterrupted run.
    rows_a, rows_b = read_metrics(straight), read_metrics(resumed)
    assert column(rows_b, "train/step") == list(range(1, 11))
    assert column(rows_a, "train/loss") == column(rows_b, "train/loss")
    assert [s for s, _ in checkpoint_dirs(resumed)] == [3, 6, 9, 10]
    # The resumed run removed the unfinished writes (before its own), and kept what may be a complete checkpoint.
    assert not [*resumed.glob(".tmp-*"), *resumed.glob("cache/.tmp-*")]
    assert (resumed / ".old-step-000006" / "meta.json").is_file()


def test_resume_from_an_explicit_path_and_the_final_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    short = [a for a in ARGS if not a.startswith("--train.max_steps")] + ["--train.max_steps=4"]
    run_cli(kto.setup, [*short, f"--out_dir={out}"])
    before = load_safetensors(out / "final" / "model.safetensors")
    validation = read_metrics(out)
    # A damaged reference cache is computed again (from the initial weights, as before), not a crash.
    (cache,) = (out / "cache").glob("kto-reference-*")
    cached = torch.load(cache / "logps.pt", weights_only=True)
    (cache / "logps.pt").write_bytes(b"not a tensor file")
    # Resuming a finished run trains no further step and re-exports the same weights.
    calls = []
    monkeypatch.setattr(loop, "lr_at", lambda *a: calls.append(a) or 1.0)
    run_cli(kto.setup, [*short, f"--out_dir={out}", f"--resume={out / 'step-000004'}"])
    assert calls == []
    after = load_safetensors(out / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.load(cache / "logps.pt", weights_only=True), cached)
    # Its final validation replaces the one at that step instead of adding a second row.
    assert column(read_metrics(out), "val/step") == column(validation, "val/step") == [0, 4]
    assert column(read_metrics(out), "val/loss") == column(validation, "val/loss")
    assert "differ from the checkpoint" not in caplog.text
    # Other data or objective settings than the checkpoint's are allowed, but said.
    run_cli(kto.setup, [*short, f"--out_dir={out}", "--resume=auto", "--kto.beta=0.3", "--train.eval_interval=2"])
    assert "differ from the checkpoint's run: kto.beta: 0.1 -> 0.3" in caplog.text
    assert "eval_interval" not in caplog.text
    # Other weights files (here the same random-init config, copied: the reference's identity) are said too.
    assert "inputs that changed" not in caplog.text
    copy = tmp_path / "tiny-copy"
    shutil.copytree(EMBEDDED_MODEL_DIR, copy)
    run_cli(kto.setup, [*short, f"--out_dir={out}", "--resume=auto", f"--model.name_or_path={copy}"])
    assert "inputs that changed since the checkpoint was written: the model's weight files (or the seed" in caplog.text
    # What decides which examples the remaining steps read may not change: the seed, the global batch, the data.
    for flag, expected in [
        ("--seed=7", "the checkpoint's run used seed=42, which decides the examples"),
        ("--train.global_batch_size=4", "used train.global_batch_size=8, which decides"),
        ("--data.max_length=48", "is not the training data the checkpoint's run was on"),
        # nor stop before the checkpoint: its weights would be exported as what 2 steps trained
        ("--train.max_steps=2", r"the checkpoint is at step 4, past this run's last step \(2, from train.max_steps"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            run_cli(kto.setup, [*short, f"--out_dir={out}", "--resume=auto", flag])
    # Other tokens of the same rows (here more of each completion cut; a chat template that writes today's date, or
    # another tokenizer version, does the same) leave the examples where they were: allowed, and said.
    run_cli(kto.setup, [*short, f"--out_dir={out}", "--resume=auto", "--data.max_length=80"])
    assert "data.max_length: 96 -> 80" in caplog.text
    # Nor may the other method resume it.
    with pytest.raises(ConfigError, match="the checkpoint was written by kto, not spin"):
        run_cli(spin.setup, [*FAST, f"--out_dir={out}", "--resume=auto"])
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run_cli(kto.setup, [*short, f"--out_dir={out}", f"--resume={out / 'logs'}"])
    step = out / "step-000004"
    with pytest.raises(ConfigError, match=f"meta.json: a file; pass the checkpoint's directory, resume={step}$"):
        run_cli(kto.setup, [*short, f"--out_dir={out}", f"--resume={step / 'meta.json'}"])


def test_a_checkpoint_resumed_into_another_out_dir_starts_a_new_log(tmp_path: Path) -> None:
    """Another out_dir may hold the logs of a run that died before its first checkpoint: the resumed run moves them
    aside and logs anew, so their validation neither stands for its own nor is continued (README: a new CSV)."""
    out, other = tmp_path / "out", tmp_path / "other"
    short = [a for a in ARGS if not a.startswith("--train.max_steps")] + ["--train.max_steps=4"]
    run_cli(kto.setup, [*short, f"--out_dir={out}"])
    (other / "logs").mkdir(parents=True)
    (other / "logs" / "metrics.csv").write_text("step,val/loss,val/step\n4,nan,4\n")
    run_cli(kto.setup, [*short, f"--out_dir={other}", f"--resume={out / 'step-000004'}"])
    assert (other / "logs-earlier-1" / "metrics.csv").read_text() == "step,val/loss,val/step\n4,nan,4\n"
    assert column(read_metrics(other), "val/loss") == column(read_metrics(out), "val/loss")[-1:]
    assert (other / "final" / "model.safetensors").is_file()
