"""fused_linear_logprob: values and gradients against an independent float64 computation.

CPU: the torch path in fp32, and the Triton kernels under the Triton interpreter in fp32 (tiny tiles, odd
shapes).
GPU (``pytest -m gpu``): the compiled Triton kernels in fp32 and bf16, bf16 held to the naive bf16 op's error.
"""

import math
import os

import torch

# The interpreter must be chosen before the Triton kernels are decorated (on their lazy import). On a CUDA
# machine leave it off so the GPU tests exercise compiled kernels; the interpreter tests then skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fabric_align.kernels.logprob as logprob_mod  # noqa: E402
from fabric_align.kernels import fused_linear_logprob, linear_logprob_reference  # noqa: E402

IGNORE = -100
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _ref64(h, w, t, b, temperature, ignore_index=IGNORE):
    """Written out independently of the module: float64 logits, logsumexp, gather, mask."""
    logits = h.double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    logits = logits / temperature
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    target_logit = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, target_logit - torch.logsumexp(logits, dim=-1), torch.zeros((), dtype=torch.float64))


def _naive_graph(hidden, weight, targets, *, bias=None, ignore_index=IGNORE, temperature=1.0):
    """What a model's own lm_head and log_softmax compute: logits rounded to the inputs' dtype, then fp32. The
    yardstick of the low-precision tests: the kernels keep fp32 logits, so their error may not exceed this one's."""
    logits = (hidden @ weight.T if bias is None else hidden @ weight.T + bias).float() / temperature
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def _problem(n, h, v, *, ignore_frac=0.3, bias=False, w_scale=0.3, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * w_scale
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    to = lambda x: None if x is None else x.to(device)
    return to(hidden), to(weight), to(b), to(targets), to(upstream)


def _run(fn, hidden, weight, bias, targets, upstream, temperature, dtype, *, weight_grad=True, **kw):
    """Forward + backward with upstream gradient; returns float64 (logp, d_hidden, d_weight, d_bias)."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_(weight_grad)
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    out = fn(h, w, targets, bias=b, temperature=temperature, **kw)
    out.backward(upstream.to(out.dtype))
    grads = [h.grad, w.grad, None if b is None else b.grad]
    for x, g in zip((h, w, b), grads, strict=True):
        if g is not None:
            assert g.dtype == x.dtype
    return [out.double()] + [None if g is None else g.double() for g in grads]


def _assert_all_close(got, want, atol, rtol):
    names = ("logp", "d_hidden", "d_weight", "d_bias")
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _assert_fp32_close(got, want, naive):
    """fp32 results within 5e-5 of float64, or, where the naive fp32 op itself is off by more (logits of +-100 leave
    it ~1e-4 on d_hidden), within twice the naive op's error: the bound is fp32's, not a lucky rounding order."""
    names = ("logp", "d_hidden", "d_weight", "d_bias")
    for name, g, nv, w in zip(names, got, naive, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        atol = max(5e-5, 2 * (nv - w).abs().max().item())
        torch.testing.assert_close(g, w, atol=atol, rtol=5e-5, msg=lambda m, name=name: f"{name}: {m}")


def _assert_within_naive_error(got, naive, want):
    """Each output's max error vs float64 may exceed the naive op's (same dtype) only by a small margin."""
    for name, g, nv, w in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, naive, want, strict=True):
        if w is None:
            continue
        naive_err = (nv - w).abs().max().item()
        err = (g - w).abs().max().item()
        tol = 1.25 * naive_err + 2**-10 * w.abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (naive error {naive_err:.3e})"


CASES = [
    # (bias, temperature, w_scale): w_scale=5 gives logits ~ +-100, past exp() overflow without a max shift.
    (False, 1.0, 0.3),
    (True, 0.7, 0.3),
    (True, 1.3, 5.0),
]


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "torch")


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    if not INTERPRETING:
        pytest.skip("Triton interpreter tests run on CPU-only machines (GPU machines run the gpu tests)")
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "triton")


# ----------------------------------------------------------------------------------------------------------
# Reference and torch path (fp32, CPU)
# ----------------------------------------------------------------------------------------------------------


def test_reference_matches_float64():
    hidden, weight, bias, targets, upstream = _problem(23, 16, 37, bias=True)
    want = _run(_ref64_fn, hidden, weight, bias, targets, upstream, 0.8, torch.float64)
    got = _run(linear_logprob_reference, hidden, weight, bias, targets, upstream, 0.8, torch.float64)
    # The reference log-softmaxes in fp32, like the kernels.
    _assert_all_close(got, want, atol=1e-5, rtol=1e-5)


def _ref64_fn(h, w, t, *, bias=None, temperature=1.0, ignore_index=IGNORE):
    return _ref64(h, w, t, bias, temperature, ignore_index)


# (TORCH_CHUNK_ELEMENTS, TORCH_MIN_COLS) for 23-25 valid rows of 37, V=131.
CHUNKINGS = {
    "one-chunk": None,
    "row-blocks": (5 * 131, 1 << 30),  # ragged blocks of 5 rows x all columns
    "vocab-chunks": (1200, 16),  # all rows x 3 ragged chunks of ~50 columns
    "2d": (300, 32),  # 3 ragged blocks of 9 rows x 5 ragged chunks of 32 columns
}


@pytest.mark.parametrize("bias,temperature,w_scale", CASES)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_torch_path_fp32(torch_path, monkeypatch, bias, temperature, w_scale, chunking):
    n, h, v = 37, 48, 131
    if CHUNKINGS[chunking] is not None:
        monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", CHUNKINGS[chunking][0])
        monkeypatch.setattr(logprob_mod, "TORCH_MIN_COLS", CHUNKINGS[chunking][1])
    hidden, weight, b, targets, upstream = _problem(n, h, v, bias=bias, w_scale=w_scale)
    assert 23 <= int((targets != IGNORE).sum()) <= 25
    want = _run(_ref64_fn, hidden, weight, b, targets, upstream, temperature, torch.float64)
    naive = _run(linear_logprob_reference, hidden, weight, b, targets, upstream, temperature, torch.float32)
    got = _run(fused_linear_logprob, hidden, weight, b, targets, upstream, temperature, torch.float32)
    _assert_fp32_close(got, want, naive)
    assert torch.all(got[0][targets == IGNORE] == 0)
    assert torch.all(got[1][targets == IGNORE] == 0)


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_torch_path_bf16_within_naive_error(torch_path, monkeypatch, chunking):
    if CHUNKINGS[chunking] is not None:
        monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", CHUNKINGS[chunking][0])
        monkeypatch.setattr(logprob_mod, "TORCH_MIN_COLS", CHUNKINGS[chunking][1])
    problem = _problem(37, 64, 131, bias=True)
    want = _run(_ref64_fn, *problem, 0.9, torch.float64)
    naive = _run(_naive_graph, *problem, 0.9, torch.bfloat16)
    got = _run(fused_linear_logprob, *problem, 0.9, torch.bfloat16)
    _assert_within_naive_error(got, naive, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_keeps_fp32_logits_for_16_bit_inputs(torch_path, dtype):
    """16-bit hidden and weight give the log-probs of fp32 logits, as the Triton kernel's: logits of about 60 in bf16
    (spacing 0.25 there) and past fp16's 65504 would be off by tenths of a nat, or NaN, if rounded to the inputs'
    dtype as a model's own lm_head does."""
    width, scale, atol = (256, 1.0, 1e-4) if dtype == torch.bfloat16 else (16, 80.0, 5e-2)
    hidden, weight, _, targets, upstream = _problem(12, width, 64, ignore_frac=0.0, w_scale=scale)
    h = (hidden * scale).to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    want = _ref64(h.double(), w.double(), targets, None, 1.0)  # the exact math on the same 16-bit inputs
    got = fused_linear_logprob(h, w, targets)
    got.backward(upstream.float())
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    naive_error = (_naive_graph(h.detach(), w.detach(), targets).double() - want).abs().max()
    assert not naive_error <= 20 * atol  # what this guards against (NaN in fp16)


def test_torch_path_leading_dims_and_sum_backward(torch_path, monkeypatch):
    """[B, T, H] input, custom ignore_index and an expanded (stride-0) upstream gradient from .sum()."""
    monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", 3 * 29)
    hidden, weight, _, targets, _ = _problem(2 * 9, 12, 29, ignore_frac=0.4)
    targets = torch.where(targets == IGNORE, torch.full_like(targets, 7), targets)  # ignore_index=7 below
    h = hidden.float().reshape(2, 9, 12).requires_grad_()
    w = weight.float().requires_grad_()
    out = fused_linear_logprob(h, w, targets.reshape(2, 9), ignore_index=7)
    assert out.shape == (2, 9) and out.dtype == torch.float32
    out.sum().backward()
    h64 = hidden.clone().requires_grad_()
    w64 = weight.clone().requires_grad_()
    ref = _ref64(h64, w64, targets, None, 1.0, ignore_index=7)
    ref.sum().backward()
    torch.testing.assert_close(out.double().reshape(-1), ref, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(h.grad.double().reshape(-1, 12), h64.grad, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=5e-5, rtol=5e-5)


def test_autocast_cpu_bf16(torch_path):
    """Under autocast the lm_head runs in the autocast dtype; grads reach the fp32 masters in fp32."""
    hidden, weight, _, targets, upstream = _problem(19, 32, 67)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_logprob(h, w, targets)
    out.backward(upstream.float())
    assert out.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    want = _run(_ref64_fn, hidden, weight, None, targets, upstream, 1.0, torch.float64)
    naive = _run(_naive_graph, hidden, weight, None, targets, upstream, 1.0, torch.bfloat16)
    _assert_within_naive_error([out.double(), h.grad.double(), w.grad.double(), None], naive, want)


def test_out_of_range_target_raises(torch_path):
    hidden, weight, _, targets, _ = _problem(8, 8, 11, ignore_frac=0.0)
    targets[3] = 11
    with pytest.raises(IndexError):
        fused_linear_logprob(hidden.float(), weight.float(), targets)


# ----------------------------------------------------------------------------------------------------------
# Edge cases on both paths
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "triton"])
def any_path(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if not INTERPRETING:
            pytest.skip("Triton on CPU tensors needs the interpreter")
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", request.param)
    return request.param


def test_all_ignored(any_path):
    hidden, weight, bias, targets, upstream = _problem(9, 16, 33, bias=True, ignore_frac=1.0)
    got = _run(fused_linear_logprob, hidden, weight, bias, targets, upstream, 1.0, torch.float32)
    assert torch.equal(got[0], torch.zeros(9, dtype=torch.float64))
    for g in got[1:]:  # explicit zero grads (not None) so FSDP2 / optimizers see every parameter
        assert g is not None and torch.count_nonzero(g) == 0


def test_empty_batch(any_path):
    w = torch.randn(17, 16, requires_grad=True)
    h = torch.randn(0, 16, requires_grad=True)
    out = fused_linear_logprob(h, w, torch.zeros(0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0,) and h.grad.shape == (0, 16) and torch.count_nonzero(w.grad) == 0


class _AllocRecorder(TorchDispatchMode):
    """Records every ATen op, forward and backward, and the tensors it newly allocates (outputs whose storage
    is not one of its inputs': views, in-place and out= ops allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.allocs: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.ops.append(name)
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                self.allocs.append((name, tuple(o.shape)))
        return out

    def count(self, *names):
        return sum(1 for name in self.ops if name in names)


def test_torch_path_memory_is_one_chunk(torch_path, monkeypatch):
    """Apart from the gradients themselves no allocation exceeds the chunk budget: extra memory = one chunk."""
    n, h, v, budget = 64, 2, 1000, 1000
    monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(logprob_mod, "TORCH_MIN_COLS", 100)  # 32 valid rows: blocks of 10 rows x 100 columns
    hidden, weight, bias, targets, upstream = _problem(n, h, v, bias=True, ignore_frac=0.5)
    n_valid = int((targets != IGNORE).sum())
    assert n_valid == 32
    hh, ww, bb = (x.float().requires_grad_() for x in (hidden, weight, bias))

    with _AllocRecorder() as fwd:
        out = fused_linear_logprob(hh, ww, targets, bias=bb, temperature=0.8)
    with _AllocRecorder() as bwd:
        out.backward(upstream.float())
    gradient_shapes = {(n, h), (v, h)}
    sizes = [math.prod(s) for _, s in fwd.allocs + bwd.allocs if s not in gradient_shapes]
    assert max(sizes) == budget  # the chunk buffer; n * v is 64x larger
    row_blocks, vocab_chunks = -(-n_valid // 10), v // 100
    assert fwd.count("mm", "addmm") == row_blocks * vocab_chunks  # ignored rows skipped: one GEMM per chunk
    assert bwd.count("mm", "addmm", "addmm_") == 3 * row_blocks * vocab_chunks  # recompute, dH, dW

    # The detector is real: the naive op allocates N x V logits.
    with _AllocRecorder() as naive:
        linear_logprob_reference(hh, ww, targets, bias=bb).sum().backward()
    assert max(math.prod(s) for _, s in naive.allocs) == n * v


def test_frozen_weight_skips_weight_grad(any_path, monkeypatch):
    """LoRA with a frozen lm_head: no weight-shaped gradient is ever computed."""
    n, h_dim, v = 29, 16, 61
    monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", 6 * v)
    hidden, weight, _, targets, upstream = _problem(n, h_dim, v)
    want = _run(_ref64_fn, hidden, weight, None, targets, upstream, 1.0, torch.float64, weight_grad=False)
    h = hidden.float().requires_grad_()
    w = weight.float()
    out = fused_linear_logprob(h, w, targets)
    with _AllocRecorder() as rec:
        out.backward(upstream.float())
    assert w.grad is None
    assert not [s for _, s in rec.allocs if s == (v, h_dim)], "a weight-shaped gradient was allocated"
    _assert_all_close([out.double(), h.grad.double(), None, None], want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("chunking", ["one-chunk", "row-blocks"])
@pytest.mark.parametrize("bias,temperature,w_scale", CASES)
def test_frozen_lm_head_gradient_is_computed_in_the_forward(
    torch_path, monkeypatch, chunking, bias, temperature, w_scale
):
    """A frozen lm_head (and bias): the forward computes (softmax - onehot) @ W with each block's whole-vocabulary
    softmax at hand, so the backward runs no GEMM: 2 per row block in all instead of 3."""
    n, h_dim, v = 37, 48, 131
    if chunking == "row-blocks":
        monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", 5 * v)  # blocks of 5 rows x the whole vocabulary
    hidden, weight, b, targets, upstream = _problem(n, h_dim, v, bias=bias, w_scale=w_scale)
    n_valid = int((targets != IGNORE).sum())
    h = hidden.float().requires_grad_()
    w, bb = weight.float(), None if b is None else b.float()
    with _AllocRecorder() as fwd:
        out = fused_linear_logprob(h, w, targets, bias=bb, temperature=temperature)
    with _AllocRecorder() as bwd:
        out.backward(upstream.float())
    blocks = 1 if chunking == "one-chunk" else -(-n_valid // 5)
    assert fwd.count("mm", "addmm") == 2 * blocks and bwd.count("mm", "addmm", "addmm_") == 0
    chunk = n_valid * v if chunking == "one-chunk" else 5 * v
    assert max(math.prod(s) for _, s in fwd.allocs if s != (n_valid, h_dim)) == chunk  # no N x V beyond a chunk
    # The frozen bias gets no gradient: compare logp and d_hidden only.
    want = _run(_ref64_fn, hidden, weight, b, targets, upstream, temperature, torch.float64, weight_grad=False)
    naive = _run(linear_logprob_reference, hidden, weight, b, targets, upstream, temperature, torch.float32)
    _assert_fp32_close([out.double(), h.grad.double(), None, None], [*want[:2], None, None], naive)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_16_bit_lm_heads_always_recompute(torch_path, weight_grad):
    """A bf16 lm_head takes neither early mode (on CPU their whole-vocabulary chunks would widen the whole weight to
    fp32): the backward recomputes the logits, and the results stay within the naive op's error."""
    problem = _problem(37, 64, 131, bias=False)
    with _AllocRecorder() as rec:  # forward and backward
        got = _run(
            fused_linear_logprob, *problem, 0.9, torch.bfloat16, weight_grad=weight_grad, keep_softmax_bytes=1 << 30
        )
    assert rec.count("mm", "addmm", "addmm_") == (4 if weight_grad else 3)  # forward, recompute, dH (, dW)
    want = _run(_ref64_fn, *problem, 0.9, torch.float64, weight_grad=weight_grad)
    naive = _run(_naive_graph, *problem, 0.9, torch.bfloat16, weight_grad=weight_grad)
    _assert_within_naive_error(got, naive, want)


def test_no_gradient_work_without_grad_mode(torch_path):
    """Under no_grad (reference, KL and validation passes) a trainable-looking input computes no gradient factor."""
    hidden, weight, _, targets, _ = _problem(29, 16, 61)
    h, w = hidden.float().requires_grad_(), weight.float()
    with torch.no_grad(), _AllocRecorder() as rec:
        fused_linear_logprob(h, w, targets)
    assert rec.count("mm", "addmm") == 1
    with torch.no_grad(), _AllocRecorder() as rec:
        fused_linear_logprob(h, w.requires_grad_(), targets, keep_softmax_bytes=1 << 30)
    assert rec.count("mm", "addmm") == 1 and max(math.prod(s) for _, s in rec.allocs) < 29 * 61


def test_kept_softmax_saves_the_backwards_recomputation(torch_path):
    """``keep_softmax_bytes`` large enough: the forward keeps softmax - onehot (N_valid x V fp32), the backward runs
    only the two gradient GEMMs; the results are the recomputing path's to round-off. Too small a budget recomputes."""
    n, h_dim, v = 37, 64, 131
    problem = _problem(n, h_dim, v, bias=True)
    n_valid = int((problem[3] != IGNORE).sum())
    results = {}
    for keep in (0, n_valid * v * 4 - 1, n_valid * v * 4):
        with _AllocRecorder() as rec:  # forward and backward
            results[keep] = _run(fused_linear_logprob, *problem, 0.9, torch.float32, keep_softmax_bytes=keep)
        assert rec.count("mm", "addmm", "addmm_") == (3 if keep == n_valid * v * 4 else 4), keep
    recomputed, kept = results[0], results[n_valid * v * 4]
    assert torch.equal(results[n_valid * v * 4 - 1][2], recomputed[2])  # too small: the same path
    _assert_all_close(kept, recomputed, atol=1e-6, rtol=1e-6)
    want = _run(_ref64_fn, *problem, 0.9, torch.float64)
    _assert_fp32_close(kept, want, _run(linear_logprob_reference, *problem, 0.9, torch.float32))


@pytest.mark.parametrize("keep", [0, 1 << 20])
@pytest.mark.parametrize("frozen", [False, True])
def test_early_modes_backward_twice_and_refuse_double_backward(torch_path, keep, frozen):
    """retain_graph: a second backward reads the same saved factor or softmax, to the same gradients bit for bit. A
    double backward (create_graph) is refused, as the recomputing path's is, rather than missing the softmax's own
    dependence on hidden."""
    hidden, weight, _, targets, upstream = _problem(23, 16, 41)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_(not frozen)
    inputs = (h,) if frozen else (h, w)
    out = fused_linear_logprob(h, w, targets, keep_softmax_bytes=keep)
    with _AllocRecorder() as rec:
        first = torch.autograd.grad(out, inputs, upstream.float(), retain_graph=True)
    assert rec.count("mm", "addmm", "addmm_") == (0 if frozen else 2 if keep else 3)
    second = torch.autograd.grad(out, inputs, upstream.float())
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    out = fused_linear_logprob(h, w, targets, keep_softmax_bytes=keep)
    (d_hidden,) = torch.autograd.grad((out**2).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(d_hidden.sum(), h)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (fp32, CPU)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias,temperature,w_scale", CASES)
@pytest.mark.parametrize(
    "config",
    [
        # Several vocabulary spans per row block (partial LSE merge), ragged spans and ragged backward chunks.
        {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_N": 2, "SPLIT_COLS": 48, "CHUNK_COLS": 64},
        # One span, one backward chunk, K not a multiple of BLOCK_K.
        {"BLOCK_N": 32, "BLOCK_V": 16, "BLOCK_K": 32, "GROUP_N": 1, "SPLIT_COLS": 256, "CHUNK_COLS": 256},
    ],
    ids=["split", "whole"],
)
def test_triton_interpreter_fp32(triton_interpreter, bias, temperature, w_scale, config):
    from fabric_align.kernels import logprob_triton

    hidden, weight, b, targets, upstream = _problem(37, 48, 131, bias=bias, w_scale=w_scale)
    want = _run(_ref64_fn, hidden, weight, b, targets, upstream, temperature, torch.float64)
    naive = _run(linear_logprob_reference, hidden, weight, b, targets, upstream, temperature, torch.float32)
    with logprob_triton.override_config(**config):
        got = _run(fused_linear_logprob, hidden, weight, b, targets, upstream, temperature, torch.float32)
    _assert_fp32_close(got, want, naive)
    assert torch.all(got[0][targets == IGNORE] == 0)


def test_triton_interpreter_all_valid_rows(triton_interpreter):
    """No ignored rows: the kernels read hidden in place (no compaction copy)."""
    from fabric_align.kernels import logprob_triton

    problem = _problem(21, 20, 45, ignore_frac=0.0, bias=True)
    want = _run(_ref64_fn, *problem, 1.0, torch.float64)
    with logprob_triton.override_config(SPLIT_COLS=32, CHUNK_COLS=32):
        got = _run(fused_linear_logprob, *problem, 1.0, torch.float32)
    _assert_all_close(got, want, atol=5e-5, rtol=5e-5)


def test_triton_interpreter_fp16_within_naive_error(triton_interpreter):
    """Low-precision host side (G in fp16, fp32 dH accumulation over chunks, dtype of the grads). fp16, since
    the interpreter mishandles bf16 arithmetic; bf16 runs in the gpu tests."""
    from fabric_align.kernels import logprob_triton

    problem = _problem(37, 48, 131, bias=True)
    want = _run(_ref64_fn, *problem, 0.9, torch.float64)
    naive = _run(_naive_graph, *problem, 0.9, torch.float16)
    with logprob_triton.override_config(SPLIT_COLS=48, CHUNK_COLS=64):
        got = _run(fused_linear_logprob, *problem, 0.9, torch.float16)
    _assert_within_naive_error(got, naive, want)


def test_float64_takes_the_torch_path_even_when_triton_is_forced(triton_interpreter, monkeypatch):
    """tl.dot has no fp64 form on GPUs (the compiled kernel would not build): fp64 inputs always go to torch."""
    from fabric_align.kernels import logprob_triton

    def no_triton(*args, **kwargs):
        raise AssertionError("fp64 reached the Triton kernel")

    monkeypatch.setattr(logprob_triton, "forward", no_triton)
    problem = _problem(19, 12, 29, bias=True)
    want = _run(_ref64_fn, *problem, 0.7, torch.float64)
    got = _run(fused_linear_logprob, *problem, 0.7, torch.float64)
    _assert_all_close(got, want, atol=1e-5, rtol=1e-5)  # the torch path's logits are fp32


def test_bf16_in_the_interpreter_is_refused_not_miscomputed(triton_interpreter):
    """The interpreter's bf16 tl.dot returns garbage rather than failing: refuse that combination clearly."""
    hidden, weight, _, targets, _ = _problem(5, 16, 32)
    with pytest.raises(ValueError, match="interpreter computes bf16 dots wrongly"):
        fused_linear_logprob(hidden.bfloat16(), weight.bfloat16(), targets)


def test_dot_precision_follows_torchs_fp32_matmul_setting(monkeypatch):
    """Torch's new ``fp32_precision`` API makes reading the legacy ``allow_tf32`` raise; both must be understood."""
    pytest.importorskip("triton")
    from fabric_align.kernels import logprob_triton

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for setting, expected in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = setting
            assert logprob_triton._dot_precision(torch.float32) == expected
            assert logprob_triton._dot_precision(torch.bfloat16) == "tf32"  # ignored by 16-bit dots
        torch.set_float32_matmul_precision("highest")
        assert logprob_triton._dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert logprob_triton._dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = saved


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("bias,temperature,w_scale", CASES)
def test_gpu_fp32(monkeypatch, path, bias, temperature, w_scale):
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", path)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    problem = _problem(333, 96, 1031, bias=bias, w_scale=w_scale, device="cuda")
    want = _run(_ref64_fn, *problem, temperature, torch.float64)
    got = _run(fused_linear_logprob, *problem, temperature, torch.float32)
    _assert_all_close(got, want, atol=1e-4, rtol=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
@pytest.mark.parametrize("chunk_cols", [None, 4096])  # default (one backward chunk here) and 8 chunks
def test_gpu_bf16_within_naive_error(monkeypatch, path, bias, temperature, chunk_cols):
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", path)
    problem = _problem(1029, 512, 32003, bias=bias, w_scale=0.05, device="cuda")
    want = _run(_ref64_fn, *problem, temperature, torch.float64)
    naive = _run(_naive_graph, *problem, temperature, torch.bfloat16)
    if path == "triton" and chunk_cols is not None:
        from fabric_align.kernels import logprob_triton

        with logprob_triton.override_config(CHUNK_COLS=chunk_cols):
            got = _run(fused_linear_logprob, *problem, temperature, torch.bfloat16)
    else:
        if chunk_cols is not None:  # torch path: all valid rows x several vocabulary chunks
            monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_ELEMENTS", 1029 * chunk_cols)
            monkeypatch.setattr(logprob_mod, "TORCH_MIN_COLS", 1)
        got = _run(fused_linear_logprob, *problem, temperature, torch.bfloat16)
    _assert_within_naive_error(got, naive, want)


@gpu
@needs_cuda
def test_gpu_triton_tiny_tiles_odd_shapes(monkeypatch):
    """The compiled kernels with the interpreter's tiny ragged tiles."""
    from fabric_align.kernels import logprob_triton

    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "triton")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    problem = _problem(37, 48, 131, bias=True, device="cuda")
    want = _run(_ref64_fn, *problem, 0.7, torch.float64)
    config = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_N": 2, "SPLIT_COLS": 48, "CHUNK_COLS": 64}
    with logprob_triton.override_config(**config):
        got = _run(fused_linear_logprob, *problem, 0.7, torch.float32)
    _assert_all_close(got, want, atol=1e-4, rtol=1e-4)
