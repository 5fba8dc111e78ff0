"""Triton kernels for the fused KTO and SPIN losses.

The math of each loss is stated once per implementation: its per-row formula here (a ``*_rows_kernel``) and in the
torch twin of ``losses.py``; what the metrics are, given the per-row sums, is stated once for both
(``losses.kto_stats`` / ``losses.spin_stats``). This module is imported lazily from ``losses.py``, so
``fabric_align.kernels.losses`` imports without Triton.

Forward (``forward_rows``, one launcher for every loss): one program per block of rows loops over the sequence in
tiles, sums each row's token log-probs in fp32, forms the reward against the reference, the per-row loss and its
derivative dL/dr (divided by the normalizer, stored as a ``[B]`` vector), and writes its block's sums of the per-row
values the metrics need (``[programs, NUM_SLOTS]``, added up in a fixed order: deterministic, unlike float atomics).

Backward: one launch broadcasts ``row_grad * grad_loss`` over every token of each row, writing the gradient
in the input dtype; no other ``[B, T]`` tensor is made.

Only exp/log are used (no libdevice), so the kernels also run under the Triton CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile limits; module-level so tests can shrink them to exercise the multi-program and multi-tile paths.
MAX_BLOCK_B = 16
MAX_TILE = 4096  # elements of one [BLOCK_B, BLOCK_T] register tile
MIN_BLOCK_T = 16

NUM_SLOTS = 8  # per-program sums (KTO uses 7, SPIN 7); a power of two for tl.arange


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tile(batch: int, length: int) -> tuple[int, int]:
    block_b = min(_pow2(batch), MAX_BLOCK_B)
    block_t = max(min(_pow2(length), MAX_TILE // block_b), MIN_BLOCK_T)
    return block_b, block_t


def forward_rows(
    kernel: triton.JITFunction, batch: int, length: int, *args, **meta
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a loss's rows kernel over ``batch`` rows of up to ``length`` tokens: returns (row_grad ``[B]``, the
    ``[NUM_SLOTS]`` sums over all rows), both fp32 on the tokens' device. ``args`` are the kernel's own inputs, in
    its order; the launcher adds its outputs (``row_grad_ptr``, ``partial_ptr``), ``B`` and the tiling."""
    device = args[0].device
    block_b, block_t = _tile(batch, length)
    programs = triton.cdiv(batch, block_b)
    row_grad = torch.empty(batch, dtype=torch.float32, device=device)
    partials = torch.empty((programs, NUM_SLOTS), dtype=torch.float32, device=device)
    kernel[(programs,)](*args, row_grad, partials, batch, **meta, NUM=NUM_SLOTS, BLOCK_B=block_b, BLOCK_T=block_t)
    return row_grad, partials[0] if programs == 1 else partials.sum(0)


