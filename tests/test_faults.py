"""Faults and bad input: a run ends correct, or stops with one ``error:`` line and exit status 1, never trains
garbage, never runs code from a file, and never loses what is already in out_dir.

Runs go through ``cli.run_program`` (the program's own entry, in this process) so the error line and the exit
status are what a user sees; resumed runs are compared byte for byte with uninterrupted ones.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fabric_align import checkpoints, cli, kto, loop, spin, trainer
from fabric_align.checkpoints import checkpoint_dirs, seal, verify_directory
from fabric_align.metrics import reduce_metrics
from fabric_align.modeling import EMBEDDED_MODEL_DIR

from conftest import FAST, KTO_TEN_STEPS, column, load_safetensors, read_metrics, write_jsonl

KTO_ARGS = KTO_TEN_STEPS
SPIN_ARGS = [
    *FAST,
    "--spin.max_new_tokens=16",
    "--spin.epochs_per_iteration=1",
    "--train.eval_interval=2",
    "--train.save_interval=2",
]


@dataclass
class Result:
    code: int
    out: str
    err: str


def program(setup: object, args: list[str], capsys: pytest.CaptureFixture[str]) -> Result:
    """Run as the installed program does: its exit status, stdout and stderr."""
    try:
        cli.run_program(setup, args)  # type: ignore[arg-type]
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_ok(result: Result) -> None:
    assert result.code == 0, result.err[-3000:]


def assert_one_line_error(result: Result, *expected: str) -> str:
    """Exit status 1, no traceback, and one ``error:`` line holding every expected fragment."""
    assert result.code == 1, result.err[-3000:]
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.err[-3000:]
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(out / "final" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An out_dir holding an intact checkpoint and a cache, and a model loader that must never be reached."""
    out = tmp_path / "out"
    (out / "step-000004").mkdir(parents=True)
    (out / "step-000004" / "state").write_bytes(b"weights")
    seal(out / "step-000004", {"step": 4})
    (out / "cache").mkdir()
    (out / "cache" / "kto-reference-x.pt").write_bytes(b"keep me")
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("a model was loaded despite bad input"))
    return out


