"""Where and how a run executes: devices, nodes, precision and the sharding strategy, resolved once into a ``Launch``
(also under ``fabric run``, whose ``LT_*`` variables decide them), and the Fabric built from it."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import LightningEnvironment

from fabric_align.errors import ConfigError
from fabric_align.modeling import fsdp2_parallelize
from fabric_align.rendezvous import free_port

log = logging.getLogger("fabric_align")

STRATEGIES = ("auto", "fsdp", "ddp")
# What tells Fabric's cluster environments where a multi-node process stands: its own variables (set by hand or by
# `fabric run`), SLURM's, torchrun's, LSF's, MPI's.
CLUSTER_VARIABLES = (
    "NODE_RANK",
    "MASTER_ADDR",
    "SLURM_NTASKS",
    "TORCHELASTIC_RUN_ID",
    "LSB_JOBID",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
)
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")


def under_fabric_run() -> bool:
    """Whether ``fabric run`` launched this process (it sets ``LT_CLI_USED``; Fabric itself checks the same)."""
    return bool(int(os.environ.get("LT_CLI_USED", "0") or 0))


@dataclass(frozen=True)
class Launch:
    """The resolved launch settings of a run."""

    accelerator: str
    """``cuda`` or ``cpu``."""
    devices: int
    """Processes per node."""
    num_nodes: int
    precision: str
    """One of ``PRECISIONS``."""
    strategy: str
    """One of ``STRATEGIES``: ``fsdp`` is FSDP2 (``fully_shard`` through Fabric's ``ModelParallelStrategy``)."""
    under_cli: bool
    """Launched by ``fabric run``: Fabric then reads devices, nodes and precision from ``LT_*`` itself."""

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype weights are loaded in (mixed precisions keep fp32 masters)."""
        return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(self.precision, torch.float32)

    def fabric_kwargs(self) -> dict[str, Any]:
        """Fabric's arguments. Under ``fabric run`` its defaults where it reads ``LT_*`` itself, so nothing conflicts;
        the precision is passed whenever ``fabric run`` was given none (a recipe's ``precision`` then holds, as it
        does under plain ``python``)."""
        strategy: Any = self.strategy
        if self.strategy == "fsdp":
            from lightning.fabric.strategies import ModelParallelStrategy

            # bf16-mixed: all-gather in bf16 (fp32 shards and gradient reduction). Not 16-mixed, whose loss scaler
            # would then see fp16 gradients before the reduction.
            compute_dtype = torch.bfloat16 if self.precision == "bf16-mixed" else None
            strategy = ModelParallelStrategy(
                parallelize_fn=functools.partial(fsdp2_parallelize, compute_dtype=compute_dtype),
                data_parallel_size=self.world_size,
                tensor_parallel_size=1,
            )
        if self.under_cli:
            precision = None if os.environ.get("LT_PRECISION") else self.precision
            return {
                "accelerator": "auto",
                "devices": "auto",
                "num_nodes": 1,
                "precision": precision,
                "strategy": strategy,
            }
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "precision": self.precision,
            "strategy": strategy,
        }

    def make_fabric(self) -> Fabric:
        # Metrics go through MetricLogger (rank 0 only), not Fabric's loggers.
        fabric = Fabric(**self.fabric_kwargs())
        effective = getattr(fabric.strategy.precision, "precision", self.precision)
        if effective != self.precision:
            raise ConfigError(f"precision={self.precision}, but Fabric was set up with {effective}")
        if not self.under_cli:
            environment = getattr(fabric.strategy, "cluster_environment", None)
            if (
                type(environment) is LightningEnvironment  # Fabric starts the processes (not SLURM, torchrun...)
                and not environment.creates_processes_externally
                and not os.environ.get("MASTER_PORT")
            ):
                # Fabric's own pick is an ephemeral port, which an outgoing connection can take before its rank 0
                # listens there (EADDRINUSE); the processes it starts inherit this one. One rank sets up a process
                # group too (FSDP2 on one device), so it gets one as well. (Processes that a cluster starts each
                # pick alone, so they keep the cluster's port.)
                os.environ["MASTER_PORT"] = str(free_port())
            fabric.launch()
        return fabric


def default_precision() -> str:
    # Mixed, not bf16-true: with bf16 weights most AdamW updates at alignment learning rates (5e-7..5e-6) round
    # to nothing; bf16-mixed keeps fp32 master weights and computes in bf16.
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def resolve_launch(devices: int | str, num_nodes: int, precision: str | None, strategy: str) -> Launch:
    """The launch of this run. Under ``fabric run`` the ``LT_*`` variables decide devices, nodes, precision and
    strategy (``fabric run --strategy fsdp`` means FSDP2 here: Fabric's own FSDP1 strategy refuses CPUs)."""
    under_cli = under_fabric_run()
    if under_cli:
        if os.environ.get("LT_STRATEGY"):
            strategy = os.environ.pop("LT_STRATEGY")
        devices = os.environ.get("LT_DEVICES", devices)
        num_nodes = int(os.environ.get("LT_NUM_NODES", num_nodes))
        precision = os.environ.get("LT_PRECISION") or precision
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if num_nodes < 1:
        raise ConfigError(f"num_nodes={num_nodes}: must be at least 1")
    if num_nodes > 1 and not under_cli and not any(os.environ.get(name) for name in CLUSTER_VARIABLES):
        # Fabric would take this process for node 0 of a cluster that never forms, and wait (30 minutes) in silence.
        raise ConfigError(
            f"num_nodes={num_nodes} with no cluster around this process (no NODE_RANK and MASTER_ADDR, SLURM or "
            f"torchrun): start one process per node, e.g. `fabric run --num-nodes {num_nodes} --node-rank N "
            "--main-address HOST fabric_align/kto.py ...` on each node, or run under SLURM or torchrun"
        )
    accelerator = os.environ.get("LT_ACCELERATOR", "auto") if under_cli else "auto"
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "16-mixed" and accelerator == "cpu":
        # CPUs have no fp16 autocast, and Fabric would run bf16-mixed instead: said here, and recorded as what runs
        # (the logged config, the checkpoints and the reference cache's key), not as what was asked.
        log.warning("precision=16-mixed: CPUs have no fp16 autocast; running bf16-mixed")
        precision = "bf16-mixed"
    return Launch(accelerator, count_devices(devices, accelerator), num_nodes, precision, strategy, under_cli)


def count_devices(devices: int | str, accelerator: str) -> int:
    """Processes per node from ``devices``: a count, ``auto`` / ``-1`` (every GPU), or device indices (``0,1``)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return torch.cuda.device_count() if accelerator == "cuda" else 1
        if "," in text:  # a list of device indices
            indices = [d.strip() for d in text.split(",") if d.strip()]
            if not indices or not all(d.isdigit() for d in indices):
                raise ConfigError(f"devices={devices!r}: expected a count, 'auto', or device indices like '0,1'")
            return len(indices)
        if not text.lstrip("-").isdigit():
            raise ConfigError(f"devices={devices!r}: expected a count, 'auto', or device indices like '0,1'")
        devices = int(text)
    if devices < 1:
        raise ConfigError(f"devices={devices}: expected a positive count")
    return devices
