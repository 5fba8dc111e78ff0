"""KTO and SPIN losses: Triton kernels, the torch implementation and the references against float64 math.

The expected values are computed here from the inputs with Python doubles (``math``), independently of
``fabric_align.kernels.losses``. Without CUDA the Triton kernels run on CPU tensors through the Triton
interpreter (fp32 only: the interpreter mishandles bf16); the bf16 check is the ``gpu``-marked test.
"""

import math
import os

import torch

# The interpreter is chosen when a kernel is decorated, i.e. when losses_triton is first imported (lazily, on
# the first Triton call): it must be on before that. On a CUDA machine the kernels run compiled on the GPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from fabric_align.kernels import losses  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
# "triton-tiles": tiny tiles so several programs, several T tiles and the finishing kernel all run.
IMPLS = ("triton", "triton-tiles", "torch", "reference")

KTO_KEYS = {
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "count/chosen",
    "count/rejected",
}
SPIN_KEYS = {
    "loss",
    "rewards/real",
    "rewards/generated",
    "rewards/margins",
    "rewards/accuracy",
    "logps/real",
    "logps/generated",
    "count/pairs",
}


# ------------------------------------------------------------------------------------ float64 formulas


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _rows(t: torch.Tensor) -> list[float]:
    """Exact sum of each row, in double."""
    return [math.fsum(row) for row in t.detach().double().cpu().tolist()]


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def kto_expected(tokens, ref, labels, kl, *, beta, wd, wu, loss_type, normalizer, upstream):
    """(loss, grad [B, T] as nested lists, metrics) in double, straight from the paper's definitions."""
    seq = _rows(tokens)
    refs = ref.double().cpu().tolist()
    labs = [bool(v) for v in labels.cpu().tolist()]
    z0 = float(kl)
    norm = len(seq) if normalizer is None else float(normalizer)
    total, row_grads = [], []
    for s, f, desirable in zip(seq, refs, labs, strict=True):
        r = s - f
        if loss_type == "kto" and desirable:
            x = beta * (r - z0)
            loss, dr = wd * (1 - _sigmoid(x)), -wd * beta * _sigmoid(x) * (1 - _sigmoid(x))
        elif loss_type == "kto":
            x = beta * (z0 - r)
            loss, dr = wu * (1 - _sigmoid(x)), wu * beta * _sigmoid(x) * (1 - _sigmoid(x))
        elif desirable:  # apo_zero_unpaired
            x = beta * r
            loss, dr = wd * (1 - _sigmoid(x)), -wd * beta * _sigmoid(x) * (1 - _sigmoid(x))
        else:
            x = beta * r
            loss, dr = wu * _sigmoid(x), wu * beta * _sigmoid(x) * (1 - _sigmoid(x))
        total.append(loss)
        row_grads.append(upstream * dr / norm)
    length = tokens.shape[1]
    grad = [[g] * length for g in row_grads]
    chosen = [i for i, d in enumerate(labs) if d]
    rejected = [i for i, d in enumerate(labs) if not d]
    rc = _mean([beta * (seq[i] - refs[i]) for i in chosen])
    rr = _mean([beta * (seq[i] - refs[i]) for i in rejected])
    metrics = {
        "loss": math.fsum(total) / norm,
        "kl": z0,
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": rc - rr,
        "logps/chosen": _mean([seq[i] for i in chosen]),
        "logps/rejected": _mean([seq[i] for i in rejected]),
        "count/chosen": float(len(chosen)),
        "count/rejected": float(len(rejected)),
    }
    return metrics["loss"], grad, metrics


