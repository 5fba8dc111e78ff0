"""The real SPIN trainer on the tiny model: iterations, persisted generations, learning, resume, FSDP2, bad rows."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from fabric_align import checkpoints, spin, trainer
from fabric_align.data import DataError
from fabric_align.errors import ConfigError, TrainingError

from conftest import (
    FAST,
    REPO,
    assert_no_unactionable_warnings,
    column,
    fabric_cli,
    load_safetensors,
    read_metrics,
    run_cli,
    run_script,
    write_jsonl,
)

SHORT = [*FAST, "--spin.max_new_tokens=16", "--spin.epochs_per_iteration=1", "--train.eval_interval=2"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default (`python fabric_align/spin.py`), with one beta per iteration."""
    out = tmp_path_factory.mktemp("spin") / "out"
    run_cli(spin.setup, ["--logger.backend=csv", "--spin.beta=[0.1,0.3]", f"--out_dir={out}"])
    return out


def test_default_run_completes_two_iterations(default_run: Path) -> None:
    for t in (0, 1):
        directory = default_run / f"iter-{t}"
        rows = [json.loads(line) for line in (directory / "generations.jsonl").read_text().splitlines()]
        assert {r["split"] for r in rows} == {"train", "val"}
        assert len([r for r in rows if r["split"] == "train"]) == 64
        assert all(r["generated_tokens"] > 0 and r["real"] and r["prompt"] for r in rows)
        assert all(isinstance(r["ref_logp_real"], float) and r["ref_logp_real"] < 0 for r in rows)
        assert json.loads((directory / "meta.json").read_text())["iteration"] == t
    data = torch.load(default_run / "iter-1" / "pairs.pt", weights_only=True)
    assert data["ref"]["train"]["real"].shape == (64,)
    # The readable file shows each answer as trained on, special tokens included, but for its closing end token
    # (an answer cut by max_new_tokens right after a role marker shows the marker).
    from fabric_align.args import ModelArgs
    from fabric_align.modeling import end_token_ids, load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArgs())
    ends = end_token_ids(load_model(ModelArgs(), dtype=torch.float32, seed=0), tokenizer)
    rows = [json.loads(line) for line in (default_run / "iter-1" / "generations.jsonl").read_text().splitlines()]
    for row, ids in zip(rows, data["generated"]["train"], strict=False):
        shown = ids[:-1] if ids[-1] in ends else ids
        assert row["generated"] == tokenizer.decode(shown) and row["generated_tokens"] == len(ids)
    special_not_end = set(tokenizer.all_special_ids) - set(ends)
    assert any(ids[-1] in special_not_end for ids in data["generated"]["train"])  # the case is there
    assert (default_run / "final" / "model.safetensors").is_file()

    rows = read_metrics(default_run)
    for name in (
        "loss",
        "rewards/real",
        "rewards/generated",
        "rewards/margins",
        "rewards/accuracy",
        "logps/real",
        "logps/generated",
        "generation/mean_length",
        "iteration",
        "beta",
        "lr",
        "grad_norm",
        "tokens_per_sec",
    ):
        assert column(rows, f"train/{name}"), name
    assert column(rows, "val/nll") and column(rows, "val/rewards/accuracy")
    assert column(rows, "iteration") == [0, 1] and len(column(rows, "generation/mean_length")) == 2
    # 64 pairs / 16 per step x 2 epochs = 8 steps per iteration, each with its own beta.
    steps, betas, iterations = (column(rows, f"train/{k}") for k in ("step", "beta", "iteration"))
    assert steps == list(range(1, 17))
    assert betas == [0.1] * 8 + [0.3] * 8 and iterations == [0] * 8 + [1] * 8


def test_nll_falls_over_iterations_and_pairs_are_learned(default_run: Path) -> None:
    rows = read_metrics(default_run)
    nll = {int(float(r["step"])): float(r["val/nll"]) for r in rows if r.get("val/nll")}
    assert nll[0] > nll[8] > nll[16]  # start, end of iteration 0, end of iteration 1
    accuracy = column(rows, "train/rewards/accuracy")
    assert max(accuracy[:8]) > 0.5 and max(accuracy[8:]) > 0.5  # within each iteration
    margins = column(rows, "train/rewards/margins")
    assert margins[7] > margins[0] and margins[15] > margins[8]


