"""Per-token log-probabilities through the lm_head without materializing N x V logits.

``fused_linear_logprob(hidden, weight, targets)`` returns ``log_softmax(hidden @ weight.T / T)[i,
targets[i]]`` as float32, 0 where ``targets == ignore_index``, differentiable in hidden, weight and bias.

Two implementations share one autograd Function:

- Triton (CUDA; ``logprob_triton.py``): a fused matmul + online log-sum-exp forward that writes O(N) values,
  and a backward that recomputes logits tile by tile.
- Torch (everywhere else): chunks of rows whose fp32 logits fit a fixed element budget; the backward
  recomputes each chunk's logits, so the extra memory is one chunk of logits plus O(N) statistics.

Both first drop the rows whose target is ``ignore_index`` (prompt and padding tokens are often most of the
batch), so those rows cost nothing beyond one host sync.
"""

from __future__ import annotations

import torch
from fabric_align.kernels._dispatch import use_triton

__all__ = ["fused_linear_logprob", "linear_logprob_reference"]

# Torch path: fp32 logits per chunk, in elements (2**24 fp32 = 64 MiB). Tests shrink it to force many chunks.
TORCH_CHUNK_ELEMENTS = 1 << 24


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Naive reference: materializes the full logits. For tests and benchmarks only."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.float() / temperature
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probability of ``targets`` under ``log_softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` (leading dims ``[..., H]`` are flattened), fp32/bf16/fp16.
        weight: ``[V, H]`` lm_head weight (under FSDP2, the unsharded parameter).
        targets: ``[N]`` (or ``hidden.shape[:-1]``) integer token ids; ``ignore_index`` marks skipped rows.
        bias: optional ``[V]``.
        temperature: logits are divided by it after adding the bias.

    Returns:
        float32 tensor shaped like ``targets``; exactly 0 at ignored positions. Gradients flow to hidden,
        weight and bias in their own dtypes. ``hidden`` and ``bias`` are cast to ``weight``'s dtype (or to the
        autocast dtype when autocast is on), like ``nn.Linear`` would compute.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not end in H={width} of weight {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have shape {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [V]=[{vocab}], got {tuple(bias.shape)}")
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    out_shape = targets.shape
    hidden2d = hidden.reshape(-1, width)
    targets1d = targets.reshape(-1).long()

    device_type = hidden.device.type
    dtype = weight.dtype
    if torch.is_autocast_enabled(device_type):
        # Match nn.Linear under autocast; the casts are differentiable so grads still reach fp32 masters.
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
    if hidden2d.dtype != dtype:
        hidden2d = hidden2d.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)

    triton_path = use_triton(hidden2d, weight, targets1d)
    with torch.autocast(device_type, enabled=False):
        logp = _FusedLinearLogprob.apply(
            hidden2d, weight, bias, targets1d, int(ignore_index), temperature, triton_path
        )
    return logp.reshape(out_shape)


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        ignore_index: int,
        temperature: float,
        triton_path: bool,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        vocab = weight.shape[0]
        # One host sync: compacting is worth it since ignored rows are often the majority.
        idx = (targets != ignore_index).nonzero().squeeze(1)
        nv = idx.numel()
        all_valid = nv == n
        t_valid = targets if all_valid else targets.index_select(0, idx)
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        stats = torch.empty(0, dtype=torch.float32, device=hidden.device)
        if nv > 0:
            lo, hi = torch.aminmax(t_valid)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= vocab:
                raise IndexError(
                    f"targets out of range [0, {vocab}): min {lo}, max {hi} (ignore_index={ignore_index})"
                )
            if triton_path:
                from fabric_align.kernels import logprob_triton

                h_valid = hidden if all_valid else hidden.index_select(0, idx)
                logp_v, stats = logprob_triton.forward(h_valid, weight, bias, t_valid, temperature)
            else:
                logp_v, stats = _torch_forward(
                    hidden, None if all_valid else idx, weight, bias, t_valid, temperature
                )
            if all_valid:
                logp = logp_v
            else:
                logp.index_copy_(0, idx, logp_v)
        ctx.save_for_backward(hidden, weight, bias, t_valid, idx, stats)
        ctx.all_valid = all_valid
        ctx.temperature = temperature
        ctx.triton_path = triton_path
        return logp

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, t_valid, idx, stats = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        nv = t_valid.numel()
        d_hidden = d_weight = d_bias = None
        if nv == 0 or not (need_h or need_w or need_b):
            # Explicit zeros rather than None: FSDP2 and optimizers expect a grad on every trained parameter.
            if need_h:
                d_hidden = torch.zeros_like(hidden)
            if need_w:
                d_weight = torch.zeros_like(weight)
            if need_b:
                d_bias = torch.zeros_like(bias)
            return d_hidden, d_weight, d_bias, None, None, None, None

        g = grad_out.float()
        g_valid = (g if ctx.all_valid else g.index_select(0, idx)).contiguous()
        sub_idx = None if ctx.all_valid else idx
        if ctx.triton_path:
            from fabric_align.kernels import logprob_triton

            h_valid = hidden if ctx.all_valid else hidden.index_select(0, idx)
            dh_v, d_weight, d_bias = logprob_triton.backward(
                h_valid, weight, bias, t_valid, stats, g_valid, ctx.temperature, need_h, need_w, need_b
            )
        else:
            dh_v, d_weight, d_bias = _torch_backward(
                hidden,
                sub_idx,
                weight,
                bias,
                t_valid,
                stats,
                g_valid,
                ctx.temperature,
                need_h,
                need_w,
                need_b,
            )
        if need_h:
            d_hidden = dh_v if ctx.all_valid else torch.zeros_like(hidden).index_copy_(0, idx, dh_v)
        return d_hidden, d_weight, d_bias, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Torch path
# ----------------------------------------------------------------------------------------------------------


def _chunk_rows(vocab: int, nv: int) -> int:
    return max(1, min(nv, TORCH_CHUNK_ELEMENTS // vocab))


def _rows(hidden: torch.Tensor, idx: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor:
    # Gather valid rows one chunk at a time so no compacted copy of the whole hidden is kept.
    return hidden[c0:c1] if idx is None else hidden.index_select(0, idx[c0:c1])


def _logits_into(
    out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """out[:] = (h @ weight.T + bias).float() / temperature, without an extra [rows, V] temporary in fp32."""
    alpha = 1.0 / temperature
    if h.dtype == torch.float32:
        # Bias and 1/T folded into the GEMM (beta * bias + alpha * h @ W.T), written straight into the buffer.
        if bias is not None:
            torch.addmm(bias, h, weight.t(), beta=alpha, alpha=alpha, out=out)
        elif temperature != 1.0:
            torch.addmm(out, h, weight.t(), beta=0.0, alpha=alpha, out=out)
        else:
            torch.mm(h, weight.t(), out=out)
    else:
        # Low precision GEMM (fp32 accumulate inside), then widen; bias and 1/T applied in fp32.
        out.copy_(torch.mm(h, weight.t()))
        if bias is not None:
            out.add_(bias)
        if temperature != 1.0:
            out.mul_(alpha)
    return out


def _torch_forward(
    hidden: torch.Tensor,
    idx: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    nv = targets.numel()
    vocab = weight.shape[0]
    rows = _chunk_rows(vocab, nv)
    device = hidden.device
    logp = torch.empty(nv, dtype=torch.float32, device=device)
    lse = torch.empty(nv, dtype=torch.float32, device=device)
    buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    for c0 in range(0, nv, rows):
        c1 = min(nv, c0 + rows)
        z = _logits_into(buf[: c1 - c0], _rows(hidden, idx, c0, c1), weight, bias, temperature)
        target_logit = z.gather(1, targets[c0:c1, None]).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        z.sub_(m).exp_()  # in place: the chunk buffer is the only [rows, V] allocation
        lse_c = z.sum(dim=1).log_().add_(m.squeeze(1))
        lse[c0:c1] = lse_c
        torch.sub(target_logit, lse_c, out=logp[c0:c1])
    return logp, lse


def _torch_backward(
    hidden: torch.Tensor,
    idx: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    temperature: float,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    nv = targets.numel()
    vocab, width = weight.shape
    rows = _chunk_rows(vocab, nv)
    device = hidden.device
    dtype = weight.dtype
    low_precision = dtype != torch.float32

    d_hidden = torch.empty(nv, width, dtype=dtype, device=device) if need_h else None
    # fp32 accumulators; for fp32 weights these are the returned gradients themselves.
    dw32 = torch.zeros(vocab, width, dtype=torch.float32, device=device) if need_w else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    # d logp / d logits = (onehot - softmax) / T, so grad_logits = (softmax - onehot) * s with s = -g / T.
    scale = g * (-1.0 / temperature)
    buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    minus_one = torch.full((rows, 1), -1.0, dtype=torch.float32, device=device)

    for c0 in range(0, nv, rows):
        c1 = min(nv, c0 + rows)
        r = c1 - c0
        h = _rows(hidden, idx, c0, c1)
        z = _logits_into(buf[:r], h, weight, bias, temperature)
        z.sub_(lse[c0:c1, None]).exp_()  # softmax, in place
        z.scatter_add_(1, targets[c0:c1, None], minus_one[:r])  # softmax - onehot
        s = scale[c0:c1, None]
        if low_precision:
            # Round G = (softmax - onehot) * s once, as the naive bf16 graph does, then low-precision GEMMs.
            zg = z.mul_(s).to(dtype)
            if need_h:
                torch.mm(zg, weight, out=d_hidden[c0:c1])
            if need_w:
                dw32.add_(torch.mm(zg.t(), h))
            if need_b:
                db32.add_(z.sum(dim=0))
        else:
            # fp32: apply s to the small [rows, H] operands instead of a pass over the [rows, V] chunk.
            if need_h:
                torch.mm(z, weight, out=d_hidden[c0:c1]).mul_(s)
            if need_w:
                dw32.addmm_(z.t(), h * s)
            if need_b:
                db32.addmv_(z.t(), s.squeeze(1))

    d_weight = None if dw32 is None else (dw32.to(dtype) if low_precision else dw32)
    d_bias = None if db32 is None else db32.to(bias.dtype)
    return d_hidden, d_weight, d_bias
