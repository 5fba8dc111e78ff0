"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from fabric_align.args import TrainArgs
from fabric_align.errors import ConfigError

BITSANDBYTES_OPTIMIZERS = ("adamw8bit", "paged_adamw", "paged_adamw8bit")


def make_optimizer(name: str, params: list[nn.Parameter], args: TrainArgs) -> torch.optim.Optimizer:
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay}
    if name == "adamw":
        # The fused kernel (CUDA and CPU) updates each weight in one pass; the for-loop version torch picks on CPU
        # holds two temporaries the size of the largest weight (the lm_head), the peak of a CPU step. Not on FSDP2's
        # DTensor shards, which it does not take.
        fused = not any(hasattr(p, "full_tensor") for p in params) and all(
            p.device.type in ("cuda", "cpu") for p in params
        )
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
