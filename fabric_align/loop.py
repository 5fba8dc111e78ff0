"""The training loop every method shares, and the no-grad passes over data.

A method plugs in as a ``Recipe``: what to compute once per optimizer step, the loss and metrics of one micro-batch,
and the metrics of one validation micro-batch. ``fit`` runs a ``Phase`` of optimizer steps (the whole KTO run, one
SPIN iteration); ``evaluate`` shards validation over the ranks, sums and counts, then divides.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.fabric import Fabric
from torch import nn
from tqdm import tqdm

from fabric_align.checkpoints import checkpoint_dirs, require_finite_parameters, save_checkpoint
from fabric_align.data import StepPlan, pad_sequences, shard_by_length
from fabric_align.errors import TrainingError
from fabric_align.loggers import MetricLogger
from fabric_align.metrics import MetricSpec, reduce_metrics
from fabric_align.optim import lr_at

if TYPE_CHECKING:
    from fabric_align.args import TrainArgs
    from fabric_align.trainer import Job

log = logging.getLogger("fabric_align")


class Recipe(Protocol):
    """What a method gives the shared loop: its data, its loss step and its metrics."""

    metric_spec: MetricSpec

    def prepare_step(self, micro_batches: list[list[int]]) -> Any:
        """Once per optimizer step, before its micro-batches (KTO: the KL reference point z0)."""

    def micro_step(self, indices: list[int], context: Any, normalizer: float) -> tuple[torch.Tensor, dict]:
        """Loss (to backpropagate) and metrics of one training micro-batch."""

    def eval_lengths(self) -> list[int]:
        """The padded length of each validation example (empty: no validation); micro-batches group similar ones."""

    def prepare_eval(self, shares: list[list[int]]) -> Any:
        """Once per validation, given this rank's micro-batches (-1: padding) (KTO: z0 over the validation set)."""

    def eval_batch(self, indices: list[int], context: Any) -> dict[str, torch.Tensor]:
        """Metrics of one validation micro-batch."""

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived metrics after reduction (margins from the reduced means)."""


@dataclass(frozen=True)
class Phase:
    """A stretch of optimizer steps ``[start, end)`` with its own schedule and data plan: the whole KTO run, or one
    SPIN iteration. The learning rate warms up to ``peak_lr`` (``train.lr`` when None) from ``start``."""

    start: int
    end: int
    peak_lr: float | None = None

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass
class Run:
    """Everything the loop touches: the prepared job, the Fabric, the policy and optimizer, the state that a checkpoint
    holds, and the logger."""

    job: Job
    fabric: Fabric
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    logger: MetricLogger
    state: dict[str, Any]
    meta: dict[str, Any]
    last_validated: int = -1
    last_validation: dict[str, float] = field(default_factory=dict)  # the metrics of the latest validation
    resumed_meta: dict[str, Any] = field(default_factory=dict)  # the resumed checkpoint's meta.json
    resumed_step: int = -1
    resumed_keys: set[str] = field(default_factory=set)  # what the resumed run had logged at resumed_step
    epoch: int = 0  # train/epoch of the last step trained (0 before the first; SPIN: within the iteration)

    @property
    def args(self) -> TrainArgs:
        return self.job.train

    @property
    def out_dir(self) -> Any:
        return self.job.out_dir

    def logged_before_resume(self, key: str, step: int) -> bool:
        """Whether the run this one resumes already logged ``key`` at ``step`` (its checkpoint's step)."""
        return step == self.resumed_step and key in self.resumed_keys


def fit(
    run: Run,
    recipe: Recipe,
    plan: StepPlan,
    phase: Phase,
    extra_metrics: Callable[[], dict[str, float]] | None = None,
) -> None:
    """Train from ``state["step"]`` to ``phase.end``; the plan and the schedule are read at ``step - phase.start``."""
    fabric, args, state = run.fabric, run.args, run.state
    accum = args.accumulation_steps(fabric.world_size)
    warmup = args.warmup_for(phase.steps)
    if fabric.is_global_zero and state["step"] == phase.start and warmup >= phase.steps > 0:
        peak = args.lr if phase.peak_lr is None else phase.peak_lr
        log.warning(
            "the warmup (%d steps) spans all %d steps of training%s: the learning rate ends at %.3g, short of its peak "
            "%.3g",
            warmup,
            phase.steps,
            f" from step {phase.start}" if phase.start else "",
            lr_at(phase.steps - 1, args, phase.steps, peak),
            peak,
        )
    run.policy.train()
    bar = tqdm(
        total=phase.end, initial=state["step"], desc="train", disable=not fabric.is_global_zero, dynamic_ncols=True
    )

    def trained_epoch(step: int) -> int:  # the epoch of the step before ``step``, as train/epoch counts it
        return plan.epoch_of(step - 1 - phase.start) + 1 if step > phase.start else 0

    while state["step"] < phase.end:
        step = state["step"]
        run.epoch = trained_epoch(step)
        if step % args.eval_interval == 0:
            log_validation(run, recipe, step)
        t0 = time.perf_counter()
        lr = lr_at(step - phase.start, args, phase.steps, phase.peak_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = plan.micro_batches(
            step - phase.start, fabric.global_rank, fabric.world_size, args.micro_batch_size
        )
        assert len(micro_batches) == accum
        context = recipe.prepare_step(micro_batches)
        # Each rank's loss is its sum over examples / (examples per rank in the step); DDP and FSDP average the
        # gradients over ranks, which makes it the step's global mean.
        normalizer = args.global_batch_size / fabric.world_size
        parts = []
        for i, indices in enumerate(micro_batches):
            with fabric.no_backward_sync(run.policy, enabled=i < accum - 1):
                loss, metrics = recipe.micro_step(indices, context, normalizer)
                fabric.backward(loss)
            parts.append(metrics)
        grad_norm = fabric.clip_gradients(
            run.policy, run.optimizer, max_norm=args.max_norm or float("inf"), error_if_nonfinite=False
        )
        # Both are global (the loss reduced over ranks, the norm of the synchronized gradient), so every rank
        # takes the same decision.
        metrics = reduce_metrics(fabric, parts, recipe.metric_spec)
        norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        stop = None
        if math.isfinite(metrics["loss"]) and math.isfinite(norm):
            run.optimizer.step()
            state["consecutive_skips"] = 0
        else:
            stop = skip_step(run, step + 1, metrics["loss"], norm)
        run.optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        tokens = metrics.pop("tokens", 0.0)
        metrics = recipe.finalize(metrics)
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if state["step"] % args.log_interval == 0 or state["step"] == phase.end:
            logged = {f"train/{k}": v for k, v in metrics.items()}
            logged.update(
                {
                    "train/lr": lr,
                    "train/grad_norm": norm,
                    "train/tokens_per_sec": tokens / elapsed,
                    "train/skipped_steps": state["skipped_steps"],
                    "train/epoch": plan.epoch_of(step - phase.start) + 1,
                    "train/step": state["step"],
                }
            )
            logged.update(extra_metrics() if extra_metrics else {})
            run.logger.log(logged, step=state["step"])
        if stop is not None:  # after logging, so the log counts the step that stopped the run
            raise TrainingError(stop)
        if args.save_interval and state["step"] % args.save_interval == 0:
            save(run)
    run.epoch = trained_epoch(state["step"])  # for the validation after the phase
    bar.close()


def skip_step(run: Run, step: int, loss: float, grad_norm: float) -> str | None:
    """A step whose loss or gradient norm is not finite leaves the weights and optimizer state as they were. Returns
    why the run must stop when too many came in a row (its checkpoints, all saved from finite weights, stay)."""
    state = run.state
    state["skipped_steps"] += 1
    state["consecutive_skips"] += 1
    what = ", ".join(f"{k}={v}" for k, v in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(v))
    if state["consecutive_skips"] > run.args.max_consecutive_skips:
        found = checkpoint_dirs(run.out_dir)
        kept = f"the last checkpoint is {found[-1][1]}" if found else "no checkpoint was saved"
        return (
            f"step {step}: not finite ({what}) for {state['consecutive_skips']} steps in a row "
            f"(train.max_consecutive_skips={run.args.max_consecutive_skips}): stopped; {kept}. "
            "Lower train.lr, set train.max_norm, or check the data"
        )
    log.warning(
        "step %d: not finite (%s): update skipped (%d in a row, %d in all)",
        step,
        what,
        state["consecutive_skips"],
        state["skipped_steps"],
    )
    return None


def save(run: Run) -> None:
    """A checkpoint of the run as it stands, refused (with an error) when a trained weight is not finite."""
    require_finite_parameters(run.fabric, run.policy, f"step {run.state['step']}: not saving a checkpoint")
    save_checkpoint(run.fabric, run.out_dir, run.state, run.meta)


# ------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate(run: Run, recipe: Recipe) -> dict[str, float]:
    """The recipe's metrics over its whole validation set (without prefix), or {} when it has none. Each rank takes
    an even share in micro-batches padded with -1 (every rank joins the same FSDP collectives); a padding-only
    micro-batch runs its forward and contributes nothing."""
    lengths = recipe.eval_lengths()
    if not lengths:
        return {}
    fabric = run.fabric
    run.policy.eval()
    shares = shard_by_length(lengths, fabric.global_rank, fabric.world_size, run.args.eval_micro_batch_size)
    context = recipe.prepare_eval(shares)
    parts = []
    for indices in shares:
        real = [i for i in indices if i >= 0]
        metrics = recipe.eval_batch(real or [0], context)
        parts.append(metrics if real else {k: torch.zeros(()) for k in metrics})
    run.policy.train()
    metrics = reduce_metrics(fabric, parts, recipe.metric_spec)
    metrics.pop("tokens", None)  # a throughput count, for training steps
    return recipe.finalize(metrics)


def log_validation(run: Run, recipe: Recipe, step: int) -> dict[str, float]:
    if run.last_validated == step:  # the policy has not changed since
        return {}
    run.last_validated = step
    metrics = evaluate(run, recipe)
    run.last_validation = metrics
    if metrics:
        run.logger.log(
            {f"val/{k}": v for k, v in metrics.items()} | {"val/step": step, "val/epoch": run.epoch}, step=step
        )
        if run.fabric.is_global_zero:
            shown = ", ".join(
                f"{k}={v:.4f}"
                for k, v in metrics.items()
                if k in ("loss", "rewards/margins", "nll", "rewards/accuracy")
            )
            tqdm.write(f"step {step}: val {shown}")
    return metrics


# --------------------------------------------------------------------------------------------- scoring passes
@torch.no_grad()
def score_sequences(
    fabric: Fabric,
    policy: nn.Module,
    sequences: Sequence[tuple[list[int], int]],
    *,
    pad_id: int,
    batch_size: int,
    desc: str,
    reference: bool = False,
) -> torch.Tensor:
    """Sequence log-probs (sum over completion tokens) of every ``(token ids, prompt length)`` pair, each rank
    scoring its share; the full float32 vector is returned on every rank. Micro-batches of neighbouring lengths cut
    padding, and dealt back and forth they give every rank a similar share of the tokens."""
    lengths = [len(ids) for ids, _ in sequences]
    shares = shard_by_length(lengths, fabric.global_rank, fabric.world_size, batch_size)
    policy.eval()
    local = []
    bar = tqdm(shares, desc=desc, disable=not fabric.is_global_zero, leave=False)
    for share in bar:
        items = [sequences[max(i, 0)] for i in share]  # padding (-1) scores sequence 0, then is dropped
        batch = fabric.to_device(pad_sequences(items, pad_id))
        with policy.reference() if reference else contextlib.nullcontext():
            token_logps = policy(batch["input_ids"], batch["attention_mask"], batch["targets"])
        local.append(token_logps.sum(-1).float())
    policy.train()
    flat_local = torch.cat(local) if local else torch.zeros(0, device=fabric.device)
    index = torch.tensor([i for share in shares for i in share], dtype=torch.long)
    if fabric.world_size > 1:  # every rank holds as many entries
        flat_local = fabric.all_gather(flat_local).reshape(-1)
        index = fabric.all_gather(index.to(fabric.device)).reshape(-1)
    flat_local, index = flat_local.cpu(), index.cpu()
    result = torch.empty(len(sequences), dtype=torch.float32)
    result[index[index >= 0]] = flat_local[index >= 0]
    return result
