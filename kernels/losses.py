"""Fused KTO and SPIN losses: masked sequence sum, loss, per-token gradient and metrics in one pass.

Three implementations of each loss live here or beside it:

- ``kto_loss_reference`` / ``spin_loss_reference``: the papers' formulas in plain torch, autograd through
  ordinary ops. Readable; the yardstick for the others.
- ``kto_loss`` / ``spin_loss``: custom autograd Functions. On CUDA tensors they run the Triton kernels of
  ``losses_triton.py`` (one forward launch, one backward launch); elsewhere
  a torch implementation that keeps to ``[B]`` vectors (the gradient is an expanded ``[B, 1]`` column).
  ``FABRIC_ALIGN_KERNELS=triton|torch`` forces one (see ``_dispatch.py``).

Every variant accumulates in fp32, returns an fp32 loss, and gives the token log-prob tensors their gradient
in their own dtype. Only the token log-probs receive gradients: reference log-probs, labels, the KL estimate
z0 and the normalizer are constants.

Metrics are detached fp32 0-dim tensors: means over rows plus the row counts, so the trainer can combine
micro-batches and ranks by count-weighting the means. In ``kto_loss`` / ``spin_loss`` they are views of one
small stats vector (do not modify them in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fabric_align.kernels._dispatch import Implementation, use_triton
from fabric_align.kernels.selfcheck import ensure_checked

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
KTO_METRIC_KEYS = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "count/chosen",
    "count/rejected",
)
SPIN_METRIC_KEYS = (
    "loss",
    "rewards/real",
    "rewards/generated",
    "rewards/margins",
    "rewards/accuracy",
    "logps/real",
    "logps/generated",
    "count/pairs",
)

Normalizer = float | int | torch.Tensor | None


# ------------------------------------------------------------------------------------------- validation


def _uses_kl(loss_type: str) -> bool:
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}: expected one of {KTO_LOSS_TYPES}")
    return loss_type == "kto"


def _check_tokens(name: str, tokens: torch.Tensor, batch: int | None = None) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"{name} has {tokens.shape[0]} rows, expected {batch}")
    if not tokens.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {tokens.dtype}")


def _check_rows(name: str, values: torch.Tensor, batch: int) -> None:
    if tuple(values.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(values.shape)}")


def _normalizer(normalizer: Normalizer, batch: int, device: torch.device) -> float | torch.Tensor:
    """None -> B. A tensor stays a (detached fp32) device tensor, so no host sync is needed."""
    if normalizer is None:
        return float(batch)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        return normalizer.detach().reshape(()).to(device=device, dtype=torch.float32)
    return float(normalizer)


def _kl_tensor(kl: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    kl = torch.as_tensor(kl)
    if kl.numel() != 1:
        raise ValueError(f"kl must be a 0-dim tensor, got shape {tuple(kl.shape)}")
    return kl.detach().reshape(()).to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- references


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask].mean() if bool(mask.any()) else values.new_zeros(())


def kto_loss_reference(
    token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al. 2024) as written in the paper; plain torch autograd."""
    uses_kl = _uses_kl(loss_type)
    _check_tokens("token_logps", token_logps)
    batch = token_logps.shape[0]
    _check_rows("ref_logps", ref_logps, batch)
    _check_rows("labels", labels, batch)
    device = token_logps.device
    labels = labels.to(device=device, dtype=torch.bool)
    z0 = _kl_tensor(kl, device)

    policy_logps = token_logps.float().sum(dim=-1)
    r = policy_logps - ref_logps.detach().to(device=device, dtype=torch.float32)
    if uses_kl:
        desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
        undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    else:  # apo_zero_unpaired: no KL baseline
        desirable = desirable_weight * (1 - torch.sigmoid(beta * r))
        undesirable = undesirable_weight * torch.sigmoid(beta * r)
    losses = torch.where(labels, desirable, undesirable)
    loss = losses.sum() / _normalizer(normalizer, batch, device)

    with torch.no_grad():
        rewards = beta * r
        chosen, rejected = labels, ~labels
        rewards_chosen = _masked_mean(rewards, chosen)
        rewards_rejected = _masked_mean(rewards, rejected)
        values = {
            "loss": loss,
            "kl": z0,
            "rewards/chosen": rewards_chosen,
            "rewards/rejected": rewards_rejected,
            "rewards/margins": rewards_chosen - rewards_rejected,
            "logps/chosen": _masked_mean(policy_logps, chosen),
            "logps/rejected": _masked_mean(policy_logps, rejected),
            "count/chosen": chosen.sum(),
            "count/rejected": rejected.sum(),
        }
        metrics = {k: values[k].detach().to(torch.float32) for k in KTO_METRIC_KEYS}
    return loss, metrics