@pytest.fixture(scope="module")
def kto_straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted KTO run: checkpoints at steps 3, 6, 9 and 10."""
    out = tmp_path_factory.mktemp("straight") / "out"
    cli.run_cli(kto.setup, [*KTO_ARGS, f"--out_dir={out}"])
    return out


# ----------------------------------------------------------------------------------------- flags and environment
KTO_FLAGS = {
    "kto.beta nan": (["--kto.beta=.nan"], "kto.beta=nan: must be a finite number"),
    "kto.beta inf": (["--kto.beta=.inf"], "kto.beta=inf: must be a finite number"),
    "kto.beta 0 in float32": (["--kto.beta=1e-46"], "kto.beta=1e-46: must be positive in float32 too"),
    "desirable weight nan": (["--kto.desirable_weight=.nan"], "kto.desirable_weight=nan"),
    "undesirable weight negative": (["--kto.undesirable_weight=-1"], "kto.undesirable_weight=-1.0: must be positive"),
    "max_norm nan": (["--train.max_norm=.nan"], "train.max_norm=nan"),
    "lr nan": (["--train.lr=.nan"], "train.lr=nan"),
    "lr inf in float32": (["--train.lr=1e39"], "train.lr=1e+39: must be a finite number in float32"),
    "min_lr above lr": (["--train.lr=1e-4", "--train.min_lr=1e-3"], "train.min_lr=0.001: must be in [0, 0.0001]"),
    "adam beta above 1": (["--train.betas=[1.5,0.9]"], "train.betas[0]=1.5: must be in [0, 1)"),
    "adam beta nan": (["--train.betas=[0.9,.nan]"], "train.betas[1]=nan"),
    "weight decay negative": (["--train.weight_decay=-1"], "train.weight_decay=-1.0: must be non-negative"),
    "skips negative": (["--train.max_consecutive_skips=-1"], "train.max_consecutive_skips=-1"),
    "seed negative": (["--seed=-1"], "seed=-1: must be in [0, 2**32)"),
    "seed too large": (["--seed=4294967296"], "seed=4294967296"),
    "devices not a number": (["--devices=abc"], "devices='abc': expected a count"),
    "num_nodes zero": (["--num_nodes=0"], "num_nodes=0"),
    "lora rank zero": (["--model.lora.r=0"], "model.lora.r=0: must be at least 1"),
    "lora dropout one": (["--model.lora.dropout=1.0"], "model.lora.dropout=1.0: must be in [0, 1)"),
    "lora on the lm_head": (["--model.lora.target_modules=[lm_head]"], "must not include the lm_head"),
    "keep_softmax_mib negative": (["--model.keep_softmax_mib=-1"], "model.keep_softmax_mib=-1: must be non-negative"),
    "4bit on a config-only model": (
        ["--model.quantize=4bit", "--model.lora.r=4"],
        "model.quantize=4bit needs pretrained weights",
    ),
    "4bit without lora": (["--model.quantize=4bit"], "set model.lora too"),
    "4bit merge": (
        ["--model.quantize=4bit", "--model.lora.r=4", "--model.lora.merge_on_export=true"],
        "merge_on_export needs an unquantized base",
    ),
    "max_length one": (["--data.max_length=1"], "data.max_length=1: must be at least 2"),
    # What the parser itself rejects (a type, a name, a file) is one line too, exit status 1.
    "beta infinite": (["--kto.beta=inf"], "kto.beta: Expected a float, got inf (see --help)"),
    "unknown flag": (["--kto.betta=0.2"], "unrecognized arguments: --kto.betta=0.2"),
    "loss type unknown": (["--kto.loss_type=dpo"], "kto.loss_type: Expected one of ['kto', 'apo_zero_unpaired']"),
    "betas not a pair": (["--train.betas=[0.9]"], "train.betas: Expected a tuple with 2 elements"),
    "config file missing": (["--config=/no/such/recipe.yaml"], "config: File does not exist"),
    # What only the model's module tree tells, found on the meta device before any weight is read.
    "lora target that is not a module": (
        ["--model.lora.r=4", "--model.lora.target_modules=[qkv_proj]"],
        "model.lora.target_modules: ['qkv_proj'] name no module of fabric-align/tiny-llama (its linear layers: ",
    ),
    "lora target name as a string": (
        ["--model.lora.r=4", "--model.lora.target_modules=q_proj,qkv_proj"],
        "model.lora.target_modules: ['qkv_proj'] name no module of fabric-align/tiny-llama",
    ),
    "lora target pattern that matches nothing": (
        ["--model.lora.r=4", r"--model.lora.target_modules=.*\.attn\.qkv"],
        r"model.lora.target_modules: ['.*\\.attn\\.qkv'] name no module",
    ),
    "lora target that is not a pattern": (
        ["--model.lora.r=4", "--model.lora.target_modules=(q_proj"],
        "model.lora.target_modules='(q_proj': not a regular expression",
    ),
    "attention implementation unknown": (["--model.attn_implementation=bogus"], "cannot build the model"),
    "max_length past the model's positions": (
        ["--data.max_length=1025"],
        "data.max_length=1025 exceeds fabric-align/tiny-llama's max_position_embeddings=1024",
    ),
}


@pytest.mark.parametrize("case", sorted(KTO_FLAGS))
def test_kto_flags(case: str, earlier_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags, message = KTO_FLAGS[case]
    before = snapshot(earlier_run)
    assert_one_line_error(
        program(kto.setup, [*FAST, *flags, f"--out_dir={earlier_run}", "--resume=auto"], capsys), message
    )
    assert snapshot(earlier_run) == before


SPIN_FLAGS = {
    "beta nan": (["--spin.beta=.nan"], "spin.beta=nan: must be a finite number"),
    "one beta of the list nan": (["--spin.beta=[0.1,.nan]"], "spin.beta[1]=nan"),
    "temperature nan": (["--spin.temperature=.nan"], "spin.temperature=nan"),
    "temperature negative": (["--spin.temperature=-0.5"], "spin.temperature=-0.5: must be non-negative"),
    "top_p nan": (["--spin.top_p=.nan"], "spin.top_p=nan"),
    "top_p above one": (["--spin.top_p=1.5"], "spin.top_p=1.5: must be in (0, 1]"),
    "logged samples negative": (["--spin.num_logged_samples=-1"], "spin.num_logged_samples=-1"),
}


@pytest.mark.parametrize("case", sorted(SPIN_FLAGS))
def test_spin_flags(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags, message = SPIN_FLAGS[case]
    assert_one_line_error(program(spin.setup, [*SPIN_ARGS, *flags, f"--out_dir={tmp_path / 'out'}"], capsys), message)
    assert not (tmp_path / "out").exists()


def test_environment_failures_are_one_line(
    tmp_path: Path, earlier_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = [
        ([f"--out_dir={a_file}"], f"out_dir={a_file} is a file"),
        ([f"--out_dir={a_file / 'sub'}"], f"cannot be created: {a_file} is a file"),
        # /proc refuses new files even to root (a read-only place that permission bits cannot fake).
        (["--out_dir=/proc/fabric-align-out"], "out_dir=/proc/fabric-align-out: cannot write in /proc"),
        ([f"--out_dir={earlier_run}", f"--resume={tmp_path / 'nowhere'}"], "no such checkpoint directory"),
        ([f"--out_dir={earlier_run}", f"--resume={a_file}"], "not a complete checkpoint directory"),
        (["--model.name_or_path=/no/such/model"], "model.name_or_path=/no/such/model: no such directory"),
        ([f"--model.name_or_path={a_file}"], "a file, not a model directory"),
    ]
    for flags, message in cases:
        default_out = [] if any(f.startswith("--out_dir") for f in flags) else [f"--out_dir={tmp_path / 'o'}"]
        assert_one_line_error(program(kto.setup, [*FAST, *default_out, *flags], capsys), message)
    bad_yaml = tmp_path / "recipe.yaml"
    for text in ("train:\n  lr: [1e-3\n", "- 1\n- 2\n"):  # not YAML; YAML but not a mapping of flags
        bad_yaml.write_text(text)
        assert_one_line_error(
            program(kto.setup, [*FAST, f"--config={bad_yaml}", f"--out_dir={tmp_path / 'o'}"], capsys),
            f"--config {bad_yaml}: ",
        )
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the case is a CPU run
    assert_one_line_error(
        program(kto.setup, [*FAST, f"--out_dir={tmp_path / 'o'}"], capsys),
        "FABRIC_ALIGN_KERNELS=triton on a CPU needs TRITON_INTERPRET=1",
    )
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "cuda")
    assert_one_line_error(
        program(kto.setup, [*FAST, f"--out_dir={tmp_path / 'o'}"], capsys),
        "FABRIC_ALIGN_KERNELS='cuda': expected 'triton', 'torch' or unset",
    )
    monkeypatch.delenv("FABRIC_ALIGN_KERNELS")
    # A hub id that cannot be fetched (in offline mode, so the test does not wait for the hub's retries).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    flags = ["--model.name_or_path=no-such-org/no-such-model", f"--out_dir={tmp_path / 'o'}"]
    assert_one_line_error(
        program(kto.setup, [*FAST, *flags], capsys),
        "model.name_or_path=no-such-org/no-such-model: could not load its tokenizer from the Hugging Face hub",
    )


def test_an_unreachable_hub_is_offline_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the hub cannot be reached, a hub id is read from the local cache only: a missing one fails at once,
    instead of after huggingface_hub's half a minute of retries."""
    import datasets.config
    import huggingface_hub.constants

    from fabric_align import hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, as the two above
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    hub.hub_reachable.cache_clear()
    try:
        result = program(
            kto.setup, [*FAST, "--data.train_path=no-such-org/no-such-data", f"--out_dir={tmp_path}"], capsys
        )
    finally:
        hub.hub_reachable.cache_clear()
    assert_one_line_error(result, "no-such-org/no-such-data: not a local file and could not be loaded")
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert "OfflineModeIsEnabled" in result.err  # no request made, so no retries