def test_resume_in_iteration_one_reuses_generations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*SHORT, "--train.save_interval=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(spin.setup, [*args, f"--out_dir={straight}"])

    real_save = checkpoints.torch.save

    def crash_at_step_6(obj: object, path: object, *a: object, **k: object) -> None:
        if ".tmp-step-000006" in str(path):
            raise RuntimeError("killed in iteration 1")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", crash_at_step_6)
    with pytest.raises(RuntimeError, match="killed in iteration 1"):
        run_cli(spin.setup, [*args, f"--out_dir={resumed}"])
    monkeypatch.undo()
    written = {t: (resumed / f"iter-{t}" / "pairs.pt").stat().st_mtime_ns for t in (0, 1)}

    def no_generation(*a: object, **k: object) -> None:
        raise AssertionError("generated again instead of reusing iter-*/")

    monkeypatch.setattr(spin, "rollout", no_generation)
    # Inside an iteration its stored answers are the SFT rows': other rows (one answer edited) are refused.
    rows = (REPO / "fabric_align" / "assets" / "sft_demo_train.jsonl").read_text().splitlines()
    edited = write_jsonl(tmp_path / "edited.jsonl", [json.dumps({"prompt": "Hi", "completion": "Hello!"}), *rows[1:]])
    changed = [f"--data.train_path={edited}", "--data.val_path=fabric-align/sft-demo-val"]
    hparams = (resumed / "logs" / "hparams.yaml").read_bytes()
    with monkeypatch.context() as patch:  # refused before any model loads, and before the logs are touched
        patch.setattr(spin, "build_policy", lambda *a: pytest.fail("loaded the model first"))
        with pytest.raises(TrainingError, match="its answers belong to other SFT data than this run's"):
            run_cli(spin.setup, [*args, *changed, f"--out_dir={resumed}", "--resume=auto"])
    assert (resumed / "logs" / "hparams.yaml").read_bytes() == hparams
    run_cli(spin.setup, [*args, f"--out_dir={resumed}", "--resume=auto"])  # from step 3, in iteration 0
    assert {t: (resumed / f"iter-{t}" / "pairs.pt").stat().st_mtime_ns for t in (0, 1)} == written
    a = load_safetensors(straight / "final" / "model.safetensors")
    b = load_safetensors(resumed / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert column(read_metrics(resumed), "train/step") == list(range(1, 9))


def test_bf16_mixed_reference_is_the_policys_own_forward(tmp_path: Path) -> None:
    """Under bf16-mixed the opponent decodes from a bf16 copy, but the reference log-probs come from the policy's own
    autocast forward: at the first step of each iteration, before any update, every reward is ~0. (Scored by a
    differently-rounded model, they were off by 1e-4 to 1e-3 here.)"""
    out = tmp_path / "out"
    run_cli(spin.setup, [*SHORT, "--precision=bf16-mixed", f"--out_dir={out}"])
    rows = read_metrics(out)
    iterations = column(rows, "train/iteration")
    first = [i for i, t in enumerate(iterations) if i == 0 or iterations[i - 1] != t]
    assert len(first) == 2
    rewards = [column(rows, f"train/rewards/{k}")[i] for k in ("real", "generated") for i in first]
    rewards += [column(rows, f"val/rewards/{k}")[0] for k in ("real", "generated")]  # at step 0
    assert max(abs(x) for x in rewards) < 5e-5, rewards
    margins = column(rows, "train/rewards/margins")
    assert margins[first[1] - 1] > 0.1  # and it still learns


@pytest.mark.slow
def test_fsdp2_two_processes_generate_and_train_like_one(tmp_path: Path) -> None:
    args = [*SHORT, "--train.save_interval=4", "--spin.rollout_batch_size=8"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run_cli(spin.setup, [*args, "--train.micro_batch_size=8", f"--out_dir={single}"])
    result = run_script(
        "spin.py",
        [*args, "--train.micro_batch_size=4", "--strategy=fsdp", f"--out_dir={fsdp}"],
        launcher=[*fabric_cli(), "--accelerator=cpu", "--devices=2"],
    )
    assert_no_unactionable_warnings(result.stdout + result.stderr)
    for t in (0, 1):
        a = [json.loads(x) for x in (single / f"iter-{t}" / "generations.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (fsdp / f"iter-{t}" / "generations.jsonl").read_text().splitlines()]
        assert [r["generated"] for r in a] == [r["generated"] for r in b]
        torch.testing.assert_close(
            torch.tensor([r["ref_logp_generated"] for r in a]),
            torch.tensor([r["ref_logp_generated"] for r in b]),
            rtol=1e-4,
            atol=1e-3,
        )
    rows_a, rows_b = read_metrics(single), read_metrics(fsdp)
    for key in ("train/loss", "train/rewards/margins", "val/nll"):
        torch.testing.assert_close(
            torch.tensor(column(rows_a, key)), torch.tensor(column(rows_b, key)), rtol=1e-4, atol=1e-4, msg=key
        )


def test_lora_spin_trains_the_adapter_and_keeps_the_base(tmp_path: Path) -> None:
    from fabric_align.args import ModelArgs
    from fabric_align.modeling import load_model

    out = tmp_path / "out"
    run_cli(spin.setup, [*SHORT, "--model.lora.r=4", "--train.lr=1e-2", "--train.save_interval=8", f"--out_dir={out}"])
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # Iteration 1's opponent is the adapted policy: its scores differ from iteration 0's (the base model).
    ref0 = torch.load(out / "iter-0" / "pairs.pt", weights_only=True)["ref"]["train"]["real"]
    ref1 = torch.load(out / "iter-1" / "pairs.pt", weights_only=True)["ref"]["train"]["real"]
    assert (ref1 - ref0).abs().max() > 1e-3
    nll = column(read_metrics(out), "val/nll")
    assert nll[-1] < nll[0]
    # Generating with the adapted policy never merged the adapter into the frozen base.
    state = torch.load(out / "step-000008" / "state", weights_only=True)["model"]
    base = load_model(ModelArgs(), dtype=torch.float32, seed=42).state_dict()
    for key, value in state.items():
        if "lora_" not in key:
            plain = key.removeprefix("model.base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, base[plain]), key


def test_mix_previous_trains_on_both_iterations(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli(spin.setup, [*SHORT, "--spin.mix_previous=true", "--train.save_interval=null", f"--out_dir={out}"])
    data = torch.load(out / "iter-1" / "pairs.pt", weights_only=True)
    assert len(data["generated"]["previous"]) == 64 and data["ref"]["previous"]["generated"].shape == (64,)
    # 4 steps in iteration 0, 8 in iteration 1 (twice the pairs).
    assert column(read_metrics(out), "train/iteration") == [0] * 4 + [1] * 8


GOOD = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(16)
]


def with_row(line: int, bad: object) -> list[object]:
    rows: list[object] = list(GOOD)
    rows[line - 1] = bad
    return rows


BAD = {
    "no assistant turn": (
        with_row(2, {"messages": [{"role": "user", "content": "q"}]}),
        2,
        "messages",
        "no assistant turn",
    ),
    "empty answer": (
        with_row(3, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        3,
        "messages[1].content",
        "empty",
    ),
    "unknown role": (
        with_row(4, {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        4,
        "messages[0].role",
        "unknown role",
    ),
    "nemo unknown role": (
        with_row(
            5, {"system": "", "conversations": [{"from": "Alien", "value": "q"}, {"from": "Assistant", "value": "a"}]}
        ),
        5,
        "conversations[0].from",
        "unknown role",
    ),
    "plain empty completion": (with_row(6, {"prompt": "q", "completion": ""}), 6, "completion", "empty"),
    "nothing usable": (with_row(7, {"text": "q"}), 7, "messages", "missing"),
    "only an answer": (with_row(8, {"messages": [{"role": "assistant", "content": "a"}]}), 8, "messages", "no prompt"),
    "nemo empty answer after a system prompt": (
        with_row(
            9, {"system": "s", "conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": ""}]}
        ),
        9,
        "conversations[1].value",  # the row's own index: the system prompt is not in that list
        "empty",
    ),
    "an undesirable KTO row": (
        with_row(11, {"prompt": "q", "completion": "a", "label": False}),
        11,
        "label",
        "marks the completion undesirable",
    ),
    "an undesirable KTO row, labelled in text": (
        with_row(11, {"prompt": "q", "completion": "a", "label": "rejected"}),
        11,
        "label",
        "marks the completion undesirable",
    ),
    "an undesirable KTO row from a CSV": (
        with_row(11, {"prompt": "q", "completion": "a", "label": "False"}),
        11,
        "label",
        "marks the completion undesirable",
    ),
    "two forms of the conversation in one row": (
        with_row(11, {"messages": [{"role": "user", "content": "q"}], "prompt": "q", "completion": "a"}),
        11,
        "completion",
        "the row gives both 'messages' and 'completion': keep one form",
    ),
    "a conversational completion that is not the answer": (
        with_row(12, {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}),
        12,
        "completion",
        "one assistant message",
    ),
    "messages not a list": (
        with_row(10, {"messages": "hello"}),
        10,
        "messages",
        "expected a list of messages, got str",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sft_rows(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, line, field, problem = BAD[case]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    with pytest.raises(DataError) as err:
        run_cli(
            spin.setup, [*SHORT, f"--data.train_path={path}", "--data.val_path=null", f"--out_dir={tmp_path / 'out'}"]
        )
    assert str(err.value).startswith(f"{path}, line {line}, field '{field}'"), str(err.value)
    assert problem in str(err.value)
    assert not (tmp_path / "out").exists()


def test_sft_forms_agree(tmp_path: Path) -> None:
    from fabric_align.args import ModelArgs
    from fabric_align.data import ChatRenderer
    from fabric_align.modeling import load_tokenizer

    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        {
            "system": "Be kind.",
            "conversations": [{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "Hello!"}],
        },
        {"prompt": "Hi", "completion": "Hello!"},
        {  # TRL's conversational prompt/completion, as KTO reads it
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello!"}],
        },
        {"prompt": "Hi", "completion": "Hello!", "label": True},  # a desirable KTO row is ground truth
    ]
    renderer = ChatRenderer(load_tokenizer(ModelArgs()))
    data = spin.load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", renderer, 64)
    assert data.prompts[0] == data.prompts[1] == data.prompts[3] and data.prompts[2] == data.prompts[4]
    assert data.answers[0] == data.answers[1] == data.answers[2] == data.answers[3] == data.answers[4]
    assert renderer.tokenizer.decode(data.answers[0]) == "Hello!</s>"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--spin.beta=[0.1]"], "spin.beta has 1 values for spin.iterations=2"),
        (["--spin.beta=0"], "spin.beta=0.0: must be positive"),
        (["--spin.top_p=0"], "top_p=0.0"),
        (["--spin.iterations=0"], "spin.iterations=0"),
        (["--spin.lr=[1e-3,2e-3,3e-3]"], "spin.lr has 3 values for spin.iterations=2"),
        (["--spin.lr=[1e-3,.nan]"], "spin.lr[1]=nan: must be a finite number"),
        (["--spin.epochs_per_iteration=[1]"], "spin.epochs_per_iteration has 1 values"),
        (["--spin.epochs_per_iteration=[1,0]"], "spin.epochs_per_iteration[1]=0"),
        (["--spin.lr=[1e-3,1e-5]", "--train.min_lr=1e-4"], "train.min_lr=0.0001: must be at most iteration 1's"),
        (["--train.warmup_ratio=1"], "train.warmup_ratio=1.0: must be in [0, 1)"),
        (["--train.epochs=2"], "train.epochs=2 is not used by SPIN: set spin.epochs_per_iteration"),
    ],
)
def test_bad_spin_flags(flags: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_cli(spin.setup, [*SHORT, *flags, f"--out_dir={tmp_path / 'out'}"])


def test_rows_that_carry_a_prompt_column_beside_their_messages_are_read() -> None:
    """ultrachat_200k and no_robots rows hold prompt, prompt_id and messages: the messages are the conversation."""
    from fabric_align.data import Row

    user, assistant = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    row = Row("ultrachat.jsonl", "line 1", {"prompt": "Hi?", "prompt_id": "x", "messages": [user, assistant]})
    parsed = spin.parse_row(row)
    assert (parsed.prompt, parsed.answer) == ([user], "Hello.")
    assert not spin.marks_undesirable(0) and spin.marks_undesirable(" Rejected ") and spin.marks_undesirable(False)


def test_min_lr_is_held_against_the_peaks_spin_lr_sets_not_train_lr() -> None:
    """spin.lr replaces train.lr as every iteration's peak: a floor above train.lr but below each peak is fine."""
    from fabric_align.args import KTOArgs, SPINArgs, TrainArgs

    train = TrainArgs(lr=2e-3, min_lr=0.01)
    train.check()
    SPINArgs(iterations=2, lr=[0.1, 0.05]).check_with(train)
    with pytest.raises(ConfigError, match=re.escape("train.min_lr=0.01: must be at most iteration 0's peak lr 0.002")):
        SPINArgs(iterations=2).check_with(train)
    with pytest.raises(ConfigError, match=re.escape("train.min_lr=0.01: must be in [0, 0.002]")):
        KTOArgs().check_with(train)


def test_incomplete_iteration_directory_is_not_reused(tmp_path: Path) -> None:
    """An iter-{t}/ without meta.json (a crash while saving generations) is regenerated and set aside, not lost."""
    out = tmp_path / "out"
    run_cli(spin.setup, [*SHORT, "--spin.iterations=1", "--train.save_interval=null", f"--out_dir={out}"])
    shutil.rmtree(out / "final")
    (out / "iter-0" / "meta.json").unlink()
    (out / "iter-0" / "note.txt").write_text("partial")
    run_cli(
        spin.setup, [*SHORT, "--spin.iterations=1", "--train.save_interval=null", f"--out_dir={out}", "--resume=auto"]
    )
    assert (out / "iter-0" / "meta.json").is_file()
    kept = list(out.glob(".incomplete-iter-0-*/note.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "partial"


def test_resume_at_an_iteration_end_logs_like_an_unbroken_run(tmp_path: Path) -> None:
    """Resumed from the checkpoint at iteration 0's last step, the log ends as the unbroken run's: iteration 0's
    end-of-iteration validation and iteration 1's generation metrics at that step appear once each."""
    args = [*SHORT, "--train.save_interval=4", "--train.eval_interval=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(spin.setup, [*args, f"--out_dir={straight}"])
    shutil.copytree(straight, resumed)
    for name in ("step-000008", "final"):
        shutil.rmtree(resumed / name)
    run_cli(spin.setup, [*args, f"--out_dir={resumed}", "--resume=auto"])
    rows_a, rows_b = read_metrics(straight), read_metrics(resumed)
    assert column(rows_b, "val/step") == column(rows_a, "val/step") == [0, 3, 4, 6, 8]
    torch.testing.assert_close(torch.tensor(column(rows_b, "val/nll")), torch.tensor(column(rows_a, "val/nll")))
    assert column(rows_b, "generation/mean_length") == column(rows_a, "generation/mean_length")
    assert len(column(rows_b, "generation/mean_length")) == 2
    assert column(rows_b, "train/step") == column(rows_a, "train/step") == list(range(1, 9))


def test_a_checkpoint_at_an_iteration_end_resumes_into_an_empty_out_dir(default_run: Path, tmp_path: Path) -> None:
    """The checkpoint at iteration 0's end is iteration 1's opponent: resumed into an out_dir without iter-0/ (whose
    end-of-iteration validation is then not repeated), it trains iteration 1 to the same weights."""
    out = tmp_path / "out"
    run_cli(
        spin.setup,
        ["--logger.backend=csv", "--spin.beta=[0.1,0.3]", f"--out_dir={out}", f"--resume={default_run}/step-000008"],
    )
    assert not (out / "iter-0").exists() and (out / "iter-1" / "meta.json").is_file()
    a = load_safetensors(default_run / "final" / "model.safetensors")
    b = load_safetensors(out / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert column(read_metrics(out), "train/step") == list(range(9, 17))
    # The last checkpoint resumed elsewhere: nothing is left to train, and the checkpoint the run writes records the
    # iterations as the one it came from does, so that a run with more iterations can resume from it.
    again = tmp_path / "again"
    run_cli(
        spin.setup,
        ["--logger.backend=csv", "--spin.beta=[0.1,0.3]", f"--out_dir={again}", f"--resume={out}/step-000016"],
    )
    for key in ("iterations", "iteration_ends"):
        assert checkpoints.read_meta(again / "step-000016")[key] == checkpoints.read_meta(out / "step-000016")[key]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # iteration 1 of 2 (steps 9-16): with one iteration the run ends at step 8
        (["--spin.iterations=1"], "the checkpoint is at step 12, past this run's last step (8, from spin.iterations"),
        # one epoch, then two: iterations of 4 and 8 steps, where the checkpoint's run had 8 and 8
        (
            ["--spin.epochs_per_iteration=[1,2]"],
            "before its step 12 the checkpoint's run ended iterations at steps [8], this run would at [4]",
        ),
    ],
)
def test_a_schedule_that_moves_the_checkpoints_iterations_is_refused(
    flags: list[str], message: str, default_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer iterations, epochs or examples than the checkpoint's run had: continuing would train on another plan, or
    export a model this configuration never trained as its final one. Refused before any model loads."""
    monkeypatch.setattr(spin, "build_policy", lambda *a: pytest.fail("loaded the model first"))
    args = ["--logger.backend=csv", f"--out_dir={tmp_path / 'out'}", f"--resume={default_run}/step-000012"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_cli(spin.setup, [*args, *flags])


def test_iteration_metrics_logged_again_at_a_resumed_start_replace_the_old(default_run: Path, tmp_path: Path) -> None:
    """Resumed at iteration 1's start with another beta, the log holds the beta iteration 1 trained with, once."""
    out = tmp_path / "out"
    shutil.copytree(default_run, out)
    for name in ("step-000012", "step-000016", "final"):
        shutil.rmtree(out / name)
    run_cli(spin.setup, ["--logger.backend=csv", "--spin.beta=[0.1,0.5]", f"--out_dir={out}", "--resume=auto"])
    rows = read_metrics(out)
    assert column(rows, "beta") == [0.1, 0.5] and column(rows, "iteration") == [0, 1]
    assert len(column(rows, "generation/mean_length")) == 2
    assert column(rows, "train/beta") == [0.1] * 8 + [0.5] * 8


# ------------------------------------------------------------------------------------------- as the authors ran it
def test_per_iteration_lr_epochs_linear_schedule_and_rmsprop(tmp_path: Path) -> None:
    """Each iteration warms up to its own peak (spin.lr), decays linearly to min_lr over its own steps
    (spin.epochs_per_iteration), with RMSprop."""
    out = tmp_path / "out"
    args = [
        *SHORT,
        "--spin.lr=[2e-3,1e-3]",
        "--spin.epochs_per_iteration=[1,2]",
        "--train.schedule=linear",
        "--train.warmup_ratio=0.25",
        "--train.optimizer=rmsprop",
        "--train.min_lr=1e-4",
        "--train.save_interval=null",
        f"--out_dir={out}",
    ]
    run_cli(spin.setup, args)
    rows = read_metrics(out)
    assert column(rows, "train/iteration") == [0] * 4 + [1] * 8  # 64 pairs / 16 per step x 1, then x 2

    def linear(peak: float, steps: int) -> list[float]:
        warmup = -(-steps // 4)  # ceil(0.25 x steps)
        up = [peak * (s + 1) / (warmup + 1) for s in range(warmup)]
        return up + [peak + (1e-4 - peak) * (s - warmup) / (steps - warmup) for s in range(warmup, steps)]

    expected = linear(2e-3, 4) + linear(1e-3, 8)
    torch.testing.assert_close(torch.tensor(column(rows, "train/lr")), torch.tensor(expected), rtol=1e-6, atol=0)


def test_max_steps_sets_each_iterations_steps(tmp_path: Path) -> None:
    """train.max_steps replaces each iteration's epochs (as in the authors' per-iteration runs); past one pass over
    the pairs (4 steps of 16 here) the next epoch's shuffle continues."""
    out = tmp_path / "out"
    run_cli(spin.setup, [*SHORT, "--train.max_steps=5", "--train.save_interval=null", f"--out_dir={out}"])
    rows = [row for row in read_metrics(out) if row.get("train/iteration") not in (None, "")]
    assert column(rows, "train/iteration") == [0] * 5 + [1] * 5
    assert column(rows, "train/epoch") == [1, 1, 1, 1, 2] * 2


def test_the_data_order_may_change_only_where_an_iteration_starts(tmp_path: Path) -> None:
    """With train.max_steps each iteration is that many steps whatever the batch: at an iteration's start the next
    one reads a new plan from its start, so the seed and global batch may change there, and not inside one."""
    out = tmp_path / "out"
    args = [*SHORT, "--train.max_steps=2", "--train.save_interval=1", f"--out_dir={out}"]
    run_cli(spin.setup, [*args, "--spin.iterations=1"])
    shutil.rmtree(out / "step-000002")  # as if stopped inside the iteration
    with pytest.raises(ConfigError, match="used train.global_batch_size=16, which decides the examples"):
        run_cli(spin.setup, [*args, "--spin.iterations=1", "--train.global_batch_size=8", "--resume=auto"])
    run_cli(spin.setup, [*args, "--spin.iterations=1", "--resume=auto"])  # back at step 2, the iteration's end
    shutil.rmtree(out / "final")
    run_cli(spin.setup, [*args, "--spin.iterations=2", "--train.global_batch_size=8", "--seed=3", "--resume=auto"])
    rows = [row for row in read_metrics(out) if row.get("train/iteration") not in (None, "")]
    assert column(rows, "train/iteration") == [0, 0, 1, 1]


def test_resume_is_bit_identical_with_rmsprop_and_a_linear_schedule(tmp_path: Path) -> None:
    args = [
        *SHORT,
        "--spin.lr=[2e-3,1e-3]",
        "--train.schedule=linear",
        "--train.warmup_ratio=0.25",
        "--train.optimizer=rmsprop",
        "--train.save_interval=3",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(spin.setup, [*args, f"--out_dir={straight}"])
    shutil.copytree(straight, resumed)
    for name in ("step-000006", "step-000008", "final"):
        shutil.rmtree(resumed / name)
    run_cli(spin.setup, [*args, f"--out_dir={resumed}", "--resume=auto"])  # from step 3, inside iteration 0
    a = load_safetensors(straight / "final" / "model.safetensors")
    b = load_safetensors(resumed / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert column(read_metrics(resumed), "train/lr") == column(read_metrics(straight), "train/lr")


def authors_rows(n: int, *, generated: bool = True) -> list[dict]:
    """Rows in the SPIN authors' form (UCLA-AGI/SPIN_iter0): `real` and `generated` message lists."""
    rows = []
    for i in range(n):
        user = {"role": "user", "content": f"question {i}?"}
        row = {"real": [user, {"role": "assistant", "content": f"the true answer {i}."}]}
        if generated:
            row["generated"] = [user, {"role": "assistant", "content": f"model guess {i}"}]
        rows.append(row)
    return rows


@pytest.mark.parametrize("reuse", [True, False])
def test_authors_rows_with_and_without_reusing_their_generations(
    reuse: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", authors_rows(16))
    calls: list[int] = []
    real_rollout = spin.rollout

    def counting_rollout(*args: object, **kwargs: object) -> list[list[int]]:
        calls.append(1)
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(spin, "rollout", counting_rollout)
    out = tmp_path / "out"
    run_cli(
        spin.setup,
        [
            *SHORT,
            f"--data.train_path={train}",
            f"--spin.reuse_generated={str(reuse).lower()}",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=4",
            "--train.save_interval=null",
            f"--out_dir={out}",
        ],
    )
    rows = [json.loads(line) for line in (out / "iter-0" / "generations.jsonl").read_text().splitlines()]
    assert [r["real"] for r in rows] == [f"the true answer {i}." for i in range(16)]
    assert all(f"question {i}?" in r["prompt"] for i, r in enumerate(rows))
    if reuse:
        assert [r["generated"] for r in rows] == [f"model guess {i}" for i in range(16)]
        assert len(calls) == 1  # iteration 1 generates; iteration 0 took the rows' own answers
    else:
        assert [r["generated"] for r in rows] != [f"model guess {i}" for i in range(16)]
        assert len(calls) == 2
    iter1 = [json.loads(line) for line in (out / "iter-1" / "generations.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in iter1] != [f"model guess {i}" for i in range(16)]


@pytest.mark.parametrize(
    ("rows", "line", "field", "problem"),
    [
        (authors_rows(3) + authors_rows(1, generated=False), 4, "generated", "missing: spin.reuse_generated"),
        (
            authors_rows(2)
            + [
                {
                    "real": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "generated": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "c"}],
                }
            ],
            3,
            "generated",
            "answers another prompt",
        ),
        ([{"real": [{"role": "user", "content": "a"}]}], 1, "real", "no assistant turn"),
        (
            authors_rows(1)
            + [
                {
                    "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "generated": "c",
                }
            ],
            2,
            "generated",
            "read only beside 'real'",
        ),
    ],
)
def test_bad_authors_rows(rows: list, line: int, field: str, problem: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError) as err:
        run_cli(
            spin.setup,
            [*SHORT, f"--data.train_path={path}", "--spin.reuse_generated=true", f"--out_dir={tmp_path / 'out'}"],
        )
    assert str(err.value).startswith(f"{path}, line {line}, field '{field}'"), str(err.value)
    assert problem in str(err.value)
    assert not (tmp_path / "out").exists()


def test_first_or_last_turn_and_what_max_length_cuts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fabric_align.args import ModelArgs
    from fabric_align.data import ChatRenderer
    from fabric_align.modeling import load_tokenizer

    conversation = [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer, a long one: " + "x" * 60},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": "Second answer."},
    ]
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"messages": conversation}, {"real": conversation}]))
    renderer = ChatRenderer(load_tokenizer(ModelArgs()))
    decode = renderer.tokenizer.decode
    last = spin.load_split(path, "train", renderer, 512)
    first = spin.load_split(path, "train", renderer, 512, answer_turn="first")
    assert [decode(a) for a in last.answers] == ["Second answer.</s>"] * 2
    assert [decode(a) for a in first.answers] == [f"First answer, a long one: {'x' * 60}</s>"] * 2
    assert "First answer" in decode(last.prompts[0]) and "Second question" in decode(last.prompts[0])
    assert "First answer" not in decode(first.prompts[0]) and "Second" not in decode(first.prompts[0])
    # With room for the first-turn prompt plus 20 tokens, the first-turn answers are cut, and the last-turn rows,
    # whose prompt holds the long first answer, are dropped (leaving none). Both are reported.
    length = len(first.prompts[0]) + 20
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        spin.load_split(path, "train", renderer, length, answer_turn="first")
        with pytest.raises(DataError, match="no usable rows"):
            spin.load_split(path, "train", renderer, length)
    first_report = f"max_length={length} (answer_turn=first) dropped 0 of 2 rows whose prompt alone does not fit"
    assert f"{first_report} and cut the completion of 2" in caplog.text
    assert f"max_length={length} (answer_turn=last) dropped 2 of 2 rows" in caplog.text


def test_the_opponents_answers_are_reported_and_a_collapse_to_empty_answers_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cut answers (no end token, unlike every real one) get a hint; a quarter or more empty answers, the sign that
    the last iteration taught the model to stop at once, a warning that names what to change."""
    printed: list[str] = []
    fabric = type("FabricStub", (), {"print": staticmethod(printed.append)})()
    split = spin.SFTData(source="rows.jsonl", prompts=[[5, 6]] * 8, answers=[[7, 8, 2]] * 8)
    args = spin.SPINArgs(max_new_tokens=4)
    play = spin.SelfPlay(fabric, None, None, args, {"train": split}, max_length=64, batch_size=4, seed=0)
    ends = [0, 2]
    healthy = [[9, 9, 2]] * 5 + [[9, 9, 9, 9]] * 3  # 3 of 8 cut: more than a quarter
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        play.report_answers(0, healthy, ends)
    assert printed[-1].startswith("iteration 0: the opponent's answers average 3.4 tokens, the real ones 3.0")
    assert "3 of 8 were cut at spin.max_new_tokens (no end token" in printed[-1] and "0 are empty" in printed[-1]
    assert caplog.text == ""
    # Answers that stopped where prompt and answer fill data.max_length are not cut by max_new_tokens.
    play.max_length = 5  # 3 answer tokens after the 2 of the prompt
    play.report_answers(0, [[9, 9, 9]] * 2 + [[9, 2]] * 6, ends)
    assert "0 of 8 were cut at spin.max_new_tokens, 0 are empty, 2 filled data.max_length" in printed[-1]
    play.max_length = 64
    collapsed = [[2]] * 2 + [[0]] + [[]] + [[9, 2]] * 4  # 4 of 8 empty, none cut
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        play.report_answers(1, collapsed, ends)
    assert "0 of 8 were cut at spin.max_new_tokens, 4 are empty" in printed[-1]
    assert "iteration 1: 4 of 8 generated answers are empty" in caplog.text and "lower train.lr" in caplog.text
    assert "raise spin.max_new_tokens" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        play.report_answers(0, collapsed, ends)  # before any training: not an overshoot
    assert "the model ends at once before any training" in caplog.text and "overshot" not in caplog.text