def normalizer_args(normalizer: float | torch.Tensor, dummy: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """A tensor normalizer is read on the device (no host sync); a number is passed by value."""
    if isinstance(normalizer, torch.Tensor):
        return normalizer, 1.0, True
    return dummy, float(normalizer), False


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _row_sums(ptr, stride_b, stride_t, rows, row_mask, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """fp32 sum over T of each row in ``rows``; masked (padding) tokens are already 0 upstream."""
    acc = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
    row_off = rows.to(tl.int64)[:, None] * stride_b
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        mask = row_mask[:, None] & (cols[None, :] < T)
        vals = tl.load(ptr + row_off + cols.to(tl.int64)[None, :] * stride_t, mask=mask, other=0.0)
        acc += vals.to(tl.float32)
    return tl.sum(acc, axis=1)


@triton.jit
def _sigmoid_pair(x):
    """sigmoid(x), sigmoid(-x) and their product, from exp(-|x|) so nothing overflows."""
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = tl.where(x >= 0, big, small)
    neg = tl.where(x >= 0, small, big)
    return pos, neg, big * small


@triton.jit
def _softplus(z):
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), stable for any z."""
    e = tl.exp(-tl.abs(z))
    # No log1p without libdevice: log(1 + e) drops e's digits once e < ~1e-7, a two-term series keeps them.
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.maximum(z, 0.0) + log1p_e


@triton.jit
def _load_norm(norm_ptr, norm_val, NORM_FROM_PTR: tl.constexpr):
    if NORM_FROM_PTR:
        norm = tl.load(norm_ptr).to(tl.float32)
    else:
        norm = norm_val
    return norm


@triton.jit
def _store_sums(partial_ptr, NUM: tl.constexpr, s0, s1, s2, s3, s4, s5, s6):
    """This program's row sums, in slots 0..6 of its row of the partials (slot 7 unused)."""
    slots = tl.arange(0, NUM)
    values = tl.where(slots == 0, s0, 0.0) + tl.where(slots == 1, s1, 0.0) + tl.where(slots == 2, s2, 0.0)
    values += tl.where(slots == 3, s3, 0.0) + tl.where(slots == 4, s4, 0.0) + tl.where(slots == 5, s5, 0.0)
    values += tl.where(slots == 6, s6, 0.0)
    tl.store(partial_ptr + tl.program_id(0) * NUM + slots, values)


# ------------------------------------------------------------------------------------------------- KTO


@triton.jit
def _kto_fwd_kernel(
    logp_ptr,
    stride_b,
    stride_t,
    T,
    ref_ptr,
    label_ptr,
    kl_ptr,
    norm_ptr,
    beta,
    w_d,
    w_u,
    norm_val,
    row_grad_ptr,
    partial_ptr,
    B,
    USE_KL: tl.constexpr,
    NORM_FROM_PTR: tl.constexpr,
    NUM: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """KTO per row: slots = (loss, reward of desirable rows, of undesirable rows, log-prob of desirable rows, of
    undesirable rows, count desirable, count undesirable), summed over this program's rows."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    seq = _row_sums(logp_ptr, stride_b, stride_t, rows, row_mask, T, BLOCK_B, BLOCK_T)
    ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    desirable = tl.load(label_ptr + rows, mask=row_mask, other=0) != 0
    kl = tl.load(kl_ptr).to(tl.float32)
    norm = _load_norm(norm_ptr, norm_val, NORM_FROM_PTR)

    r = seq - ref
    if USE_KL:
        x = beta * (r - kl)
    else:
        x = beta * r
    sig_pos, sig_neg, sig_prod = _sigmoid_pair(x)
    # Both loss types: desirable w_d * (1 - sigmoid(x)) = w_d * sigmoid(-x), undesirable w_u * sigmoid(x)
    # ("kto": 1 - sigmoid(beta * (z0 - r)) = sigmoid(x)); d sigmoid(x) / dr = beta * sigmoid(x) * sigmoid(-x).
    row_loss = tl.where(desirable, w_d * sig_neg, w_u * sig_pos)
    tl.store(row_grad_ptr + rows, tl.where(desirable, -w_d, w_u) * beta * sig_prod / norm, mask=row_mask)

    chosen = desirable & row_mask
    rejected = (~desirable) & row_mask
    reward = beta * r
    _store_sums(
        partial_ptr,
        NUM,
        tl.sum(tl.where(row_mask, row_loss, 0.0), axis=0),
        tl.sum(tl.where(chosen, reward, 0.0), axis=0),
        tl.sum(tl.where(rejected, reward, 0.0), axis=0),
        tl.sum(tl.where(chosen, seq, 0.0), axis=0),
        tl.sum(tl.where(rejected, seq, 0.0), axis=0),
        tl.sum(chosen.to(tl.float32), axis=0),
        tl.sum(rejected.to(tl.float32), axis=0),
    )


def kto_forward(
    token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    use_kl: bool,
    normalizer: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (row_grad [B] = dloss/dr_i, the KTO row sums [NUM_SLOTS]), fp32.

    ``ref_logps`` [B] contiguous, ``labels`` [B] bool contiguous, ``kl`` 0-dim, all on the tokens' device.
    """
    batch, length = token_logps.shape
    norm_ptr, norm_val, norm_from_ptr = normalizer_args(normalizer, kl)
    return forward_rows(
        _kto_fwd_kernel,
        batch,
        length,
        token_logps,
        token_logps.stride(0),
        token_logps.stride(1),
        length,
        ref_logps,
        labels.view(torch.uint8),  # bool and uint8 share a layout; a plain byte pointer is portable
        kl,
        norm_ptr,
        float(beta),
        float(desirable_weight),
        float(undesirable_weight),
        norm_val,
        USE_KL=use_kl,
        NORM_FROM_PTR=norm_from_ptr,
    )


# ------------------------------------------------------------------------------------------------ SPIN


@triton.jit
def _spin_fwd_kernel(
    real_ptr,
    stride_rb,
    stride_rt,
    T_real,
    gen_ptr,
    stride_gb,
    stride_gt,
    T_gen,
    ref_real_ptr,
    ref_gen_ptr,
    norm_ptr,
    beta,
    norm_val,
    row_grad_ptr,
    partial_ptr,
    B,
    NORM_FROM_PTR: tl.constexpr,
    NUM: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """SPIN per pair: slots = (loss, reward of the real answer, of the generated one, accuracy, log-prob of the
    real answer, of the generated one, count), summed over this program's pairs."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    real = _row_sums(real_ptr, stride_rb, stride_rt, rows, row_mask, T_real, BLOCK_B, BLOCK_T)
    gen = _row_sums(gen_ptr, stride_gb, stride_gt, rows, row_mask, T_gen, BLOCK_B, BLOCK_T)
    r_real = real - tl.load(ref_real_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    r_gen = gen - tl.load(ref_gen_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    norm = _load_norm(norm_ptr, norm_val, NORM_FROM_PTR)

    x = beta * (r_real - r_gen)
    # L = -logsigmoid(x) = softplus(-x); dL/d(real sum) = -beta * sigmoid(-x), minus that for generated
    row_loss = _softplus(-x)
    _, sig_neg, _ = _sigmoid_pair(x)
    tl.store(row_grad_ptr + rows, -beta * sig_neg / norm, mask=row_mask)

    rw_real = beta * r_real
    rw_gen = beta * r_gen
    _store_sums(
        partial_ptr,
        NUM,
        tl.sum(tl.where(row_mask, row_loss, 0.0), axis=0),
        tl.sum(tl.where(row_mask, rw_real, 0.0), axis=0),
        tl.sum(tl.where(row_mask, rw_gen, 0.0), axis=0),
        tl.sum((row_mask & (rw_real > rw_gen)).to(tl.float32), axis=0),
        tl.sum(tl.where(row_mask, real, 0.0), axis=0),
        tl.sum(tl.where(row_mask, gen, 0.0), axis=0),
        tl.sum(row_mask.to(tl.float32), axis=0),
    )


def spin_forward(
    real_token_logps: torch.Tensor,
    generated_token_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    *,
    beta: float,
    normalizer: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (row_grad [B] = dloss/d(real sum), the SPIN row sums [NUM_SLOTS]), fp32. The generated tokens'
    row gradient is ``-row_grad``."""
    batch, t_real = real_token_logps.shape
    t_gen = generated_token_logps.shape[1]
    norm_ptr, norm_val, norm_from_ptr = normalizer_args(normalizer, ref_real_logps)
    return forward_rows(
        _spin_fwd_kernel,
        batch,
        max(t_real, t_gen),
        real_token_logps,
        real_token_logps.stride(0),
        real_token_logps.stride(1),
        t_real,
        generated_token_logps,
        generated_token_logps.stride(0),
        generated_token_logps.stride(1),
        t_gen,
        ref_real_logps,
        ref_generated_logps,
        norm_ptr,
        float(beta),
        norm_val,
        NORM_FROM_PTR=norm_from_ptr,
    )


# -------------------------------------------------------------------------------------------- backward


@triton.jit
def _broadcast_rows_kernel(
    row_grad_ptr,
    grad_out_ptr,
    out1_ptr,
    T1,
    sign1,
    out2_ptr,
    T2,
    sign2,
    B,
    HAS_SECOND: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < B
    g = tl.load(row_grad_ptr + rows, mask=row_mask, other=0.0) * tl.load(grad_out_ptr).to(tl.float32)
    tile = g[:, None] + tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
    rows64 = rows.to(tl.int64)[:, None]
    mask1 = row_mask[:, None] & (cols[None, :] < T1)
    tl.store(out1_ptr + rows64 * T1 + cols[None, :], (tile * sign1).to(out1_ptr.dtype.element_ty), mask=mask1)
    if HAS_SECOND:
        mask2 = row_mask[:, None] & (cols[None, :] < T2)
        tl.store(out2_ptr + rows64 * T2 + cols[None, :], (tile * sign2).to(out2_ptr.dtype.element_ty), mask=mask2)


def broadcast_rows(
    row_grad: torch.Tensor,
    grad_loss: torch.Tensor,
    targets: list[tuple[int, torch.dtype, float]],
) -> list[torch.Tensor]:
    """For each (T, dtype, sign) in ``targets`` (one or two), a contiguous [B, T] tensor of dtype whose row i
    is ``sign * row_grad[i] * grad_loss`` everywhere; one launch writes them all."""
    if not 1 <= len(targets) <= 2:
        raise ValueError("broadcast_rows writes one or two tensors")
    batch = row_grad.shape[0]
    device = row_grad.device
    outs = [torch.empty((batch, length), dtype=dtype, device=device) for length, dtype, _ in targets]
    longest = max(length for length, _, _ in targets)
    if batch == 0 or longest == 0:
        return outs
    block_b, block_t = _tile(batch, longest)
    second = len(targets) == 2
    (t1, _, sign1), (t2, _, sign2) = targets[0], targets[-1]
    grid = (triton.cdiv(batch, block_b), triton.cdiv(longest, block_t))
    _broadcast_rows_kernel[grid](
        row_grad,
        grad_loss.reshape(()).to(torch.float32),
        outs[0],
        t1,
        float(sign1),
        outs[-1],
        t2,
        float(sign2),
        batch,
        HAS_SECOND=second,
        BLOCK_B=block_b,
        BLOCK_T=block_t,
    )
    return outs