def test_disk_full_during_a_save(
    tmp_path: Path, kto_straight: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk at step 6's save: one error line naming the file, the step-3 checkpoint intact, no partial
    directory left; the run then resumes and ends byte-identical to the uninterrupted one."""
    out = tmp_path / "out"
    real_save = checkpoints.torch.save

    def no_space(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if ".tmp-step-000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", no_space)
    # Named by the checkpoint being written (a library may write through a temporary file elsewhere).
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}"], capsys)
    assert_one_line_error(result, f"{out / 'step-000006'}: could not write the checkpoint (No space left on device)")
    monkeypatch.undo()
    assert [s for s, _ in checkpoint_dirs(out)] == [3]
    assert verify_directory(out / "step-000003") is None
    assert not list(out.glob(".tmp-*"))
    assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert_same_weights(weights(kto_straight), weights(out))


# ------------------------------------------------------------------------------------------------------- data
def kto_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(n)]


def test_undecodable_bytes_name_the_line(tmp_path: Path, earlier_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = "".join(json.dumps(r) + "\n" for r in kto_rows())
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(good.encode() + '{"prompt": "caf\xe9", "completion": "x", "label": true}\n'.encode("latin-1"))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cases = ((latin1, "line 17, field '<bytes>': not UTF-8 text (byte 0xe9 at column 16)"), (binary, "line 1"))
    for path, where in cases:
        flags = [f"--data.train_path={path}", "--data.val_path=null", f"--out_dir={earlier_run}", "--resume=auto"]
        assert_one_line_error(program(kto.setup, [*FAST, *flags], capsys), f"{path}, {where}")
    # The validation file and SFT data are read the same way.
    train = write_jsonl(tmp_path / "train.jsonl", kto_rows())
    flags = [f"--data.train_path={train}", f"--data.val_path={latin1}", f"--out_dir={earlier_run}", "--resume=auto"]
    assert_one_line_error(program(kto.setup, [*FAST, *flags], capsys), f"{latin1}, line 17, field '<bytes>'")
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(b'{"prompt": "q", "completion": "r\xe9ponse"}\n')
    flags = [f"--data.train_path={sft}", "--data.val_path=null", f"--out_dir={tmp_path / 'spin'}"]
    assert_one_line_error(program(spin.setup, [*SPIN_ARGS, *flags], capsys), f"{sft}, line 1, field '<bytes>'")


def test_deep_nesting_lone_surrogates_and_roles(
    tmp_path: Path, earlier_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    chat = [{"role": "user", "content": "q"}]
    cases = {
        "deep line": (kto_rows()[:2] + [deep], "line 3, field '<json>': nested too deeply"),
        "deep value": (kto_rows()[:4] + ['{"prompt": ' + deep + "}"], "line 5, field '<json>': nested too deeply"),
        "lone surrogate": (
            kto_rows()[:5] + ['{"prompt": "bad \\ud800 text", "completion": "y", "label": true}'],
            "line 6, field 'prompt': holds a lone surrogate (U+D800 at character 4)",
        ),
        "lone surrogate in a message": (
            kto_rows()[:1]
            + ['{"prompt": [{"role": "user", "content": "\\udfff"}], "completion": "y", "label": false}'],
            "line 2, field 'prompt[0].content': holds a lone surrogate",
        ),
        "completion as a user message": (
            kto_rows()[:7] + [{"prompt": chat, "completion": [{"role": "user", "content": "y"}], "label": True}],
            "line 8, field 'completion[0].role': is 'user': a completion is the assistant's answer",
        ),
    }
    for name, (rows, message) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows + kto_rows())
        flags = [f"--data.train_path={path}", "--data.val_path=null", f"--out_dir={earlier_run}", "--resume=auto"]
        assert_one_line_error(program(kto.setup, [*FAST, *flags], capsys), f"{path}, {message}")
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" + deep + "]")
    flags = [f"--data.train_path={deep_json}", "--data.val_path=null", f"--out_dir={earlier_run}", "--resume=auto"]
    assert_one_line_error(program(kto.setup, [*FAST, *flags], capsys), f"{deep_json}, line 1, field '<json>'")


# ----------------------------------------------------------------------------------------------- non-finite steps
class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def poison_steps(monkeypatch: pytest.MonkeyPatch, steps: set[int], accum: int, kind: str) -> None:
    """Make the KTO loss (``kind="loss"``) or only its gradient (``"grad"``) NaN at the given optimizer steps
    (1-based), counting the training micro-batches (the ones that need a gradient)."""
    real_loss = kto.kto_loss
    calls = []

    def loss(token_logps: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, dict]:
        if token_logps.requires_grad:
            calls.append(1)
            if (len(calls) - 1) // accum + 1 in steps:
                if kind == "grad":
                    token_logps = NaNGradient.apply(token_logps)
                else:
                    token_logps = token_logps * float("nan")
        return real_loss(token_logps, *args, **kwargs)

    monkeypatch.setattr(kto, "kto_loss", loss)


def test_a_second_run_into_a_busy_out_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another process's run holds out_dir (say, a relaunch while the old run's workers live on): refused in one
    line before any model loads, nothing of it touched; its end, even a kill, frees out_dir."""
    out = tmp_path / "out"
    for unfinished in (".tmp-step-000006", "cache/.tmp-kto-reference-0a1b", ".old-step-000003"):  # a dead run's
        (out / unfinished).mkdir(parents=True)
        (out / unfinished / "meta.json").write_text("{}")
    hold = "import sys, time; from pathlib import Path; from fabric_align.checkpoints import claim_out_dir as c\n"
    hold += "assert c(Path(sys.argv[1])) is None; print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = program(kto.setup, [*FAST, f"--out_dir={out}"], capsys)
        assert_one_line_error(result, f"out_dir={out} is in use by another run (process {holder.pid} on ")
        assert "model:" not in result.out  # stopped before loading it
        # Not even the holder's writes in progress (which look like a dead run's leftovers).
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".old-step-000003", ".tmp-step-000006", "cache"]
        assert (out / "cache" / ".tmp-kto-reference-0a1b" / "meta.json").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert checkpoints.claim_out_dir(out) is None
    checkpoints.release_out_dirs()


