"""Per-token log-probabilities through the lm_head without materializing N x V logits.

``fused_linear_logprob(hidden, weight, targets)`` returns ``log_softmax(hidden @ weight.T / T)[i,
targets[i]]`` as float32, 0 where ``targets == ignore_index``, differentiable in hidden, weight and bias.

Two implementations share one autograd Function:

- Triton (CUDA; ``logprob_triton.py``): a fused matmul + online log-sum-exp forward that writes O(N) values,
  and a backward that recomputes logits tile by tile.
- Torch (everywhere else): chunks of rows whose fp32 logits fit a fixed element budget; the backward
  recomputes each chunk's logits, so the extra memory is one chunk of logits plus O(N) statistics. Two cases
  save that recomputation for an fp32 lm_head (one lm_head GEMM per token fewer; a 16-bit one would need an fp32
  copy of the whole weight on CPU, so it always recomputes):
  - a frozen lm_head (LoRA, QLoRA): the forward already holds each row's softmax, so it also computes the
    gradient's ``[N, H]`` factor ``(softmax - onehot) @ W``; the backward only scales it by the upstream
    gradient. Exact, and no larger buffer than a chunk.
  - ``keep_softmax_bytes``: a trained lm_head keeps ``softmax - onehot`` of the valid rows (``N x V`` fp32) from
    the forward for the backward when it fits this many bytes: speed for memory, off by default.

Both first drop the rows whose target is ``ignore_index`` (prompt and padding tokens are often most of the
batch), so those rows cost nothing beyond one host sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from fabric_align.kernels._dispatch import Implementation, use_triton
from fabric_align.kernels.selfcheck import TF32_TOLERANCE, TOLERANCE, ensure_checked

__all__ = ["fused_linear_logprob", "linear_logprob_reference"]

# Torch path: fp32 logits per chunk, in elements (2**24 fp32 = 64 MiB), and the fewest vocabulary columns per
# chunk before it splits rows instead. Tests shrink both to force many ragged chunks.
TORCH_CHUNK_ELEMENTS = 1 << 24
TORCH_MIN_COLS = 1024


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Naive reference: materializes the full logits (in fp32, whatever the inputs' dtype, as both kernels keep
    them). For tests and benchmarks only."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(wide) @ weight.to(wide).T
    if bias is not None:
        logits = logits + bias.to(wide)
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
    implementation: Implementation | None = None,
    keep_softmax_bytes: int = 0,
) -> torch.Tensor:
    """Log-probability of ``targets`` under ``log_softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` (leading dims ``[..., H]`` are flattened), fp32/bf16/fp16.
        weight: ``[V, H]`` lm_head weight (under FSDP2, the unsharded parameter).
        targets: ``[N]`` (or ``hidden.shape[:-1]``) integer token ids; ``ignore_index`` marks skipped rows.
        bias: optional ``[V]``.
        temperature: logits are divided by it after adding the bias.
        implementation: ``triton``, ``torch`` or ``auto`` (Triton on CUDA tensors); None: ``FABRIC_ALIGN_KERNELS``.
        keep_softmax_bytes: torch path, trained fp32 lm_head: keep the valid rows' softmax from the forward for
            the backward when it fits this many bytes, instead of recomputing their logits. The Triton kernels
            always recompute.

    Returns:
        float32 tensor shaped like ``targets``; exactly 0 at ignored positions. Gradients flow to hidden,
        weight and bias in their own dtypes. ``hidden`` and ``bias`` are cast to ``weight``'s dtype (or to the
        autocast dtype when autocast is on), like ``nn.Linear`` would compute.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not end in H={width} of weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have shape {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [V]=[{vocab}], got {tuple(bias.shape)}")
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if keep_softmax_bytes < 0:
        raise ValueError(f"keep_softmax_bytes must be >= 0, got {keep_softmax_bytes}")
    # Under no_grad a Function still sees needs_input_grad from requires_grad: whether a backward can follow is
    # only known here.
    trained = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    grad_follows = torch.is_grad_enabled() and any(trained)

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

    # The Triton kernels take 16-bit and fp32 inputs (tl.dot has no fp64 form on GPUs); fp64 goes to torch.
    triton_path = dtype in (torch.float32, torch.bfloat16, torch.float16) and use_triton(
        hidden2d, weight, targets1d, implementation=implementation
    )
    if triton_path and dtype == torch.bfloat16 and not hidden2d.is_cuda:
        # Forced Triton on CPU tensors runs in the interpreter, whose bf16 tl.dot returns garbage (not an error).
        raise ValueError(
            "FABRIC_ALIGN_KERNELS=triton with bf16 CPU tensors: the Triton interpreter computes bf16 dots wrongly; "
            "use fp32/fp16 inputs, or the torch path on CPU"
        )
    with torch.autocast(device_type, enabled=False):
        if triton_path:
            ensure_checked("log-prob", hidden2d.device, dtype, _probe, _tolerance(dtype, hidden2d.device))
        early = _early_gradient(trained, grad_follows, keep_softmax_bytes // 4)
        logp = _FusedLinearLogprob.apply(
            hidden2d, weight, bias, targets1d, int(ignore_index), temperature, triton_path, early
        )
    return logp.reshape(out_shape)


# What the torch path's forward computes for the backward besides the log-sum-exp (``_early_gradient``).
RECOMPUTE, HIDDEN_FACTOR, KEEP_SOFTMAX = "recompute", "hidden-factor", "keep-softmax"


def _early_gradient(trained: tuple[bool, bool, bool], grad_follows: bool, keep_elements: int) -> tuple[str, int]:
    """``(HIDDEN_FACTOR, 0)`` when only ``hidden`` is trained (a frozen lm_head), ``(KEEP_SOFTMAX, keep_elements)``
    when the lm_head is trained and up to ``keep_elements`` fp32 probabilities may be kept, else ``(RECOMPUTE, 0)``.
    The torch forward applies it if its rows fit (``_torch_mode``); the Triton path ignores it."""
    if not grad_follows:
        return RECOMPUTE, 0
    if trained == (True, False, False):
        return HIDDEN_FACTOR, 0
    if keep_elements > 0 and (trained[1] or trained[2]):
        return KEEP_SOFTMAX, keep_elements
    return RECOMPUTE, 0


def _tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and device.type == "cuda":
        from fabric_align.kernels.logprob_triton import _dot_precision

        return TF32_TOLERANCE if _dot_precision(dtype) == "tf32" else TOLERANCE[dtype]
    return TOLERANCE[dtype]


def _probe(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Forward and backward of both implementations on a small problem with ragged tiles, ignored rows and a bias
    (tiny under the Triton interpreter, which is slow)."""
    interpreting = device.type != "cuda"
    n, width, vocab = (21, 32, 80) if interpreting else (300, 256, 5000)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * (2.0 / width**0.5)
    bias = torch.randn(vocab, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.25] = -100
    upstream = torch.randn(n, generator=gen)
    results = {}
    for triton_path in (True, False):
        h, w, b = (x.to(device=device, dtype=dtype).requires_grad_() for x in (hidden, weight, bias))
        with torch.enable_grad():
            logp = _FusedLinearLogprob.apply(h, w, b, targets.to(device), -100, 1.0, triton_path, (RECOMPUTE, 0))
            grads = torch.autograd.grad(logp, (h, w, b), upstream.to(device))
        results[triton_path] = (logp, *grads)
    names = ("logp", "d_hidden", "d_weight", "d_bias")
    return {name: (results[True][i], results[False][i]) for i, name in enumerate(names)}


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
        early: tuple[str, int],
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
        ctx.mode, early_result = RECOMPUTE, None
        if nv > 0:
            lo, hi = torch.stack(torch.aminmax(t_valid)).tolist()  # one host sync for both bounds
            if lo < 0 or hi >= vocab:
                raise IndexError(f"targets out of range [0, {vocab}): min {lo}, max {hi} (ignore_index={ignore_index})")
            if triton_path:
                from fabric_align.kernels import logprob_triton

                h_valid = hidden if all_valid else hidden.index_select(0, idx)
                logp_v, stats = logprob_triton.forward(h_valid, weight, bias, t_valid, temperature)
            else:
                ctx.mode = _torch_mode(early, nv, weight)
                lm = _LMHead(hidden, None if all_valid else idx, weight, bias, t_valid, temperature, ctx.mode)
                logp_v, stats, early_result = _torch_forward(lm)
            if all_valid:
                logp = logp_v
            else:
                logp.index_copy_(0, idx, logp_v)
        # Saved, not kept on ctx: freed with the graph's other saved tensors, and seen by saved-tensor hooks and
        # non-reentrant checkpointing, which would otherwise hold it beside the one their recomputation makes.
        ctx.save_for_backward(hidden, weight, bias, t_valid, idx, stats, early_result)
        ctx.all_valid = all_valid
        ctx.temperature = temperature
        ctx.triton_path = triton_path
        return logp

    @staticmethod
    @once_differentiable  # a double backward would miss the softmax's own dependence on hidden: refused, not wrong
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, t_valid, idx, stats, early = ctx.saved_tensors
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
            return d_hidden, d_weight, d_bias, None, None, None, None, None

        g = grad_out.float()
        g_valid = (g if ctx.all_valid else g.index_select(0, idx)).contiguous()
        sub_idx = None if ctx.all_valid else idx
        if ctx.mode == HIDDEN_FACTOR:
            # d logp / d hidden = (onehot - softmax) @ W / T: the forward computed (softmax - onehot) @ W.
            dh_v = (early * (g_valid * (-1.0 / ctx.temperature))[:, None]).to(hidden.dtype) if need_h else None
        elif ctx.triton_path:
            from fabric_align.kernels import logprob_triton

            h_valid = hidden if ctx.all_valid else hidden.index_select(0, idx)
            dh_v, d_weight, d_bias = logprob_triton.backward(
                h_valid, weight, bias, t_valid, stats, g_valid, ctx.temperature, need_h, need_w, need_b
            )
        else:
            lm = _LMHead(hidden, sub_idx, weight, bias, t_valid, ctx.temperature, ctx.mode)
            dh_v, d_weight, d_bias = _torch_backward(lm, stats, g_valid, need_h, need_w, need_b, early)
        if need_h:
            d_hidden = dh_v if ctx.all_valid else torch.zeros_like(hidden).index_copy_(0, idx, dh_v)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Torch path
# ----------------------------------------------------------------------------------------------------------


def _plan(nv: int, vocab: int, mode: str = RECOMPUTE) -> tuple[int, int]:
    """Chunk shape (rows, cols) with rows * cols <= TORCH_CHUNK_ELEMENTS (at least one row of TORCH_MIN_COLS).

    All valid rows in one row block whenever the vocabulary can be split into chunks of at least
    ``TORCH_MIN_COLS`` columns: then every slice of the weight gradient is written exactly once, and only the
    small ``[N, H]`` hidden gradient is accumulated across vocabulary chunks. Usually N < V, which makes this
    far cheaper than re-reading and re-writing a ``[V, H]`` accumulator for every block of rows.

    The forward of the other modes needs each row's whole softmax in one chunk: ``HIDDEN_FACTOR`` takes blocks of
    rows x the whole vocabulary (no weight gradient to write), ``KEEP_SOFTMAX`` one chunk of everything.
    """
    if mode == KEEP_SOFTMAX:
        return nv, vocab
    if mode == HIDDEN_FACTOR:
        return min(nv, max(1, TORCH_CHUNK_ELEMENTS // vocab)), vocab
    cols = min(vocab, max(TORCH_MIN_COLS, TORCH_CHUNK_ELEMENTS // max(nv, 1)))
    rows = min(nv, max(1, TORCH_CHUNK_ELEMENTS // cols))
    return rows, cols


def _torch_mode(early: tuple[str, int], nv: int, weight: torch.Tensor) -> str:
    """The forward's mode for ``nv`` valid rows: ``early``'s, unless the lm_head is not fp32 (a 16-bit one's
    whole-vocabulary chunks would widen the whole weight to fp32 on CPU, and its low-precision gradient rounds the
    softmax in place) or a kept softmax would not fit its budget."""
    mode, keep_elements = early
    if weight.dtype != torch.float32 or (mode == KEEP_SOFTMAX and nv * weight.shape[0] > keep_elements):
        return RECOMPUTE
    return mode


def _logits_into(
    out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """out[:] = (h @ weight.T + bias).float() / temperature, without an extra [rows, cols] fp32 temporary."""
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
        # 16-bit operands, fp32 logits (as the Triton kernel keeps them): rounding the logits to bf16 would cost up
        # to 0.25 nats at |logit| ~ 60, and fp16 overflows past 65504. Bias and 1/T are applied in fp32.
        mm_fp32(out, h, weight.t())
        if bias is not None:
            out.add_(bias)
        if temperature != 1.0:
            out.mul_(alpha)
    return out


def _target_cols(targets: torch.Tensor, v0: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets as column indices into the chunk [v0, v0 + cols) (clamped) and whether they fall inside it."""
    local = targets - v0
    inside = (local >= 0) & (local < cols)
    return local.clamp_(0, cols - 1).unsqueeze(1), inside


def mm_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) = a @ b for 16-bit a and b, the product never rounded to 16 bits: on CUDA a 16-bit GEMM with an
    fp32 output, elsewhere (CPU has no such GEMM) an fp32 GEMM of the widened operands, a row block and a
    vocabulary chunk at a time. (fp64: an fp64 GEMM, then rounded.)"""
    if a.dtype == torch.float64:
        out.copy_(torch.mm(a, b))
        return
    if out.is_cuda:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):  # no fp32-output GEMM for this dtype or device
            pass
    torch.mm(a.float(), b.float(), out=out)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a32: torch.Tensor | None = None) -> None:
    """acc (fp32) += a @ b without rounding the partial product to a low-precision a's dtype: on CUDA a 16-bit GEMM
    with an fp32 output, elsewhere an fp32 GEMM (``a32``: a in fp32, when the caller already has it)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):  # no fp32-output GEMM for this dtype or device
            pass
    acc.addmm_(a.float() if a32 is None else a32, b.float())


@dataclass
class _LMHead:
    """What one call reads: the hidden states (``idx``: the indices of the valid rows, None when all are valid), the
    lm_head's weight and bias, the valid rows' targets and the temperature; and what the forward keeps for the
    backward (``mode``)."""

    hidden: torch.Tensor
    idx: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    temperature: float
    mode: str = RECOMPUTE

    @property
    def plan(self) -> tuple[int, int]:
        """The chunk shape (rows, cols) for these rows and this vocabulary (``_plan``)."""
        return _plan(self.targets.numel(), self.weight.shape[0], self.mode)

    def blocks(self) -> Iterator[tuple[int, int, Iterator[tuple[int, int]]]]:
        """Row blocks ``(r0, r1, chunks)``, each with its vocabulary chunks ``(v0, v1)``."""
        nv, vocab = self.targets.numel(), self.weight.shape[0]
        rows, cols = self.plan
        for r0 in range(0, nv, rows):
            yield r0, min(nv, r0 + rows), ((v0, min(vocab, v0 + cols)) for v0 in range(0, vocab, cols))

    def chunk_elements(self) -> int:
        rows, cols = self.plan
        return rows * cols

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        # Gather valid rows one block at a time so no compacted copy of the whole hidden is kept.
        return self.hidden[r0:r1] if self.idx is None else self.hidden.index_select(0, self.idx[r0:r1])

    def logits_into(self, buf: torch.Tensor, h: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """The fp32 logits of rows ``h`` over the vocabulary chunk [v0, v1), written into the front of ``buf``."""
        z = buf[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0)
        return _logits_into(z, h, self.weight[v0:v1], None if self.bias is None else self.bias[v0:v1], self.temperature)


def _torch_forward(lm: _LMHead) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs and log-sum-exps of the valid rows, and what ``lm.mode`` computes early for the backward: the fp32
    ``(softmax - onehot) @ W`` rows ``[nv, H]`` (``HIDDEN_FACTOR``), or ``softmax - onehot`` ``[nv, V]``
    (``KEEP_SOFTMAX``), else None."""
    nv, device = lm.targets.numel(), lm.hidden.device
    logp = torch.empty(nv, dtype=torch.float32, device=device)
    lse = torch.empty(nv, dtype=torch.float32, device=device)
    buf = torch.empty(lm.chunk_elements(), dtype=torch.float32, device=device)  # the only [rows, cols] allocation
    early = None
    if lm.mode == HIDDEN_FACTOR:
        early = torch.empty(nv, lm.weight.shape[1], dtype=torch.float32, device=device)
    elif lm.mode == KEEP_SOFTMAX:
        early = buf.view(nv, lm.weight.shape[0])  # one chunk of all valid rows, kept
    for r0, r1, chunks in lm.blocks():
        h = lm.rows(r0, r1)
        t = lm.targets[r0:r1]
        m_run = torch.full((r1 - r0,), float("-inf"), device=device)
        s_run = torch.zeros(r1 - r0, device=device)
        target_logit = torch.zeros(r1 - r0, device=device)
        for v0, v1 in chunks:
            z = lm.logits_into(buf, h, v0, v1)
            local, inside = _target_cols(t, v0, v1 - v0)
            target_logit += z.gather(1, local).squeeze(1) * inside
            # Online log-sum-exp across vocabulary chunks; exp in place: the chunk stays the only big buffer.
            m_new = torch.maximum(m_run, z.amax(dim=1))
            z.sub_(m_new[:, None]).exp_()
            s_run = s_run * torch.exp(m_run - m_new) + z.sum(dim=1)
            m_run = m_new
        lse_b = m_run + s_run.log()
        lse[r0:r1] = lse_b
        torch.sub(target_logit, lse_b, out=logp[r0:r1])
        if early is not None:  # the block's one chunk holds exp(logits - max) over the whole vocabulary
            z.div_(s_run[:, None])
            z.scatter_add_(1, t.unsqueeze(1), torch.full((r1 - r0, 1), -1.0, device=device))  # softmax - onehot
            if lm.mode == HIDDEN_FACTOR:
                torch.mm(z, lm.weight, out=early[r0:r1])
    return logp, lse, early


class _TorchGradients:
    """The gradients of one backward, filled chunk by chunk: d_hidden per row block (summed over the vocabulary
    chunks), d_weight and d_bias per vocabulary chunk (summed over the row blocks).

    With all valid rows in one block, each weight-gradient slice is written once, in the weight's dtype; otherwise it
    is accumulated in fp32. fp32 applies the upstream scale ``s`` to the small [rows, H] operands; low precision
    rounds G = (softmax - onehot) * s once per chunk, as the naive low-precision graph does."""

    def __init__(self, lm: _LMHead, need_h: bool, need_w: bool, need_b: bool) -> None:
        nv, (vocab, width) = lm.targets.numel(), lm.weight.shape
        rows, cols = lm.plan
        self.one_row_block, self.one_col_chunk = rows >= nv, cols >= vocab
        self.dtype, self.device, self.bias = lm.weight.dtype, lm.hidden.device, lm.bias
        self.low_precision = self.dtype != torch.float32
        self.need_h, self.need_w = need_h, need_w
        self.d_hidden = torch.empty(nv, width, dtype=self.dtype, device=self.device) if need_h else None
        self.d_weight = self.dw32 = None
        if need_w and self.one_row_block:
            self.d_weight = torch.empty(vocab, width, dtype=self.dtype, device=self.device)
        elif need_w:  # for fp32 weights, the result itself
            self.dw32 = torch.zeros(vocab, width, dtype=torch.float32, device=self.device)
        self.db32 = torch.zeros(vocab, dtype=torch.float32, device=self.device) if need_b else None

    def begin_rows(self, r0: int, r1: int, h: torch.Tensor, s: torch.Tensor) -> None:
        self.r0, self.r1, self.h, self.s = r0, r1, h, s
        self.hs = None if self.low_precision or not self.need_w else h * s
        self.dh_acc = None  # d_hidden summed over several vocabulary chunks: in place for fp32, else in fp32 aside
        if self.need_h and not self.one_col_chunk:
            block = self.d_hidden[r0:r1]
            self.dh_acc = torch.zeros(block.shape, device=self.device) if self.low_precision else block.zero_()

    def add(self, z: torch.Tensor, w_c: torch.Tensor, v0: int, v1: int) -> None:
        """Add one chunk's share, ``z = softmax - onehot`` in fp32 (overwritten)."""
        r0, r1, h, s = self.r0, self.r1, self.h, self.s
        if self.low_precision:
            zg = z.mul_(s).to(self.dtype)
            if self.need_h:
                if self.dh_acc is None:
                    torch.mm(zg, w_c, out=self.d_hidden[r0:r1])
                else:
                    accumulate_mm(self.dh_acc, zg, w_c, a32=z)
            if self.need_w:
                if self.one_row_block:
                    torch.mm(zg.t(), h, out=self.d_weight[v0:v1])
                else:
                    accumulate_mm(self.dw32[v0:v1], zg.t(), h, a32=z.t())
            if self.db32 is not None:
                self.db32[v0:v1].add_(z.sum(dim=0))
            return
        if self.need_h:
            if self.dh_acc is None:
                torch.mm(z, w_c, out=self.d_hidden[r0:r1])
            else:
                self.dh_acc.addmm_(z, w_c)
        if self.need_w:
            if self.one_row_block:
                torch.mm(z.t(), self.hs, out=self.d_weight[v0:v1])
            else:
                self.dw32[v0:v1].addmm_(z.t(), self.hs)
        if self.db32 is not None:
            self.db32[v0:v1].addmv_(z.t(), s.squeeze(1))

    def end_rows(self) -> None:
        if self.need_h and not self.low_precision:
            self.d_hidden[self.r0 : self.r1].mul_(self.s)
        elif self.dh_acc is not None:
            self.d_hidden[self.r0 : self.r1] = self.dh_acc

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        d_weight = self.d_weight
        if self.dw32 is not None:
            d_weight = self.dw32.to(self.dtype) if self.low_precision else self.dw32
        d_bias = None if self.db32 is None else self.db32.to(self.bias.dtype)
        return self.d_hidden, d_weight, d_bias


def _torch_backward(
    lm: _LMHead,
    lse: torch.Tensor,
    g: torch.Tensor,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients from the upstream ``g`` of the valid rows' log-probs; ``kept``: the forward's fp32
    ``softmax - onehot`` of all of them (``KEEP_SOFTMAX``), read instead of recomputed logits."""
    grads = _TorchGradients(lm, need_h, need_w, need_b)
    # d logp / d logits = (onehot - softmax) / T, so grad_logits = (softmax - onehot) * s with s = -g / T.
    scale = g * (-1.0 / lm.temperature)
    if kept is not None:
        grads.begin_rows(0, kept.shape[0], lm.rows(0, kept.shape[0]), scale[:, None])
        grads.add(kept, lm.weight, 0, kept.shape[1])
        grads.end_rows()
        return grads.result()
    buf = torch.empty(lm.chunk_elements(), dtype=torch.float32, device=lm.hidden.device)
    for r0, r1, chunks in lm.blocks():
        h = lm.rows(r0, r1)
        grads.begin_rows(r0, r1, h, scale[r0:r1, None])
        for v0, v1 in chunks:
            z = lm.logits_into(buf, h, v0, v1)
            z.sub_(lse[r0:r1, None]).exp_()  # softmax, in place
            local, inside = _target_cols(lm.targets[r0:r1], v0, v1 - v0)
            z.scatter_add_(1, local, inside.to(torch.float32).neg_().unsqueeze(1))  # softmax - onehot
            grads.add(z, lm.weight[v0:v1], v0, v1)
        grads.end_rows()
    return grads.result()