def spin_expected(real, gen, ref_real, ref_gen, *, beta, normalizer, upstream):
    real_seq, gen_seq = _rows(real), _rows(gen)
    rr, rg = ref_real.double().cpu().tolist(), ref_gen.double().cpu().tolist()
    batch = len(real_seq)
    norm = batch if normalizer is None else float(normalizer)
    total, row_grads, rw_real, rw_gen = [], [], [], []
    for s_real, s_gen, f_real, f_gen in zip(real_seq, gen_seq, rr, rg, strict=True):
        margin = (s_real - f_real) - (s_gen - f_gen)
        total.append(_softplus(-beta * margin))  # -log sigmoid(beta * margin)
        row_grads.append(upstream * -beta * _sigmoid(-beta * margin) / norm)  # d/d(real sum)
        rw_real.append(beta * (s_real - f_real))
        rw_gen.append(beta * (s_gen - f_gen))
    grad_real = [[g] * real.shape[1] for g in row_grads]
    grad_gen = [[-g] * gen.shape[1] for g in row_grads]
    metrics = {
        "loss": math.fsum(total) / norm,
        "rewards/real": _mean(rw_real),
        "rewards/generated": _mean(rw_gen),
        "rewards/margins": _mean(rw_real) - _mean(rw_gen),
        "rewards/accuracy": sum(a > b for a, b in zip(rw_real, rw_gen, strict=True)) / batch,
        "logps/real": _mean(real_seq),
        "logps/generated": _mean(gen_seq),
        "count/pairs": float(batch),
    }
    return metrics["loss"], (grad_real, grad_gen), metrics


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> str:
    name = request.param
    if name.startswith("triton"):
        monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "triton")
        if name == "triton-tiles":
            from fabric_align.kernels import losses_triton

            monkeypatch.setattr(losses_triton, "MAX_BLOCK_B", 2)
            monkeypatch.setattr(losses_triton, "MAX_TILE", 32)
    elif name == "torch":
        monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "torch")
    return name


def _device(impl: str) -> str:
    return TRITON_DEVICE if impl.startswith("triton") else "cpu"


def _kto(impl: str):
    return losses.kto_loss_reference if impl == "reference" else losses.kto_loss


def _spin(impl: str):
    return losses.spin_loss_reference if impl == "reference" else losses.spin_loss


def _tokens(gen: torch.Generator, batch: int, length: int, empty_row: int | None = 1) -> torch.Tensor:
    """Per-token log-probs <= 0 with right padding (zeros) of random lengths; ``empty_row`` fully masked."""
    values = -2.0 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    values = values * (torch.arange(length)[None, :] < lengths[:, None])
    if empty_row is not None and empty_row < batch:
        values[empty_row] = 0.0
    return values.float()


def _close(actual, expected, *, rtol: float, atol: float, what: str) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=rtol, atol=atol, msg=what)


def _check_metrics(metrics: dict, expected: dict, keys: set, *, rtol: float, atol: float) -> None:
    assert set(metrics) == keys
    for key, value in metrics.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, key
        _close(value, expected[key], rtol=rtol, atol=atol, what=lambda m, k=key: f"metric {k}: {m}")


# ---------------------------------------------------------------------------------------------- KTO