def test_a_warmup_as_long_as_training_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Legal, yet likely a mistake (a warmup set for another data size): the peak learning rate is never reached."""
    args = [*FAST, "--train.global_batch_size=8", "--train.max_steps=2", "--train.warmup_steps=5", "--train.lr=3e-3"]
    cli.run_cli(kto.setup, [*args, "--train.save_interval=null", f"--out_dir={tmp_path / 'out'}"])
    assert (
        "the warmup (5 steps) spans all 2 steps of training: the learning rate ends at 0.001, short of" in caplog.text
    )
    assert column(read_metrics(tmp_path / "out"), "train/lr") == pytest.approx([3e-3 / 6, 3e-3 * 2 / 6])


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_and_counted(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    poison_steps(monkeypatch, {4, 5}, accum=2, kind=kind)
    args = [a for a in KTO_ARGS if not a.startswith("--train.save_interval")] + ["--train.save_interval=1"]
    cli.run_cli(kto.setup, [*args, f"--out_dir={out}"])
    rows = read_metrics(out)
    assert column(rows, "train/skipped_steps") == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    what = "loss=nan, grad_norm=nan" if kind == "loss" else "grad_norm=nan"
    assert f"step 4: not finite ({what}): update skipped (1 in a row, 1 in all)" in caplog.text
    assert "step 5:" in caplog.text and "step 6:" not in caplog.text
    # Skipped steps leave the model and the optimizer state exactly as they were; the others train.
    states = {s: torch.load(out / f"step-{s:06d}" / "state", weights_only=True) for s in (3, 4, 5, 6)}
    for key, value in states[3]["model"].items():
        assert torch.equal(states[4]["model"][key], value) and torch.equal(states[5]["model"][key], value), key
    assert not all(torch.equal(states[6]["model"][k], v) for k, v in states[3]["model"].items())
    assert states[5]["optimizer"]["state"][0]["step"] == states[3]["optimizer"]["state"][0]["step"] == 3
    assert all(math.isfinite(float(v.abs().max())) for v in weights(out).values())


def test_too_many_non_finite_steps_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    poison_steps(monkeypatch, set(range(5, 11)), accum=2, kind="loss")
    result = program(kto.setup, [*KTO_ARGS, "--train.max_consecutive_skips=2", f"--out_dir={out}"], capsys)
    expected = "step 7: not finite (loss=nan, grad_norm=nan) for 3 steps in a row (train.max_consecutive_skips=2)"
    assert_one_line_error(result, expected, f"the last checkpoint is {out / 'step-000006'}")
    assert not (out / "final").exists()
    assert [s for s, _ in checkpoint_dirs(out)] == [3, 6]  # step 6 saved the unchanged weights of step 4
    assert all(verify_directory(path) is None for _, path in checkpoint_dirs(out))
    assert column(read_metrics(out), "train/skipped_steps")[-1] == 3  # the step that stopped the run is logged


def test_final_is_never_written_with_non_finite_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An update that overflows (as bf16 weights can) from finite gradients: the weights are never saved or
    exported."""
    real_step = torch.optim.AdamW.step
    calls = []

    def overflowing_step(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    args = [a for a in KTO_ARGS if not a.startswith("--train.max_steps")] + ["--train.max_steps=2"]
    result = program(kto.setup, [*args, "--train.save_interval=null", f"--out_dir={tmp_path / 'a'}"], capsys)
    assert_one_line_error(result, "not exporting final/: parameters are not finite (model.model.embed_tokens.weight)")
    assert not (tmp_path / "a" / "final").exists()
    calls.clear()
    result = program(kto.setup, [*args, "--train.save_interval=2", f"--out_dir={tmp_path / 'b'}"], capsys)
    assert_one_line_error(result, "step 2: not saving a checkpoint: parameters are not finite")
    assert not checkpoint_dirs(tmp_path / "b")


def test_diverged_weights_are_not_exported_though_finite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An update of lr 1e20 leaves finite but huge weights (the next step is skipped): the held-out loss is NaN, and
    final/ is refused rather than exported from garbage."""
    args = [a for a in KTO_ARGS if not a.startswith(("--train.max_steps", "--train.lr", "--train.warmup"))]
    args += ["--train.max_steps=2", "--train.lr=1e20", "--train.warmup_steps=0", "--train.max_norm=null"]
    result = program(kto.setup, [*args, "--train.save_interval=2", f"--out_dir={tmp_path / 'a'}"], capsys)
    refusal = "the validation loss at step 2 is nan (the weights diverged): not exporting final/"
    assert_one_line_error(result, refusal)
    assert not (tmp_path / "a" / "final").exists() and (tmp_path / "a" / "step-000002" / "meta.json").is_file()
    # Resumed at that last step, the run has nothing left to train: the validation logged there still decides.
    result = program(
        kto.setup, [*args, "--train.save_interval=2", f"--out_dir={tmp_path / 'a'}", "--resume=auto"], capsys
    )
    assert_one_line_error(result, refusal)
    assert not (tmp_path / "a" / "final").exists()


def test_weights_that_are_not_finite_are_refused_as_they_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabric_align.args import ModelArgs
    from fabric_align.modeling import load_model, load_tokenizer

    model = load_model(ModelArgs(), dtype=torch.float32, seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    load_tokenizer(ModelArgs()).save_pretrained(tmp_path / "nan-model")
    args = [*KTO_ARGS, f"--model.name_or_path={tmp_path / 'nan-model'}", "--model.lora.r=4"]  # a frozen base too
    result = program(kto.setup, [*args, f"--out_dir={tmp_path / 'out'}"], capsys)
    assert_one_line_error(result, "its weights are not finite (model.layers.0.mlp.down_proj.weight)")


def test_resuming_under_another_optimizer_or_lora_layout_is_refused_before_loading(
    earlier_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seal(earlier_run / "step-000004", {"step": 4, "config": {"train": {"optimizer": "adamw"}, "model": {"lora": None}}})
    before = snapshot(earlier_run)
    for flags, message in (
        (["--train.optimizer=rmsprop"], "trained with train.optimizer='adamw', which 'rmsprop' cannot continue"),
        (["--model.lora.r=4"], "trained with model.lora (r, target_modules)=None, which (4, 'all-linear') cannot"),
    ):
        result = program(kto.setup, [*FAST, *flags, f"--out_dir={earlier_run}", "--resume=auto"], capsys)
        assert_one_line_error(result, message)
    assert snapshot(earlier_run) == before


def test_ctrl_c_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert_one_line_error(program(interrupted, [], capsys), "interrupted; --resume auto continues")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["kto.py", "spin.py"])
def test_ctrl_c_while_the_program_starts_is_one_line(script: str, tmp_path: Path) -> None:
    """Interrupted during its imports (seconds of torch, transformers and lightning), where Python would print the
    interrupted import's traceback, or abort inside an extension; and interrupted once it runs."""
    import signal
    import time

    from conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for when, expected in (("importing", "interrupted before the run started"), ("running", "interrupted; --resume")):
        command = [sys.executable, str(REPO / "fabric_align" / script), "--logger.backend=csv", f"--out_dir={when}"]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env
        )
        if when == "importing":
            time.sleep(1.0)
        else:  # its first line of output comes once the model is loaded
            assert process.stdout is not None and process.stdout.readline()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], err[-3000:]


