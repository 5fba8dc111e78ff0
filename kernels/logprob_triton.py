"""Triton kernels behind ``fused_linear_logprob`` (CUDA; on CPU only under ``TRITON_INTERPRET=1``).

Imported lazily by ``logprob.py``; rows whose target is ``ignore_index`` are already dropped by the caller, so
every row here is a valid token and ``targets`` are in ``[0, V)``.

Forward (``_fwd_kernel``): one program owns ``BLOCK_N`` rows and a contiguous span of the vocabulary. For
each ``BLOCK_V`` vocabulary tile it computes the logits tile with ``tl.dot`` (fp32 accumulation over H), then
folds it into an online log-sum-exp (running max and scaled sum, in base 2) and picks out the target logit.
Only O(N) partial statistics leave the chip: ``[n_splits, N]`` maxima, sums and target logits, merged on the
host. Splitting the vocabulary gives enough programs when N is small; launching all splits of a few row blocks
together keeps those row panels of ``hidden`` and the splits' current ``weight`` tiles in L2 at the same time.

Backward: ``dH = G @ W`` and ``dW = G.T @ Hd`` with ``G = (softmax - onehot) * (-g / T)``. The reduction
dimension of each is the one the other keeps, and H (thousands) is far too wide for a per-program
``[BLOCK, H]`` fp32 accumulator in registers, so a fully fused kernel would need fp32 atomics on ``dH`` and
``dW`` from every ``(row, vocab)`` tile; at H=4096, V=128k that is hundreds of GB of atomic traffic. Instead
the vocabulary is walked in chunks: ``_grad_logits_kernel`` recomputes a ``[N, chunk]`` slab of logits tile
by tile (``tl.dot``, fp32) and writes ``G`` for that slab in the input dtype into one reusable buffer (memory
is bounded by ``GRAD_CHUNK_ELEMENTS``, never N x V); cuBLAS then does ``dW[chunk] = G.T @ Hd`` (fp32
accumulation inside the GEMM, each chunk owns its rows of ``dW``) and ``dH += G @ W[chunk]`` into an fp32
accumulator. No tile is skipped: the result is the exact gradient up to rounding, at the cost of 4
GEMM-equivalents (forward, recompute, dH, dW).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from fabric_align.kernels.logprob import accumulate_mm

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Backward: elements of the reusable grad-logits buffer [N, chunk] (2**27 bf16 = 256 MiB).
GRAD_CHUNK_ELEMENTS = 1 << 27

# Test hook: explicit meta-parameters instead of autotuning (see ``override_config``).
_OVERRIDE: dict[str, int] = {}
_OVERRIDE_KEYS = {
    "BLOCK_N",
    "BLOCK_V",
    "BLOCK_K",
    "GROUP_N",
    "num_warps",
    "num_stages",
    "SPLIT_COLS",
    "CHUNK_COLS",
}
_GPU_DEFAULT = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_N": 8, "num_warps": 8, "num_stages": 3}
# Under the interpreter autotuning would only cost time; tl.dot there needs block dims >= 16.
_INTERPRETER_DEFAULT = {
    "BLOCK_N": 16,
    "BLOCK_V": 32,
    "BLOCK_K": 16,
    "GROUP_N": 2,
    "num_warps": 4,
    "num_stages": 1,
}


@contextlib.contextmanager
def override_config(**kwargs: int) -> Iterator[None]:
    """Pin tile sizes (``BLOCK_N``, ``BLOCK_V``, ``BLOCK_K``, ``GROUP_N``, ``num_warps``, ``num_stages``), the
    forward's vocabulary span per program (``SPLIT_COLS``) and the backward chunk width (``CHUNK_COLS``)."""
    unknown = set(kwargs) - _OVERRIDE_KEYS
    if unknown:
        raise KeyError(f"unknown override(s) {sorted(unknown)}; expected a subset of {sorted(_OVERRIDE_KEYS)}")
    saved = dict(_OVERRIDE)
    _OVERRIDE.update(kwargs)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _meta() -> dict[str, int] | None:
    """Explicit tile config (overrides on top of a default), or None to autotune."""
    blocks = {k: v for k, v in _OVERRIDE.items() if k not in ("SPLIT_COLS", "CHUNK_COLS")}
    if _interpreting():
        return {**_INTERPRETER_DEFAULT, **blocks}
    return {**_GPU_DEFAULT, **blocks} if blocks else None


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision. Only fp32 inputs care (16-bit inputs ignore it): follow torch's matmul
    setting, so fp32 results match torch's. Torch 2.9+ has ``fp32_precision`` ("tf32"/"ieee"/"none"); reading
    the legacy ``allow_tf32`` raises once the new API has been used, so ask the new one first."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is not None and setting != "none":
        return "tf32" if setting == "tf32" else "ieee"
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:
        return "ieee"