KTO_CASES = {
    # name: (batch, length, labels, loss_type, beta, wd, wu, kl, normalizer)
    "kto-mixed": (5, 37, [1, 0, 1, 0, 0], "kto", 0.5, 1.3, 0.7, 0.4, None),
    "apo-mixed-number-normalizer": (5, 37, [0, 1, 1, 0, 1], "apo_zero_unpaired", 0.3, 0.8, 1.6, 0.4, 8),
    "kto-tensor-normalizer": (7, 19, [1, 1, 0, 1, 0, 0, 1], "kto", 0.2, 1.0, 1.33, 0.0, torch.tensor(11.0)),
    "kto-all-desirable": (4, 23, [1, 1, 1, 1], "kto", 0.7, 1.2, 0.9, 1.5, None),
    "kto-all-undesirable": (3, 40, [0, 0, 0], "kto", 0.4, 1.2, 0.9, 0.3, 6.0),
    "apo-all-desirable": (3, 17, [1, 1, 1], "apo_zero_unpaired", 0.4, 2.0, 1.0, 0.0, None),
    "apo-all-undesirable": (6, 33, [0, 0, 0, 0, 0, 0], "apo_zero_unpaired", 0.6, 1.0, 0.5, 0.2, None),
    "single-row-single-token": (1, 1, [0], "kto", 0.1, 1.0, 1.0, 0.05, None),
}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_matches_float64(impl: str, case: str) -> None:
    batch, length, labels, loss_type, beta, wd, wu, kl, normalizer = KTO_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    device = _device(impl)
    tokens = _tokens(gen, batch, length)
    # reference sequence log-probs a few nats from the policy's, so the rewards take both signs
    ref = (tokens.double().sum(-1) + 4 * torch.randn(batch, generator=gen, dtype=torch.float64)).float()
    labels_t = torch.tensor(labels, dtype=torch.bool)
    kl_t = torch.tensor(kl)
    upstream = 0.75

    x = tokens.clone().to(device).requires_grad_()
    ref_in = ref.to(device).requires_grad_()  # must receive no gradient
    loss, metrics = _kto(impl)(
        x,
        ref_in,
        labels_t.to(device),
        kl_t.to(device),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        loss_type=loss_type,
        normalizer=normalizer,
    )
    (upstream * loss).backward()

    exp_loss, exp_grad, exp_metrics = kto_expected(
        tokens,
        ref,
        labels_t,
        kl,
        beta=beta,
        wd=wd,
        wu=wu,
        loss_type=loss_type,
        normalizer=normalizer,
        upstream=upstream,
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, exp_loss, rtol=1e-5, atol=1e-6, what=lambda m: f"loss: {m}")
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.shape == (batch, length)
    _close(x.grad, exp_grad, rtol=1e-5, atol=1e-8, what=lambda m: f"grad: {m}")
    assert ref_in.grad is None
    _check_metrics(metrics, exp_metrics, KTO_KEYS, rtol=1e-5, atol=1e-5)


