"""Weights & Biases: offline without an API key, hyperparameters and metrics recorded, a resumed run continues
the same W&B run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fabric_align import kto
from fabric_align.errors import ConfigError
from fabric_align.loggers import wandb_mode

from conftest import FAST, column, read_metrics, run_cli, run_script


def test_wandb_offline_run_records_config_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert wandb_mode() == "offline"
    out = tmp_path / "out"
    args = [
        *FAST,
        "--logger.backend=both",
        "--logger.run_name=beta-test",
        "--kto.beta=0.2",
        f"--out_dir={out}",
        "--train.max_steps=3",
        "--train.save_interval=3",
    ]
    run_cli(kto.setup, args)
    # The record stream is written by W&B's service process, which may still be flushing after run.finish() on busy
    # cores (as at process exit, where it is torn down): tear it down before reading.
    import wandb

    wandb.teardown()
    runs = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (out / "logs" / "wandb_id.txt").read_text()
    assert runs[0].name.endswith(run_id)
    # The run's record stream (what `wandb sync` uploads) holds the hyperparameters and the metrics.
    records = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b'"beta":0.2' in records and b'"global_batch_size":16' in records
    assert records.count(b"train/loss") >= 3 and b"val/rewards/margins" in records
    assert (out / "logs" / "metrics.csv").is_file()  # "both" also writes the CSV, and the hyperparameters beside it
    again = tmp_path / "again"  # ... as a config that reproduces the run
    run_cli(kto.setup, [f"--config={out / 'logs' / 'hparams.yaml'}", f"--out_dir={again}"])
    for key in ("train/loss", "train/kl", "val/rewards/margins"):
        assert column(read_metrics(again), key) == column(read_metrics(out), key), key

    run_cli(kto.setup, [*args[:-2], "--train.max_steps=4", "--train.save_interval=4", "--resume=auto"])
    assert (out / "logs" / "wandb_id.txt").read_text() == run_id  # same W&B run continued


def test_wandb_mode_follows_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--logger.project=team/run", "logger.project='team/run': W&B project names cannot contain /"),
        (f"--logger.project={'p' * 129}", "W&B takes 1 to 128 characters"),
        (f"--logger.tags=[ok,{'t' * 65}]", "logger.tags[1]="),
    ],
)
def test_what_wandb_refuses_is_refused_before_anything_loads(flag: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_cli(kto.setup, [*FAST, flag, "--logger.backend=both", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    run_cli(kto.setup, [*FAST, flag, "--train.max_steps=1", f"--out_dir={tmp_path / 'csv'}"])  # W&B's rules only


def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What W&B refuses only when it starts (a key or entity the server rejects) is named in one line."""
    import wandb

    def refuse(**kwargs: object) -> None:
        raise wandb.errors.UsageError("entity nobody not found during upsertBucket\n(more detail)")

    def load(*args: object) -> None:
        raise AssertionError("the model loaded before W&B started the run")

    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setattr(kto, "build_policy", load)
    with pytest.raises(
        ConfigError, match=r"W&B could not start the run \(entity nobody not found during upsertBucket\);"
    ):
        run_cli(kto.setup, [*FAST, "--logger.backend=wandb", "--train.max_steps=1", f"--out_dir={tmp_path / 'out'}"])


@pytest.mark.slow
def test_every_rank_stops_on_one_line_when_wandb_refuses_the_run(tmp_path: Path) -> None:
    """Rank 0 starts W&B; the other ranks learn of its refusal and stop with it, before the model loads, instead of
    waiting for rank 0 in a collective (under NCCL, until the timeout)."""
    home = tmp_path / "home"  # no netrc: W&B online with no key refuses at once, without the network
    home.mkdir()
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(home), "WANDB_CONFIG_DIR": str(home)}
    args = [*FAST, "--logger.backend=wandb", "--devices=2", "--strategy=ddp", f"--out_dir={tmp_path / 'out'}"]
    result = run_script("kto.py", args, env=env, check=False, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 2 and all("W&B could not start the run (No API key" in line for line in errors), errors
    assert "Traceback" not in result.stderr and "model:" not in result.stdout + result.stderr