# Tile configs for H100/H200 (227 KB of shared memory per block); a tile stage takes (BN + BV) * BK * element
# bytes. Compiled for sm_90a (without a GPU, through Triton's AOT path): with 16-bit inputs the 256-wide tiles spill
# registers in the forward (its online-LSE epilogue holds more state) but not in the gradient kernel; fp32 inputs
# need BLOCK_K=64 to fit shared memory on tensor cores (tf32), and BLOCK_K=32 without them (ieee: FMA dots, whose
# 128x128 tiles spill at BLOCK_K=64). ``_prune`` keeps the configs that suit the launch's dtype and precision.
_WIDE = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 64, 4, 3)]
_TENSOR_CORE = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 2), (64, 128, 64, 4, 4)]
_FMA = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
_SHARED_MEMORY = 227 * 1024


def _configs(shapes: list[tuple[int, int, int, int, int]], with_group: bool) -> list[triton.Config]:
    out = []
    for bn, bv, bk, warps, stages in shapes:
        meta = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}
        if with_group:
            meta["GROUP_N"] = 8
        out.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return out


def _shared_memory(device: torch.device) -> int:
    """Shared memory a block may use on ``device`` (Triton's own query); Hopper's when it cannot be asked."""
    if device.type != "cuda":
        return _SHARED_MEMORY
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])
    except Exception:  # an older Triton or a stand-in driver: assume Hopper
        return _SHARED_MEMORY


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Configs that fit this device's shared memory and suit the dot's precision (BLOCK_K=32 for FMA dots)."""
    hidden = named_args["h_ptr"]
    element, budget = hidden.element_size(), _shared_memory(hidden.device)
    fma = kwargs.get("DOT_PRECISION") == "ieee" and element == 4
    fitting = []
    for config in configs:
        meta = config.kwargs
        tile = (meta["BLOCK_N"] + meta["BLOCK_V"]) * meta["BLOCK_K"] * element * config.num_stages
        if tile <= budget:
            fitting.append(config)
    kept = [c for c in fitting if (c.kwargs["BLOCK_K"] <= 32) == fma]
    # On GPUs with less shared memory (A100: 163 KiB, consumer cards: ~99 KiB) fp32 tensor-core tiles may not fit:
    # fall back to the small FMA-sized tiles, which fit everywhere, rather than to a config that cannot launch.
    return kept or fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_K"] * c.num_stages)]


@triton.jit(do_not_specialize=["N", "span", "N_BUCKET"])
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    max_ptr,
    sum_ptr,
    tgt_ptr,
    N,
    V,
    K,
    span,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    scale,
    N_BUCKET,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Splits of the same row block are adjacent program ids: programs resident together share row panels of
    # hidden and walk different vocabulary spans, so both operands of the concurrent tiles stay in L2.
    pid = tl.program_id(0)
    n_splits = tl.cdiv(V, span)
    pid_n = pid // n_splits
    pid_s = pid % n_splits

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn

    m_run = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_run = tl.zeros([BLOCK_N], tl.float32)
    t_run = tl.zeros([BLOCK_N], tl.float32)
    v_lo = pid_s * span
    v_hi = tl.minimum(v_lo + span, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            h = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        # Base-2 logits (scale = log2(e) / T): exp2 is the native instruction.
        z = tl.where(col_mask[None, :], acc * scale, float("-inf"))
        # col_mask matters: a target in the next span can match a masked (-inf) column of this span's tail.
        hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
        t_run += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        s_run = s_run * tl.exp2(m_run - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        m_run = m_new

    out = pid_s * N + rows
    tl.store(max_ptr + out, m_run, mask=row_mask)
    tl.store(sum_ptr + out, s_run, mask=row_mask)
    tl.store(tgt_ptr + out, t_run, mask=row_mask)


@triton.jit(do_not_specialize=["N", "VC", "v_start", "N_BUCKET"])
def _grad_logits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    lse_ptr,
    g_ptr,
    out_ptr,
    N,
    VC,
    K,
    v_start,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_on,
    scale,
    neg_inv_temp,
    N_BUCKET,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped ordering: GROUP_N row blocks sweep the same weight tiles back to back, for L2 reuse of both.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(VC, BLOCK_V)
    per_group = GROUP_N * num_pid_v
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = local < VC
    cols = v_start + local
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv

    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        h = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    p = tl.exp2(acc * scale - lse2[:, None])  # softmax in base 2 (lse2 = log2-sum-exp2 of the scaled logits)
    onehot = cols[None, :] == tgt[:, None]
    grad = (p - tl.where(onehot, 1.0, 0.0)) * (g * neg_inv_temp)[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_on + local[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=mask)


_fwd_tuned = triton.autotune(
    configs=_configs(_TENSOR_CORE + _FMA, with_group=False),
    key=["K", "V", "N_BUCKET", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_fwd_kernel)
_grad_tuned = triton.autotune(
    configs=_configs(_TENSOR_CORE + _WIDE + _FMA, with_group=True),
    key=["K", "N_BUCKET", "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_grad_logits_kernel)


def _launch(tuned, raw, grid, args: tuple, constexprs: dict, group: bool) -> None:
    # Triton launches on the current CUDA device, not the tensors': make them the same.
    device = args[0].device
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    meta = _meta()
    with guard:
        if meta is None:
            tuned[grid](*args, **constexprs)
            return
        launch = {k: meta[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K", "num_warps", "num_stages")}
        if group:
            launch["GROUP_N"] = meta["GROUP_N"]
        raw[grid](*args, **constexprs, **launch)


def _splits(nv: int, vocab: int, device: torch.device) -> int:
    """Vocabulary columns per forward program, a multiple of every BLOCK_V."""
    if "SPLIT_COLS" in _OVERRIDE:
        return int(_OVERRIDE["SPLIT_COLS"])
    # ~4 programs per SM assuming BLOCK_N=128, and at least 16 splits so resident programs share row panels.
    row_blocks = triton.cdiv(nv, 128)
    n_splits = max(16, triton.cdiv(4 * _num_sms(device), row_blocks))
    n_splits = max(1, min(n_splits, triton.cdiv(vocab, 1024)))
    return triton.cdiv(triton.cdiv(vocab, n_splits), 256) * 256


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logp [N] fp32, lse2 [N] fp32 in base 2 of the scaled logits, saved for the backward)."""
    nv, width = hidden.shape
    vocab = weight.shape[0]
    span = _splits(nv, vocab, hidden.device)
    n_splits = triton.cdiv(vocab, span)
    parts = torch.empty(3, n_splits, nv, dtype=torch.float32, device=hidden.device)
    targets = targets.contiguous()
    scale = _LOG2E / temperature
    args = (
        hidden,
        weight,
        bias if bias is not None else hidden,  # dummy pointer, never read
        targets,
        parts[0],
        parts[1],
        parts[2],
        nv,
        vocab,
        width,
        span,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        scale,
        triton.next_power_of_2(nv),
    )
    constexprs = {"HAS_BIAS": bias is not None, "DOT_PRECISION": _dot_precision(hidden.dtype)}
    grid = lambda meta: (triton.cdiv(nv, meta["BLOCK_N"]) * n_splits,)
    _launch(_fwd_tuned, _fwd_kernel, grid, args, constexprs, group=False)

    # Merge the per-split partial log-sum-exps: O(n_splits * N).
    m_all, s_all, t_all = parts
    m = m_all.amax(dim=0)
    lse2 = m + torch.log2((s_all * torch.exp2(m_all - m)).sum(dim=0))
    logp = (t_all.sum(dim=0) - lse2) * _LN2
    return logp, lse2