def test_kto_extreme_inputs(impl: str) -> None:
    """Sequence log-probs of -1e4 with beta 5: |beta * r| up to 5e4, far past where sigmoid saturates."""
    device = _device(impl)
    length, beta = 40, 5.0
    tokens = torch.full((6, length), -250.0)  # rows sum to exactly -1e4 in any order
    tokens[3] = 0.0
    ref = torch.tensor([-20.0, -2e4, -1e4, 1e4, -1e4 + 0.5, -9999.875])  # r = -9980, 1e4, 0, -1e4, -0.5, -0.125
    labels = torch.tensor([True, True, False, False, True, False])
    for loss_type in ("kto", "apo_zero_unpaired"):
        x = tokens.clone().to(device).requires_grad_()
        kl = torch.tensor(0.25)
        loss, metrics = _kto(impl)(
            x,
            ref.to(device),
            labels.to(device),
            kl.to(device),
            beta=beta,
            loss_type=loss_type,
            desirable_weight=1.5,
            undesirable_weight=0.5,
        )
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())

        x_ref = tokens.clone().requires_grad_()
        loss_ref, _ = losses.kto_loss_reference(
            x_ref,
            ref,
            labels,
            kl,
            beta=beta,
            loss_type=loss_type,
            desirable_weight=1.5,
            undesirable_weight=0.5,
        )
        loss_ref.backward()
        torch.testing.assert_close(loss.detach().cpu(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-5, atol=1e-7)

        exp_loss, exp_grad, exp_metrics = kto_expected(
            tokens,
            ref,
            labels,
            0.25,
            beta=beta,
            wd=1.5,
            wu=0.5,
            loss_type=loss_type,
            normalizer=None,
            upstream=1.0,
        )
        _close(loss, exp_loss, rtol=1e-5, atol=1e-6, what=lambda m: f"loss: {m}")
        _close(x.grad, exp_grad, rtol=1e-4, atol=1e-6, what=lambda m: f"grad: {m}")
        _check_metrics(metrics, exp_metrics, KTO_KEYS, rtol=1e-6, atol=1e-3)


def test_kto_unknown_loss_type(impl: str) -> None:
    device = _device(impl)
    with pytest.raises(ValueError, match="loss_type"):
        _kto(impl)(
            torch.zeros(2, 3, device=device),
            torch.zeros(2, device=device),
            torch.tensor([True, False], device=device),
            torch.tensor(0.0, device=device),
            loss_type="sigmoid",
        )


def test_kto_shape_errors() -> None:
    with pytest.raises(ValueError, match="ref_logps"):
        losses.kto_loss(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, dtype=torch.bool), torch.tensor(0.0))
    with pytest.raises(ValueError, match="token_logps"):
        losses.kto_loss(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.tensor(0.0))


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_kto_non_contiguous_tokens(kernel: str, monkeypatch) -> None:
    """A transposed (column-major) view, as a caller slicing a larger buffer might pass."""
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", kernel)
    device = TRITON_DEVICE if kernel == "triton" else "cpu"
    gen = torch.Generator().manual_seed(3)
    tokens = _tokens(gen, 5, 29)
    ref = tokens.sum(-1) + 1.0
    labels = torch.tensor([True, False, True, True, False])
    x = tokens.to(device).t().contiguous().t().requires_grad_()  # [B, T] view of [T, B] storage
    assert not x.is_contiguous()
    loss, metrics = losses.kto_loss(x, ref.to(device), labels.to(device), torch.tensor(0.1, device=device))
    loss.backward()
    exp_loss, exp_grad, exp_metrics = kto_expected(
        tokens, ref, labels, 0.1, beta=0.1, wd=1.0, wu=1.0, loss_type="kto", normalizer=None, upstream=1.0
    )
    _close(loss, exp_loss, rtol=1e-5, atol=1e-6, what=lambda m: f"loss: {m}")
    _close(x.grad, exp_grad, rtol=1e-5, atol=1e-8, what=lambda m: f"grad: {m}")
    _check_metrics(metrics, exp_metrics, KTO_KEYS, rtol=1e-5, atol=1e-5)


def test_torch_kto_keeps_to_row_vectors(monkeypatch) -> None:
    """The torch implementation's gradient is an expanded [B, 1] column, not a materialized [B, T] tensor."""
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "torch")
    x = torch.randn(4, 9).requires_grad_()
    loss, _ = losses.kto_loss(x, torch.zeros(4), torch.tensor([1, 0, 1, 0]).bool(), torch.tensor(0.0))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == (4, 9) and grad.stride(1) == 0


# --------------------------------------------------------------------------------------------- SPIN

SPIN_CASES = {
    # name: (batch, T real, T generated, beta, normalizer)
    "longer-real": (5, 37, 23, 0.3, None),
    "longer-generated-tensor-normalizer": (6, 16, 41, 0.1, torch.tensor(9.0)),
    "number-normalizer": (3, 8, 13, 1.0, 4),
    "single-pair": (1, 1, 3, 0.5, None),
}