def test_generation_refuses_non_finite_logits(tmp_path: Path) -> None:
    from fabric_align.args import ModelArgs
    from fabric_align.errors import TrainingError
    from fabric_align.generation import generate
    from fabric_align.modeling import load_model

    model = load_model(ModelArgs(), dtype=torch.float32, seed=0)
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    with pytest.raises(TrainingError, match="logits are not finite at answer position 0"):
        generate(
            model, [[1, 2, 3]], [7], eos_id=257, pad_id=258, max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=1
        )


# ------------------------------------------------------------------------------------------------- safe loads
class Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a payload and rewrite the directory's manifest, as someone able to write to out_dir
    could: the checksum passes, only the loader stands in the way."""
    torch.save(Payload(marker), path)
    meta = json.loads((path.parent / "meta.json").read_text())
    meta.pop("files")
    (path.parent / "meta.json").unlink()
    seal(path.parent, meta)


def reseal(directory: Path) -> None:
    """Rewrite a directory's manifest to match its files as they are now."""
    meta = json.loads((directory / "meta.json").read_text())
    meta.pop("files")
    (directory / "meta.json").unlink()
    seal(directory, meta)


@pytest.mark.parametrize(
    ("planted", "expected"),
    [
        ("rng-rank0.pt", ["rng-rank0.pt: refused to load"]),  # an RNG file
        ("state", ["step-000010/state: refused to load", "Unsupported global"]),  # the training state
    ],
)
def test_a_crafted_checkpoint_file_is_never_unpickled(
    planted: str, expected: list[str], tmp_path: Path, kto_straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, marker = tmp_path / "out", tmp_path / "pwned"
    shutil.copytree(kto_straight, out)
    plant(out / "step-000010" / planted, marker)
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys)
    assert_one_line_error(result, *expected)
    assert not marker.exists()