def spin_loss_reference(
    real_token_logps: torch.Tensor,
    generated_token_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    normalizer: Normalizer = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPIN (Chen et al. 2024) as written in the paper; plain torch autograd."""
    _check_tokens("real_token_logps", real_token_logps)
    batch = real_token_logps.shape[0]
    _check_tokens("generated_token_logps", generated_token_logps, batch)
    _check_rows("ref_real_logps", ref_real_logps, batch)
    _check_rows("ref_generated_logps", ref_generated_logps, batch)
    device = real_token_logps.device

    real_logps = real_token_logps.float().sum(dim=-1)
    generated_logps = generated_token_logps.float().sum(dim=-1)
    real_ratio = real_logps - ref_real_logps.detach().to(device=device, dtype=torch.float32)
    generated_ratio = generated_logps - ref_generated_logps.detach().to(device=device, dtype=torch.float32)
    # -log sigmoid(beta * margin), through the stable logsigmoid (log(sigmoid(x)) is -inf for x << 0)
    losses = -F.logsigmoid(beta * (real_ratio - generated_ratio))
    loss = losses.sum() / _normalizer(normalizer, batch, device)

    with torch.no_grad():
        rewards_real = beta * real_ratio
        rewards_generated = beta * generated_ratio
        values = {
            "loss": loss,
            "rewards/real": rewards_real.mean(),
            "rewards/generated": rewards_generated.mean(),
            "rewards/margins": rewards_real.mean() - rewards_generated.mean(),
            "rewards/accuracy": (rewards_real > rewards_generated).float().mean(),
            "logps/real": real_logps.mean(),
            "logps/generated": generated_logps.mean(),
            "count/pairs": torch.tensor(float(batch), device=device),
        }
        metrics = {k: values[k].detach().to(torch.float32) for k in SPIN_METRIC_KEYS}
    return loss, metrics


# ------------------------------------------------------------------------------ torch implementation
# Same results as the kernels, built from [B] vectors only (no [B, T] intermediates) and no host syncs.


# What the metrics are, given the per-row sums: stated once, for both implementations (the Triton kernels produce the
# same sums, in losses_triton.py).


def kto_stats(sums: torch.Tensor, kl: torch.Tensor, normalizer: float | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KTO's loss and ``KTO_METRIC_KEYS`` from its row sums: (loss, reward of desirable rows, of undesirable rows,
    log-prob of desirable rows, of undesirable rows, count desirable, count undesirable). A mean over no rows is 0."""
    loss = sums[0] / normalizer
    chosen, rejected = sums[5].clamp(min=1.0), sums[6].clamp(min=1.0)
    rewards_chosen, rewards_rejected = sums[1] / chosen, sums[2] / rejected
    stats = torch.stack(
        [
            loss,
            kl,
            rewards_chosen,
            rewards_rejected,
            rewards_chosen - rewards_rejected,
            sums[3] / chosen,
            sums[4] / rejected,
            sums[5],
            sums[6],
        ]
    )
    return loss, stats


def spin_stats(sums: torch.Tensor, normalizer: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPIN's loss and ``SPIN_METRIC_KEYS`` from its row sums: (loss, reward of the real answers, of the generated
    ones, pairs ranked right, log-prob of the real answers, of the generated ones, count)."""
    loss = sums[0] / normalizer
    count = sums[6].clamp(min=1.0)
    rewards_real, rewards_generated = sums[1] / count, sums[2] / count
    stats = torch.stack(
        [
            loss,
            rewards_real,
            rewards_generated,
            rewards_real - rewards_generated,
            sums[3] / count,
            sums[4] / count,
            sums[5] / count,
            sums[6],
        ]
    )
    return loss, stats


# ------------------------------------------------------------------------------ torch implementation
# The per-row formulas, built from [B] vectors only (no [B, T] intermediates) and no host syncs.


def _kto_torch_forward(
    token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    uses_kl: bool,
    normalizer: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq = token_logps.sum(dim=-1, dtype=torch.float32)
    r = seq - ref_logps.float()
    x = beta * (r - kl) if uses_kl else beta * r
    sig_pos, sig_neg = torch.sigmoid(x), torch.sigmoid(-x)
    # 1 - sigmoid(x) written as sigmoid(-x) keeps its digits once sigmoid(x) rounds to 1.
    losses = torch.where(labels, desirable_weight * sig_neg, undesirable_weight * sig_pos)
    weight = torch.where(labels, -desirable_weight, undesirable_weight)
    row_grad = weight * beta * sig_pos * sig_neg / normalizer
    rewards, rejected = beta * r, ~labels
    # where() rather than a product: a masked-out inf would turn 0 * inf into nan
    sums = torch.stack(
        [
            losses.sum(),
            torch.where(labels, rewards, 0.0).sum(),
            torch.where(rejected, rewards, 0.0).sum(),
            torch.where(labels, seq, 0.0).sum(),
            torch.where(rejected, seq, 0.0).sum(),
            labels.sum(dtype=torch.float32),
            rejected.sum(dtype=torch.float32),
        ]
    )
    return (*kto_stats(sums, kl, normalizer), row_grad)


def _spin_torch_forward(
    real_token_logps: torch.Tensor,
    generated_token_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float,
    normalizer: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    real = real_token_logps.sum(dim=-1, dtype=torch.float32)
    generated = generated_token_logps.sum(dim=-1, dtype=torch.float32)
    real_ratio = real - ref_real_logps.float()
    generated_ratio = generated - ref_generated_logps.float()
    x = beta * (real_ratio - generated_ratio)
    row_grad = -beta * torch.sigmoid(-x) / normalizer  # d loss / d real sum; the generated sum gets minus it
    rewards_real, rewards_generated = beta * real_ratio, beta * generated_ratio
    sums = torch.stack(
        [
            F.softplus(-x).sum(),  # softplus(-x) = -logsigmoid(x)
            rewards_real.sum(),
            rewards_generated.sum(),
            (rewards_real > rewards_generated).float().sum(),
            real.sum(),
            generated.sum(),
            torch.full((), float(real.shape[0]), device=real.device),
        ]
    )
    return (*spin_stats(sums, normalizer), row_grad)


def _kto_triton_forward(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel's per-row sums turned into the loss and metrics (``losses_triton.kto_forward``'s args)."""
    row_grad, sums = _triton_module().kto_forward(*args, **kwargs)
    return (*kto_stats(sums, args[3], kwargs["normalizer"]), row_grad)


def _spin_triton_forward(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_grad, sums = _triton_module().spin_forward(*args, **kwargs)
    return (*spin_stats(sums, kwargs["normalizer"]), row_grad)


# ------------------------------------------------------------------------------- autograd Functions


def _triton_module():  # lazy: losses.py must import where Triton is missing
    from fabric_align.kernels import losses_triton

    return losses_triton


class _KTOLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        token_logps: torch.Tensor,
        ref_logps: torch.Tensor,
        labels: torch.Tensor,
        kl: torch.Tensor,
        beta: float,
        desirable_weight: float,
        undesirable_weight: float,
        uses_kl: bool,
        normalizer: float | torch.Tensor,
        triton: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.triton = triton
        if triton:
            loss, stats, row_grad = _kto_triton_forward(
                token_logps,
                ref_logps.contiguous(),
                labels.contiguous(),
                kl,
                beta=beta,
                desirable_weight=desirable_weight,
                undesirable_weight=undesirable_weight,
                use_kl=uses_kl,
                normalizer=normalizer,
            )
        else:
            loss, stats, row_grad = _kto_torch_forward(
                token_logps,
                ref_logps,
                labels,
                kl,
                beta,
                desirable_weight,
                undesirable_weight,
                uses_kl,
                normalizer,
            )
        ctx.save_for_backward(row_grad)
        ctx.token_shape = (token_logps.shape[1], token_logps.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor):
        (row_grad,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            length, dtype = ctx.token_shape
            if ctx.triton:
                (grad,) = _triton_module().broadcast_rows(row_grad, grad_loss, [(length, dtype, 1.0)])
            else:
                grad = (row_grad * grad_loss).to(dtype)[:, None].expand(-1, length)
        return grad, None, None, None, None, None, None, None, None, None


class _SPINLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        real_token_logps: torch.Tensor,
        generated_token_logps: torch.Tensor,
        ref_real_logps: torch.Tensor,
        ref_generated_logps: torch.Tensor,
        beta: float,
        normalizer: float | torch.Tensor,
        triton: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.triton = triton
        if triton:
            loss, stats, row_grad = _spin_triton_forward(
                real_token_logps,
                generated_token_logps,
                ref_real_logps.contiguous(),
                ref_generated_logps.contiguous(),
                beta=beta,
                normalizer=normalizer,
            )
        else:
            loss, stats, row_grad = _spin_torch_forward(
                real_token_logps, generated_token_logps, ref_real_logps, ref_generated_logps, beta, normalizer
            )
        ctx.save_for_backward(row_grad)
        ctx.token_shapes = (
            (real_token_logps.shape[1], real_token_logps.dtype),
            (generated_token_logps.shape[1], generated_token_logps.dtype),
        )
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor):
        (row_grad,) = ctx.saved_tensors
        # (index into the inputs, sign of d margin / d sequence sum)
        wanted = [(i, sign) for i, sign in ((0, 1.0), (1, -1.0)) if ctx.needs_input_grad[i]]
        grads: list[torch.Tensor | None] = [None, None]
        if wanted:
            if ctx.triton:
                targets = [(*ctx.token_shapes[i], sign) for i, sign in wanted]
                outs = _triton_module().broadcast_rows(row_grad, grad_loss, targets)
                for (i, _), out in zip(wanted, outs, strict=True):
                    grads[i] = out
            else:
                scaled = row_grad * grad_loss
                for i, sign in wanted:
                    length, dtype = ctx.token_shapes[i]
                    grads[i] = (scaled if sign > 0 else -scaled).to(dtype)[:, None].expand(-1, length)
        return grads[0], grads[1], None, None, None, None, None


# ------------------------------------------------------------------------------------------ public API


def kto_loss(
    token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    normalizer: Normalizer = None,
    implementation: Implementation | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused KTO loss; same contract as ``kto_loss_reference``. ``implementation``: ``triton``, ``torch`` or ``auto``
    (Triton on CUDA tensors); None: ``FABRIC_ALIGN_KERNELS``, else ``auto``.

    token_logps [B, T] per-token policy log-probs (0 where masked), ref_logps [B] reference sequence
    log-probs, labels [B] bool (True = desirable), kl 0-dim z0 (>= 0, no gradient).
    loss = sum_i L_i / normalizer (None -> B). Gradient flows into token_logps only.
    """
    uses_kl = _uses_kl(loss_type)
    _check_tokens("token_logps", token_logps)
    batch = token_logps.shape[0]
    _check_rows("ref_logps", ref_logps, batch)
    _check_rows("labels", labels, batch)
    device = token_logps.device
    triton = use_triton(token_logps, implementation=implementation)
    if triton:
        ensure_checked("KTO loss", device, token_logps.dtype, _probe_kto, _loss_tolerance(token_logps.dtype))
    loss, stats = _KTOLoss.apply(
        token_logps,
        ref_logps.detach().to(device),
        labels.detach().to(device=device, dtype=torch.bool),
        _kl_tensor(kl, device),
        float(beta),
        float(desirable_weight),
        float(undesirable_weight),
        uses_kl,
        _normalizer(normalizer, batch, device),
        triton,
    )
    return loss, dict(zip(KTO_METRIC_KEYS, stats.unbind(0), strict=True))


def spin_loss(
    real_token_logps: torch.Tensor,
    generated_token_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    normalizer: Normalizer = None,
    implementation: Implementation | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused SPIN loss; same contract as ``spin_loss_reference``; ``implementation`` as for ``kto_loss``.

    real [B, T] and generated [B, T'] per-token policy log-probs (0 where masked; T != T' is fine),
    ref_real / ref_generated [B] reference sequence log-probs.
    loss = sum_i -logsigmoid(beta * margin_i) / normalizer (None -> B). Gradient flows into the token tensors.
    """
    _check_tokens("real_token_logps", real_token_logps)
    batch = real_token_logps.shape[0]
    _check_tokens("generated_token_logps", generated_token_logps, batch)
    _check_rows("ref_real_logps", ref_real_logps, batch)
    _check_rows("ref_generated_logps", ref_generated_logps, batch)
    device = real_token_logps.device
    triton = use_triton(real_token_logps, generated_token_logps, implementation=implementation)
    if triton:
        dtype = real_token_logps.dtype
        ensure_checked("SPIN loss", device, dtype, _probe_spin, _loss_tolerance(dtype))
    loss, stats = _SPINLoss.apply(
        real_token_logps,
        generated_token_logps.to(device),
        ref_real_logps.detach().to(device),
        ref_generated_logps.detach().to(device),
        float(beta),
        _normalizer(normalizer, batch, device),
        triton,
    )
    return loss, dict(zip(SPIN_METRIC_KEYS, stats.unbind(0), strict=True))


# ------------------------------------------------------------------------------------------- self-check


def _loss_tolerance(dtype: torch.dtype) -> float:
    # Both implementations sum the same token values in fp32: only the order of additions differs.
    return 1e-5 if dtype == torch.float32 else 1e-3


def _probe_tokens(gen: torch.Generator, rows: int, length: int) -> torch.Tensor:
    tokens = -torch.rand(rows, length, generator=gen) * 3
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    return torch.where(torch.arange(length)[None, :] < lengths[:, None], tokens, 0.0)  # ragged, 0 where masked


def _probe_kto(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both KTO forwards (loss, metrics, per-row gradient) on an odd batch in two row blocks, several tiles."""
    gen = torch.Generator().manual_seed(0)
    rows, length = 19, 37
    tokens = _probe_tokens(gen, rows, length).to(device=device, dtype=dtype)
    ref = (tokens.float().sum(-1).cpu() + torch.randn(rows, generator=gen) * 2).to(device)
    labels = (torch.rand(rows, generator=gen) < 0.5).to(device)
    kl = torch.tensor(0.3, device=device)
    got = _kto_triton_forward(
        tokens, ref, labels, kl, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, use_kl=True, normalizer=23.0
    )
    want = _kto_torch_forward(tokens, ref, labels, kl, 0.5, 1.3, 0.7, True, 23.0)
    return {name: (g, w) for name, g, w in zip(("loss", "metrics", "row gradient"), got, want, strict=True)}


def _probe_spin(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    rows = 19
    real = _probe_tokens(gen, rows, 37).to(device=device, dtype=dtype)
    generated = _probe_tokens(gen, rows, 29).to(device=device, dtype=dtype)
    ref_real = (real.float().sum(-1).cpu() + torch.randn(rows, generator=gen)).to(device)
    ref_generated = (generated.float().sum(-1).cpu() + torch.randn(rows, generator=gen)).to(device)
    got = _spin_triton_forward(real, generated, ref_real, ref_generated, beta=0.4, normalizer=23.0)
    want = _spin_torch_forward(real, generated, ref_real, ref_generated, 0.4, 23.0)
    return {name: (g, w) for name, g, w in zip(("loss", "metrics", "row gradient"), got, want, strict=True)}