@pytest.mark.parametrize("case", list(SPIN_CASES))
def test_spin_matches_float64(impl: str, case: str) -> None:
    batch, t_real, t_gen, beta, normalizer = SPIN_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    device = _device(impl)
    real = _tokens(gen, batch, t_real, empty_row=None)
    generated = _tokens(gen, batch, t_gen, empty_row=1)  # an empty generation (e.g. immediate EOS masked)
    ref_real = (real.double().sum(-1) + 3 * torch.randn(batch, generator=gen, dtype=torch.float64)).float()
    ref_gen = (generated.double().sum(-1) + 3 * torch.randn(batch, generator=gen, dtype=torch.float64)).float()
    if batch >= 3:
        # an exact tie (dyadic values, so every summation order agrees): not counted as accurate
        real[2] = 0.0
        real[2, :2] = torch.tensor([-0.5, -0.25])
        generated[2] = 0.0
        generated[2, :2] = torch.tensor([-0.5, -0.25])
        ref_real[2] = ref_gen[2] = -1.0
    upstream = 1.25

    x_real = real.clone().to(device).requires_grad_()
    x_gen = generated.clone().to(device).requires_grad_()
    loss, metrics = _spin(impl)(
        x_real, x_gen, ref_real.to(device), ref_gen.to(device), beta=beta, normalizer=normalizer
    )
    (upstream * loss).backward()

    exp_loss, (exp_gr, exp_gg), exp_metrics = spin_expected(
        real, generated, ref_real, ref_gen, beta=beta, normalizer=normalizer, upstream=upstream
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, exp_loss, rtol=1e-5, atol=1e-6, what=lambda m: f"loss: {m}")
    assert x_real.grad.shape == (batch, t_real) and x_gen.grad.shape == (batch, t_gen)
    _close(x_real.grad, exp_gr, rtol=1e-5, atol=1e-8, what=lambda m: f"real grad: {m}")
    _close(x_gen.grad, exp_gg, rtol=1e-5, atol=1e-8, what=lambda m: f"generated grad: {m}")
    _check_metrics(metrics, exp_metrics, SPIN_KEYS, rtol=1e-5, atol=1e-5)


