"""Metric loggers: a CSV file under ``out_dir`` and Weights & Biases (offline when no API key is configured).

Only rank 0 logs. Both continue the same run when training resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fabric_align.args import LoggerArgs
from fabric_align.errors import ConfigError, first_line

log = logging.getLogger("fabric_align")


def row_step(row: dict[str, Any]) -> int:
    return int(float(row.get("step") or 0))


def logged_keys(row: dict[str, Any]) -> list[str]:
    """The metrics a CSV row holds a value of (its other columns are empty)."""
    return [k for k, v in row.items() if k != "step" and v not in (None, "")]


class CSVMetrics:
    """``out_dir/logs/metrics.csv``: one row per logging call; new columns rewrite the header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if path.is_file():  # a resumed run keeps the rows of the run it continues
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = list(reader)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new or not self.path.is_file():
            self.columns += new
            self._write_all()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def drop_after(self, step: int) -> dict[str, str]:
        """On resume from the checkpoint at ``step``: forget the rows after it, which the resumed run logs again.
        Returns the metrics already logged at ``step`` (name: value as written), which the resumed run must not log
        a second time."""
        kept = [r for r in self.rows if row_step(r) <= step]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._write_all()
        return {k: r[k] for r in kept if row_step(r) == step for k in logged_keys(r)}

    def replace(self, metrics: dict[str, Any], step: int) -> None:
        """Log ``metrics`` at ``step`` in place of the values the rows at ``step`` hold for them."""
        for row in self.rows:
            if row_step(row) == step:
                row.update(dict.fromkeys(metrics.keys() & row.keys(), ""))
        self.rows = [r for r in self.rows if row_step(r) != step or logged_keys(r)]  # a row left with no value goes
        self._write_all()
        self.log(metrics, step)

    def _write_all(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; online with an API key (environment or netrc); offline otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def set_aside_earlier_logs(logs: Path) -> None:
    """A fresh run never appends to the logs of an earlier run in the same out_dir (one that saved no checkpoint,
    since a fresh run refuses an out_dir holding checkpoints): they are moved to ``logs-earlier-N``, not lost."""
    if not logs.is_dir() or not any(logs.iterdir()):
        return
    n = 1
    while (target := logs.with_name(f"{logs.name}-earlier-{n}")).exists():
        n += 1
    logs.rename(target)
    log.warning("%s holds an earlier run's logs: moved to %s; this run logs anew", logs, target)


def write_hparams(path: Path, config: dict[str, Any]) -> None:
    """The run's configuration beside its CSV metrics (what W&B keeps as the run config), as YAML that
    ``--config`` reads back; a resumed run writes its own."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    plain = json.loads(json.dumps(config, default=str))  # tuples to lists, paths to strings
    tmp.write_text(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(path)


class MetricLogger:
    """Fan-out to the configured backends; a no-op on ranks other than 0."""

    def __init__(
        self, args: LoggerArgs, out_dir: Path, *, is_global_zero: bool, config: dict[str, Any], fresh: bool
    ) -> None:
        self.active = is_global_zero
        self.csv: CSVMetrics | None = None
        self.wandb_run: Any = None
        if not self.active:
            return
        if fresh:
            set_aside_earlier_logs(out_dir / "logs")
        if args.backend in ("csv", "both"):
            self.csv = CSVMetrics(out_dir / "logs" / "metrics.csv")
            write_hparams(out_dir / "logs" / "hparams.yaml", config)
        if args.backend in ("wandb", "both"):
            import wandb

            # A stable id in out_dir makes a resumed run continue the same W&B run.
            id_file = out_dir / "logs" / "wandb_id.txt"
            id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            try:
                self.wandb_run = wandb.init(
                    project=args.project,
                    entity=args.entity,
                    name=args.run_name or out_dir.name,
                    tags=args.tags,
                    config=config,
                    dir=str(out_dir / "logs"),
                    id=run_id,
                    resume="allow",
                    mode=wandb_mode(),
                )
            except Exception as err:  # wandb's own kinds (a refused key or entity, an unreachable server): one line
                raise ConfigError(
                    f"logger.backend={args.backend}: W&B could not start the run ({first_line(err, limit=None)}); "
                    "WANDB_MODE=offline or logger.backend=csv run without the server"
                ) from None
            # Under a sweep agent W&B picks the run id itself: remember the real one for resuming.
            id_file.write_text(self.wandb_run.id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        if self.csv is not None:
            self.csv.log(metrics, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def replace(self, metrics: dict[str, Any], step: int) -> None:
        """Values the resumed run logged at its checkpoint's step after saving it, logged again: in the CSV they
        replace the old ones. W&B keeps what it has at a step it has passed, so it is not sent again."""
        if self.active and self.csv is not None:
            self.csv.replace(metrics, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.active and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def resumed_at(self, step: int) -> dict[str, str]:
        """The metrics logged at ``step`` by the run being resumed (known from the CSV log on rank 0)."""
        if self.active and self.csv is not None:
            return self.csv.drop_after(step)
        return {}

    def finish(self) -> None:
        if self.active and self.wandb_run is not None:
            self.wandb_run.finish()
