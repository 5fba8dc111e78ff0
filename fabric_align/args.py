"""Argument groups shared by the entry scripts. Attribute docstrings become ``--help`` text (jsonargparse)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

EMBEDDED_MODEL = "fabric-align/tiny-llama"


@dataclass
class LoRAArgs:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the lm_head)."""
    merge_on_export: bool = False
    """Also export the base model with the adapter merged in (``final/merged/``)."""


@dataclass
class ModelArgs:
    name_or_path: str = EMBEDDED_MODEL
    """Hugging Face hub id or local directory of a causal LM. A directory with a config but no weights is
    initialized randomly (seeded). ``fabric-align/tiny-llama`` is the embedded tiny model."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Allow the model's own code from the hub. Off unless asked for."""
    lora: LoRAArgs | None = None
    """LoRA settings (peft), or null for full fine-tuning."""
    quantize: Literal["4bit"] | None = None
    """Load the base weights in 4-bit NF4 through bitsandbytes (QLoRA; needs ``lora``)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass."""
    attn_implementation: str | None = "sdpa"
    """Attention implementation passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``...)."""


@dataclass
class DataArgs:
    train_path: str = "fabric-align/kto-demo"
    """Training data: a local .jsonl/.json/.parquet file, a dataset directory, or a Hugging Face dataset id."""
    val_path: str | None = "fabric-align/kto-demo-val"
    """Validation data (same forms), or null for no validation."""
    train_split: str = "train"
    """Split to use when ``train_path`` is a Hugging Face dataset."""
    val_split: str = "test"
    """Split to use when ``val_path`` is a Hugging Face dataset."""
    max_length: int = 256
    """Longest prompt + completion in tokens: completions are cut to fit, rows whose prompt alone does not fit
    are dropped."""


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
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    """torch AdamW, or a bitsandbytes 8-bit / paged AdamW."""
    warmup_steps: int = 10
    """Linear warmup steps before the cosine decay."""
    max_steps: int | None = None
    """Optimizer steps to take; null: ``epochs`` passes over the training data."""
    epochs: int = 1
    """Passes over the training data when ``max_steps`` is null."""
    max_norm: float | None = 1.0
    """Clip the gradient norm to this value (null: no clipping; the norm is logged either way)."""
    eval_interval: int = 50
    """Validate every this many steps (and before the first and after the last)."""
    save_interval: int | None = 100
    """Save a checkpoint every this many steps (null: only the final export)."""
    log_interval: int = 1
    """Log training metrics every this many steps."""


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


@dataclass
class KTOArgs:
    beta: float = 0.1
    """Strength of the implicit KL penalty: reward = beta * (log pi - log pi_ref)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable examples' losses."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples' losses."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """``kto`` (with the KL reference point z0) or ``apo_zero_unpaired`` (no KL term)."""


@dataclass
class SPINArgs:
    iterations: int = 2
    """Self-play iterations; each starts by generating with the policy as it stands (the opponent)."""
    beta: float | list[float] = 0.1
    """Loss temperature: one value, or one per iteration."""
    epochs_per_iteration: int = 1
    """Passes over the iteration's pairs."""
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
    num_logged_samples: int = 8
    """Generations per iteration shown in the W&B table."""

    def beta_at(self, iteration: int) -> float:
        return float(self.beta[iteration]) if isinstance(self.beta, list) else float(self.beta)
