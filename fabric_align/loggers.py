"""Metric loggers: a CSV file under ``out_dir`` and Weights & Biases (offline when no API key is configured).

Only rank 0 logs. Both continue the same run when training resumes.
"""

from __future__ import annotations

import csv
import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fabric_align.args import LoggerArgs


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

    def drop_after(self, step: int) -> None:
        """On resume from the checkpoint at ``step``: forget what the resumed run logs again, the rows after that
        step and the validation at it (a resumed run validates at its first step when validation is due there,
        and a finished run validates at its end)."""

        def kept_row(row: dict[str, Any]) -> bool:
            row_step = int(float(row.get("step") or 0))
            validation = any(v not in (None, "") for k, v in row.items() if k.startswith("val/"))
            return row_step < step or (row_step == step and not validation)

        kept = [r for r in self.rows if kept_row(r)]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._write_all()

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


class MetricLogger:
    """Fan-out to the configured backends; a no-op on ranks other than 0."""

    def __init__(self, args: LoggerArgs, out_dir: Path, *, is_global_zero: bool, config: dict[str, Any]) -> None:
        self.active = is_global_zero
        self.csv: CSVMetrics | None = None
        self.wandb_run: Any = None
        if not self.active:
            return
        if args.backend in ("csv", "both"):
            self.csv = CSVMetrics(out_dir / "logs" / "metrics.csv")
        if args.backend in ("wandb", "both"):
            import wandb

            # A stable id in out_dir makes a resumed run continue the same W&B run.
            id_file = out_dir / "logs" / "wandb_id.txt"
            id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
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
            # Under a sweep agent W&B picks the run id itself: remember the real one for resuming.
            id_file.write_text(self.wandb_run.id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        if self.csv is not None:
            self.csv.log(metrics, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.active and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def resumed_at(self, step: int) -> None:
        if self.active and self.csv is not None:
            self.csv.drop_after(step)

    def finish(self) -> None:
        if self.active and self.wandb_run is not None:
            self.wandb_run.finish()