def test_a_crafted_fsdp_shard_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sharded (FSDP2) checkpoint's tensor file: torch.distributed.checkpoint gathers each rank's failure into one
    exception, which still ends as one line, and nothing runs."""
    out, marker = tmp_path / "out", tmp_path / "pwned"
    args = [*FAST, "--train.global_batch_size=8", "--train.max_steps=2", "--strategy=fsdp", f"--out_dir={out}"]
    assert_ok(program(kto.setup, args, capsys))
    shutil.rmtree(out / "final")
    step = out / "step-000002"
    (shard,) = (step / "state").glob("*.distcp")
    # A pickle where the reader seeks for its first tensor (offset 0), the file's size kept.
    payload = pickle.dumps(Payload(marker), protocol=2)
    shard.write_bytes(payload + bytes(max(0, shard.stat().st_size - len(payload))))
    reseal(step)
    result = program(kto.setup, [*args, "--resume=auto"], capsys)
    assert_one_line_error(result, "step-000002/state: refused to load")
    assert not marker.exists()


def test_a_checkpoint_of_another_architecture_is_named_so(
    tmp_path: Path, kto_straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, other = tmp_path / "out", tmp_path / "wider"
    shutil.copytree(kto_straight, out)
    shutil.rmtree(out / "final")
    shutil.copytree(EMBEDDED_MODEL_DIR, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    args = [*KTO_ARGS, f"--out_dir={out}", "--resume=auto", f"--model.name_or_path={other}"]
    result = program(kto.setup, args, capsys)
    shapes = f"its model has intermediate_size={config['intermediate_size']}, model.name_or_path={other} has"
    assert_one_line_error(result, "step-000010: " + shapes)
    assert "reference log-probs" not in result.out + result.err  # said before any model loads
    # A checkpoint that did not record its shapes: the state's own mismatch, named as such.
    meta = json.loads((out / "step-000010" / "meta.json").read_text())
    del meta["architecture"]
    (out / "step-000010" / "meta.json").write_text(json.dumps(meta))
    result = program(kto.setup, args, capsys)
    assert_one_line_error(result, "step-000010/state: does not fit this model (size mismatch for", "model.name_or_path")


def test_damaged_files_behind_a_rewritten_manifest_are_one_line_or_recomputed(
    tmp_path: Path, kto_straight: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Truncated files whose manifest was rewritten to match them: the reference cache is recomputed (it only ever
    holds what the run can recompute), a checkpoint's state is a one-line error."""
    out = tmp_path / "out"
    shutil.copytree(kto_straight, out)
    shutil.rmtree(out / "final")
    (cache,) = (out / "cache").glob("kto-reference-*")
    truncate(cache / "logps.pt")
    reseal(cache)
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert "unusable" in caplog.text and "computing the reference log-probs again" in caplog.text
    assert_same_weights(weights(kto_straight), weights(out))
    shutil.rmtree(out / "final")
    truncate(out / "step-000010" / "rng-rank0.pt")  # a torch.save zip cut in its middle reads as OSError(EINVAL)
    reseal(out / "step-000010")
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys)
    assert_one_line_error(result, "step-000010/rng-rank0.pt: unreadable")
    truncate(out / "step-000010" / "state")
    reseal(out / "step-000010")
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys)
    assert_one_line_error(result, "step-000010/state: unreadable")