def test_spin_extreme_inputs(impl: str) -> None:
    """Margins of +-1e4 with beta 5: -log(sigmoid(-5e4)) would be inf; the stable form gives 5e4."""
    device = _device(impl)
    real = torch.full((4, 40), -250.0)  # sums -1e4
    real[1] = 0.0
    generated = torch.zeros(4, 11)
    generated[2] = -1e4 / 8  # -1250 on every token: sums -13750
    ref_real = torch.tensor([0.0, -1e4, 0.0, -1e4])
    ref_gen = torch.tensor([0.0, 0.0, -3750.0, -0.5])  # margins -1e4, 1e4, 0, -0.5
    x_real = real.clone().to(device).requires_grad_()
    x_gen = generated.clone().to(device).requires_grad_()
    loss, metrics = _spin(impl)(x_real, x_gen, ref_real.to(device), ref_gen.to(device), beta=5.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x_real.grad).all() and torch.isfinite(x_gen.grad).all()

    r_real, r_gen = real.clone().requires_grad_(), generated.clone().requires_grad_()
    loss_ref, _ = losses.spin_loss_reference(r_real, r_gen, ref_real, ref_gen, beta=5.0)
    loss_ref.backward()
    torch.testing.assert_close(loss.detach().cpu(), loss_ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_real.grad.cpu(), r_real.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x_gen.grad.cpu(), r_gen.grad, rtol=1e-5, atol=1e-7)

    exp_loss, (exp_gr, exp_gg), exp_metrics = spin_expected(
        real, generated, ref_real, ref_gen, beta=5.0, normalizer=None, upstream=1.0
    )
    _close(loss, exp_loss, rtol=1e-6, atol=1e-6, what=lambda m: f"loss: {m}")
    _close(x_real.grad, exp_gr, rtol=1e-5, atol=1e-7, what=lambda m: f"real grad: {m}")
    _close(x_gen.grad, exp_gg, rtol=1e-5, atol=1e-7, what=lambda m: f"generated grad: {m}")
    _check_metrics(metrics, exp_metrics, SPIN_KEYS, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_spin_gradient_into_one_side_only(kernel: str, monkeypatch) -> None:
    """Only the tensor that asks for a gradient gets one (e.g. generated log-probs computed without grad)."""
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", kernel)
    device = TRITON_DEVICE if kernel == "triton" else "cpu"
    gen = torch.Generator().manual_seed(7)
    real, generated = _tokens(gen, 3, 10, None), _tokens(gen, 3, 6, None)
    ref_real, ref_gen = real.sum(-1) - 1.0, generated.sum(-1) + 0.5
    x_gen = generated.clone().to(device).requires_grad_()
    loss, _ = losses.spin_loss(real.to(device), x_gen, ref_real.to(device), ref_gen.to(device), beta=0.5)
    loss.backward()
    _, (_, exp_gg), _ = spin_expected(real, generated, ref_real, ref_gen, beta=0.5, normalizer=None, upstream=1.0)
    _close(x_gen.grad, exp_gg, rtol=1e-5, atol=1e-8, what=lambda m: f"generated grad: {m}")


@pytest.mark.parametrize("kernel", ["torch", "reference"])
def test_bf16_on_cpu(kernel: str, monkeypatch) -> None:
    """bf16 token log-probs: fp32 loss and metrics, bf16 gradients (Triton: the GPU test)."""
    monkeypatch.setenv("FABRIC_ALIGN_KERNELS", "torch")
    gen = torch.Generator().manual_seed(11)
    tokens = _tokens(gen, 5, 37).bfloat16()
    ref = (tokens.double().sum(-1) + 4 * torch.randn(5, generator=gen, dtype=torch.float64)).float()
    labels = torch.tensor([True, False, False, True, False])
    x = tokens.clone().requires_grad_()
    loss, metrics = _kto(kernel)(x, ref, labels, torch.tensor(0.2), beta=0.3)
    loss.backward()
    exp_loss, exp_grad, exp_metrics = kto_expected(
        tokens, ref, labels, 0.2, beta=0.3, wd=1.0, wu=1.0, loss_type="kto", normalizer=None, upstream=1.0
    )
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    _close(loss, exp_loss, rtol=1e-5, atol=1e-6, what=lambda m: f"loss: {m}")
    _close(x.grad, exp_grad, rtol=1e-2, atol=1e-6, what=lambda m: f"grad: {m}")
    _check_metrics(metrics, exp_metrics, KTO_KEYS, rtol=1e-5, atol=1e-5)

    real, generated = _tokens(gen, 4, 20, None).bfloat16(), _tokens(gen, 4, 9).bfloat16()
    ref_real, ref_gen = real.float().sum(-1) + 1.0, generated.float().sum(-1) - 2.0
    x_real, x_gen = real.clone().requires_grad_(), generated.clone().requires_grad_()
    loss, metrics = _spin(kernel)(x_real, x_gen, ref_real, ref_gen, beta=0.4)
    loss.backward()
    exp_loss, (exp_gr, exp_gg), exp_metrics = spin_expected(
        real, generated, ref_real, ref_gen, beta=0.4, normalizer=None, upstream=1.0
    )
    assert loss.dtype == torch.float32 and x_real.grad.dtype == x_gen.grad.dtype == torch.bfloat16
    _close(loss, exp_loss, rtol=1e-5, atol=1e-6, what=lambda m: f"loss: {m}")
    _close(x_real.grad, exp_gr, rtol=1e-2, atol=1e-6, what=lambda m: f"real grad: {m}")
    _close(x_gen.grad, exp_gg, rtol=1e-2, atol=1e-6, what=lambda m: f"generated grad: {m}")
    _check_metrics(metrics, exp_metrics, SPIN_KEYS, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [8, 37])  # one program (one launch) / several programs + finishing kernel
def test_bf16_on_gpu_matches_float64(batch: int, monkeypatch) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter is on in this process (it mishandles bf16); run `pytest -m gpu` alone")
    monkeypatch.delenv("FABRIC_ALIGN_KERNELS", raising=False)  # CUDA tensors -> Triton by default
    gen = torch.Generator().manual_seed(batch)
    tokens = _tokens(gen, batch, 777).bfloat16()
    ref = (tokens.double().sum(-1) + 4 * torch.randn(batch, generator=gen, dtype=torch.float64)).float()
    labels = torch.rand(batch, generator=gen) < 0.5
    x = tokens.cuda().requires_grad_()
    loss, metrics = losses.kto_loss(
        x,
        ref.cuda(),
        labels.cuda(),
        torch.tensor(0.3, device="cuda"),
        beta=0.2,
        desirable_weight=1.2,
        undesirable_weight=0.8,
    )
    (0.5 * loss).backward()
    # the expected values start from the bf16 inputs themselves, so only the fp32 accumulation differs
    exp_loss, exp_grad, exp_metrics = kto_expected(
        tokens, ref, labels, 0.3, beta=0.2, wd=1.2, wu=0.8, loss_type="kto", normalizer=None, upstream=0.5
    )
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    _close(loss, exp_loss, rtol=1e-4, atol=1e-5, what=lambda m: f"loss: {m}")
    _close(x.grad, exp_grad, rtol=1e-2, atol=1e-6, what=lambda m: f"grad: {m}")
    _check_metrics(metrics, exp_metrics, KTO_KEYS, rtol=1e-4, atol=1e-3)

    real, generated = _tokens(gen, batch, 513, None).bfloat16(), _tokens(gen, batch, 300).bfloat16()
    ref_real = (real.double().sum(-1) + 2 * torch.randn(batch, generator=gen, dtype=torch.float64)).float()
    ref_gen = (generated.double().sum(-1) + 2 * torch.randn(batch, generator=gen, dtype=torch.float64)).float()
    x_real, x_gen = real.cuda().requires_grad_(), generated.cuda().requires_grad_()
    loss, metrics = losses.spin_loss(x_real, x_gen, ref_real.cuda(), ref_gen.cuda(), beta=0.3)
    loss.backward()
    exp_loss, (exp_gr, exp_gg), exp_metrics = spin_expected(
        real, generated, ref_real, ref_gen, beta=0.3, normalizer=None, upstream=1.0
    )
    assert x_real.grad.dtype == torch.bfloat16 and x_gen.grad.dtype == torch.bfloat16
    _close(loss, exp_loss, rtol=1e-4, atol=1e-5, what=lambda m: f"loss: {m}")
    _close(x_real.grad, exp_gr, rtol=1e-2, atol=1e-6, what=lambda m: f"real grad: {m}")
    _close(x_gen.grad, exp_gg, rtol=1e-2, atol=1e-6, what=lambda m: f"generated grad: {m}")
    _check_metrics(metrics, exp_metrics, SPIN_KEYS, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors runs in the interpreter only")
def test_the_implementation_argument_overrides_the_environment(monkeypatch) -> None:
    """``implementation=`` picks the kernel whatever FABRIC_ALIGN_KERNELS says; both give the same numbers."""
    from fabric_align.kernels import losses_triton

    monkeypatch.setattr(losses, "ensure_checked", lambda *a, **k: None)  # count this test's calls only

    calls = []
    real_forward = losses_triton.kto_forward
    monkeypatch.setattr(losses_triton, "kto_forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    gen = torch.Generator().manual_seed(5)
    tokens = -torch.rand(6, 9, generator=gen)
    ref, labels = -torch.rand(6, generator=gen) * 9, torch.tensor([True, False] * 3)
    results = {}
    for env, implementation in (("triton", "torch"), ("torch", "triton")):
        monkeypatch.setenv("FABRIC_ALIGN_KERNELS", env)
        logps = tokens.clone().requires_grad_()
        loss, _ = losses.kto_loss(logps, ref, labels, torch.tensor(0.2), implementation=implementation)
        loss.backward()
        results[implementation] = (loss.detach(), logps.grad)
    assert len(calls) == 1  # only the call that asked for Triton ran it, against the environment's choice
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="implementation='cuda'"):
        losses.kto_loss(tokens, ref, labels, torch.tensor(0.2), implementation="cuda")  # type: ignore[arg-type]