def _chunk_cols(nv: int, vocab: int) -> int:
    if "CHUNK_COLS" in _OVERRIDE:
        return int(_OVERRIDE["CHUNK_COLS"])
    cols = max(256, (GRAD_CHUNK_ELEMENTS // max(nv, 1)) // 256 * 256)
    return min(cols, vocab)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse2: torch.Tensor,
    g: torch.Tensor,
    temperature: float,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    nv, width = hidden.shape
    vocab = weight.shape[0]
    dtype = weight.dtype
    device = hidden.device
    cols = _chunk_cols(nv, vocab)
    single = cols >= vocab
    buf = torch.empty(nv, cols, dtype=dtype, device=device)  # grad logits of one vocabulary chunk
    targets = targets.contiguous()
    g = g.contiguous()

    d_hidden = None
    dh32 = None
    if need_h and not single:
        dh32 = torch.zeros(nv, width, dtype=torch.float32, device=device)
    d_weight = torch.empty(vocab, width, dtype=dtype, device=device) if need_w else None
    db32 = torch.empty(vocab, dtype=torch.float32, device=device) if need_b else None
    constexprs = {"HAS_BIAS": bias is not None, "DOT_PRECISION": _dot_precision(dtype)}

    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        vc = v1 - v0
        gc = buf[:, :vc]
        args = (
            hidden,
            weight,
            bias if bias is not None else hidden,
            targets,
            lse2,
            g,
            gc,
            nv,
            vc,
            width,
            v0,
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            buf.stride(0),
            _LOG2E / temperature,
            -1.0 / temperature,
            triton.next_power_of_2(nv),
        )
        grid = lambda meta, vc=vc: (triton.cdiv(nv, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),)
        _launch(_grad_tuned, _grad_logits_kernel, grid, args, constexprs, group=True)

        if need_h:
            if single:
                d_hidden = torch.mm(gc, weight)
            else:
                accumulate_mm(dh32, gc, weight[v0:v1])
        if need_w:
            torch.mm(gc.t(), hidden, out=d_weight[v0:v1])  # fp32 accumulation over N inside the GEMM
        if need_b:
            torch.sum(gc, dim=0, dtype=torch.float32, out=db32[v0:v1])

    if dh32 is not None:
        d_hidden = dh32 if dtype == torch.float32 else dh32.to(dtype)
    d_bias = None if db32 is None else db32.to(bias.dtype)
    return d_hidden, d_weight, d_bias