def test_a_reference_cache_made_for_other_settings_is_recomputed(
    tmp_path: Path, kto_straight: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache's directory name is its key; its meta.json records the key too, so a directory renamed or copied in
    from another run (other weights, data or precision) is recomputed rather than trusted."""
    out = tmp_path / "out"
    shutil.copytree(kto_straight, out)
    shutil.rmtree(out / "final")
    (cache,) = (out / "cache").glob("kto-reference-*")
    meta = json.loads((cache / "meta.json").read_text())
    assert cache.name == f"kto-reference-{meta['key']}"
    (cache / "meta.json").write_text(json.dumps({**meta, "key": "0" * len(meta["key"])}))  # as from another run
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert "names other weights, data or settings" in caplog.text
    assert json.loads((cache / "meta.json").read_text())["key"] == meta["key"]  # replaced by what this run computed
    assert_same_weights(weights(kto_straight), weights(out))


def test_a_crafted_spin_iteration_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, marker = tmp_path / "out", tmp_path / "pwned"
    args = [*SPIN_ARGS, "--spin.iterations=1", "--train.save_interval=null"]
    assert_ok(program(spin.setup, [*args, f"--out_dir={out}"], capsys))
    shutil.rmtree(out / "final")
    plant(out / "iter-0" / "pairs.pt", marker)
    assert_one_line_error(program(spin.setup, [*args, f"--out_dir={out}", "--resume=auto"], capsys), "refused to load")
    assert not marker.exists()


def test_distributed_checkpoint_index_passes_the_allow_list_and_code_does_not(tmp_path: Path) -> None:
    """The pickled index of a torch.distributed.checkpoint save is read through an allow-list first."""
    import torch.distributed.checkpoint as dcp

    from fabric_align.errors import TrainingError

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    state = {"model": model.state_dict(), "step": 7, "extra": {"lr": 0.1, "name": "x"}}
    dcp.save(state, checkpoint_id=tmp_path / "dcp", no_dist=True)
    (index,) = (tmp_path / "dcp").glob("*.metadata")
    checkpoints.check_pickle_allowlist(index)  # genuine: passes
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.metadata"
    bad.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(TrainingError, match="refused to load"):
        checkpoints.check_pickle_allowlist(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ verified checkpoints
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(50):
        data[(i * 7919) % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncate, "emptied": empty, "missing": Path.unlink, "bit-flipped": flip}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back(
    damage: str,
    tmp_path: Path,
    kto_straight: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    shutil.copytree(kto_straight, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "step-000010")
    DAMAGE[damage](out / "step-000009" / "state")
    # Explicitly named: one line naming the file, nothing touched.
    before = snapshot(out)
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", f"--resume={out / 'step-000009'}"], capsys)
    assert_one_line_error(result, "damaged checkpoint", str(out / "step-000009" / "state"))
    assert snapshot(out) == before
    # auto: warns naming the file, resumes from step 6, ends byte-identical to the uninterrupted run.
    assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert "step-000009 is damaged" in caplog.text and str(out / "step-000009" / "state") in caplog.text
    assert_same_weights(weights(kto_straight), weights(out))
    assert column(read_metrics(out), "train/loss") == column(read_metrics(kto_straight), "train/loss")


def test_a_rolled_back_run_that_stops_resumes_itself_not_the_branch_it_left(
    tmp_path: Path, kto_straight: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resumed from step 3 of a finished run, the run leaves the branch that went on (steps 6, 9, 10, final/, the log
    after step 3). Stopped at step 7, `resume=auto` must continue it from its own step 6, not the old step 9: the
    weights and the log then equal an uninterrupted run's, with no step missing."""
    out = tmp_path / "out"
    shutil.copytree(kto_straight, out)
    flip(out / "step-000010" / "state")  # damaged too: set aside like the rest, so the run's end writes it anew
    real_save = loop.save_checkpoint

    def stop_after_step_6(fabric: object, out_dir: Path, state: dict, meta: dict) -> Path:
        path = real_save(fabric, out_dir, state, meta)
        if state["step"] == 6:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", stop_after_step_6)
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", f"--resume={out / 'step-000003'}"], capsys)
    assert_one_line_error(result, "interrupted")
    names = sorted(p.name for p in out.iterdir() if "step-" in p.name or "final" in p.name)
    assert names == [  # the branch it left stays whole until the run ends
        ".rolled-back-final",
        ".rolled-back-step-000006",
        ".rolled-back-step-000009",
        ".rolled-back-step-000010",
        "step-000003",
        "step-000006",
    ]
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert_same_weights(weights(kto_straight), weights(out))
    straight, resumed = read_metrics(kto_straight), read_metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert column(resumed, "train/loss") == column(straight, "train/loss")
    assert not list(out.glob(".rolled-back-*"))  # each written again by the run, which has ended
    assert verify_directory(out / "step-000010") is None


def test_a_damaged_completion_marker_falls_back_and_nothing_intact_is_an_error(
    tmp_path: Path, kto_straight: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(kto_straight, out)
    shutil.rmtree(out / "final")
    truncate(out / "step-000010" / "meta.json")
    assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert_same_weights(weights(kto_straight), weights(out))
    # A checkpoint directory without its marker at all is passed over with a warning naming it.
    shutil.rmtree(out / "final")
    (out / "step-000010" / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        assert_ok(program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys))
    assert f"{out / 'step-000010'} has no meta.json" in caplog.text
    assert_same_weights(weights(kto_straight), weights(out))
    assert (out / "step-000010" / "meta.json").is_file()  # the run's last checkpoint, written anew
    for step in (3, 6, 9, 10):
        empty(out / f"step-{step:06d}" / "state")
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"], capsys)
    assert_one_line_error(result, "resume=auto: no intact checkpoint", "step-000010")


# ---------------------------------------------------------------------------------------- state of earlier runs
def test_spin_regenerates_an_iteration_another_policy_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resumed from iteration 0's middle under another learning rate, the policy that reaches iteration 1 is not the
    one that made iter-1/: it is made again (and the old one set aside). The first step of iteration 1 then starts
    from policy == opponent, a loss of ln 2; a checkpoint inside iteration 1 cannot resume on the new data."""
    out = tmp_path / "out"
    assert_ok(program(spin.setup, [*SPIN_ARGS, f"--out_dir={out}"], capsys))
    first = json.loads((out / "iter-1" / "meta.json").read_text())["id"]
    shutil.copytree(out / "step-000006", tmp_path / "step-000006")
    resume = ["--train.lr=1e-3", f"--out_dir={out}", f"--resume={out / 'step-000002'}"]
    assert_ok(program(spin.setup, [*SPIN_ARGS, *resume], capsys))
    assert "iteration 1: not reusing" in caplog.text and "made under other settings" in caplog.text
    meta = json.loads((out / "iter-1" / "meta.json").read_text())
    assert meta["id"] != first and meta["made_at_step"] == 4
    assert len(list(out.glob(".replaced-iter-1-*"))) == 1
    rows = read_metrics(out)
    steps, losses = column(rows, "train/step"), column(rows, "train/loss")
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert abs(losses[4] - math.log(2)) < 1e-6  # step 5, the first of iteration 1
    # The old run's checkpoint inside iteration 1 trained on the replaced data: refused, not silently mixed.
    shutil.rmtree(out / "step-000006")
    shutil.copytree(tmp_path / "step-000006", out / "step-000006")
    result = program(spin.setup, [*SPIN_ARGS, f"--out_dir={out}", f"--resume={out / 'step-000006'}"], capsys)
    assert_one_line_error(result, "iter-1: it holds other iteration data than the checkpoint trained on")


def test_a_fresh_run_never_appends_to_an_earlier_runs_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier run died before its first checkpoint: its log is set aside, and the new one holds each step once."""
    out = tmp_path / "out"
    real_lr = loop.lr_at

    def die_at_step_3(step: int, *args: object) -> float:
        if step == 2:  # before step 3 and its checkpoint
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(loop, "lr_at", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        cli.run_cli(kto.setup, [*KTO_ARGS, f"--out_dir={out}"])
    monkeypatch.undo()
    assert column(read_metrics(out), "train/step") == [1, 2]
    assert not checkpoint_dirs(out)
    cli.run_cli(kto.setup, [*KTO_ARGS, f"--out_dir={out}", "--resume=auto"])
    assert column(read_metrics(out), "train/step") == list(range(1, 11))
    assert (out / "logs-earlier-1" / "metrics.csv").is_file()
    assert "holds an earlier run's logs: moved to" in caplog.text


# -------------------------------------------------------------------------------------------- kernel self-check
def test_a_wrong_triton_kernel_stops_at_its_first_use(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fabric_align.kernels import fused_linear_logprob, logprob_triton, losses_triton, selfcheck
    from fabric_align.kernels.selfcheck import KernelCheckError

    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "triton")
    selfcheck.forget()
    hidden, weight = torch.randn(5, 32), torch.randn(40, 32)
    targets = torch.tensor([1, 2, -100, 3, 39])
    probes = []
    real_forward = logprob_triton.forward
    monkeypatch.setattr(logprob_triton, "forward", lambda *a: probes.append(1) or real_forward(*a))
    fused_linear_logprob(hidden, weight, targets)
    fused_linear_logprob(hidden, weight, targets)
    assert len(probes) == 3  # the probe once, then the two calls

    selfcheck.forget()
    broken = lambda *a: (lambda logp, lse: (logp + 0.5, lse))(*real_forward(*a))  # noqa: E731
    monkeypatch.setattr(logprob_triton, "forward", broken)
    with pytest.raises(
        KernelCheckError, match="log-prob kernel disagrees .*: logp is off .*FABRIC_ALIGN_KERNELS=torch"
    ):
        fused_linear_logprob(hidden, weight, targets)

    real_kto = losses_triton.kto_forward
    monkeypatch.setattr(
        losses_triton,
        "kto_forward",
        lambda *a, **k: (lambda grad, sums: (grad * 2, sums))(*real_kto(*a, **k)),
    )
    from fabric_align.kernels import kto_loss

    with pytest.raises(KernelCheckError, match="KTO loss kernel disagrees .*row gradient"):
        kto_loss(torch.zeros(2, 3), torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0))

    # Through the program: one line, before any step.
    selfcheck.forget()
    result = program(kto.setup, [*KTO_ARGS, f"--out_dir={tmp_path / 'out'}"], capsys)
    assert_one_line_error(result, "the Triton log-prob kernel disagrees", "FABRIC_ALIGN_KERNELS=torch")
    selfcheck.forget()


# --------------------------------------------------------------------------------------------- metric details
class OneRank:
    world_size, global_rank, device = 1, 0, torch.device("cpu")

    @staticmethod
    def all_reduce(t: torch.Tensor, reduce_op: str) -> torch.Tensor:
        return t


def test_a_label_absent_from_a_step_is_omitted_not_zero() -> None:
    spec = kto.KTO.metric_spec
    only_chosen = {
        "loss": torch.tensor(0.4),
        "_examples": torch.tensor(4.0),
        "kl": torch.tensor(0.0),
        "rewards/chosen": torch.tensor(0.3),
        "logps/chosen": torch.tensor(-5.0),
        "rewards/rejected": torch.tensor(0.0),
        "logps/rejected": torch.tensor(0.0),
        "count/chosen": torch.tensor(4.0),
        "count/rejected": torch.tensor(0.0),
        "tokens": torch.tensor(40.0),
    }
    metrics = reduce_metrics(OneRank(), [only_chosen, dict(only_chosen)], spec)  # type: ignore[arg-type]
    assert metrics["rewards/chosen"] == pytest.approx(0.3) and metrics["count/rejected"] == 0
    assert "rewards/rejected" not in metrics and "logps/rejected" not in metrics
    assert "rewards/margins" not in kto.KTO.finalize(None, metrics)  # type: ignore[arg-type]


def test_validation_without_undesirable_examples_logs_no_rejected_metrics(tmp_path: Path) -> None:
    val = write_jsonl(tmp_path / "val.jsonl", [r for r in kto_rows(12) if r["label"]])
    out = tmp_path / "out"
    args = [a for a in KTO_ARGS if not a.startswith("--train.max_steps")] + ["--train.max_steps=4"]
    cli.run_cli(kto.setup, [*args, f"--data.val_path={val}", f"--out_dir={out}"])
    rows = read_metrics(out)
    assert column(rows, "val/rewards/chosen") and column(rows, "val/count/rejected") == [0, 0]
    for name in ("rewards/rejected", "logps/rejected", "rewards/margins"):
        assert not column(rows, f"val/{name}"), name


def test_dropout_is_disabled_by_default(tmp_path: Path) -> None:
    from fabric_align.args import LoRAArgs, ModelArgs
    from fabric_align.modeling import EMBEDDED_MODEL_DIR, load_model

    shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    lora = LoRAArgs(r=4, dropout=0.2)
    on = load_model(ModelArgs(name_or_path=str(tmp_path / "m"), lora=lora), dtype=torch.float32, seed=0)
    off = load_model(
        ModelArgs(name_or_path=str(tmp_path / "m"), lora=lora, disable_dropout=False), dtype=torch.float32, seed=0
    )
    attention = [m.attention_dropout for m in on.modules() if hasattr(m, "attention_dropout")]
    assert attention and set(attention) == {0.0}
    assert {m.attention_dropout for m in off.modules() if hasattr(m, "attention_dropout")} == {0.3}
    lora_dropout = {m.p for name, m in on.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" in name}
    assert lora_dropout == {0.2}  # the adapter's own dropout is the user's explicit choice
    assert on.config.attention_dropout == 0.3  # the exported config describes the model as given
