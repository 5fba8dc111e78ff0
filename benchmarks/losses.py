"""Micro-benchmark of the fused KTO / SPIN losses against the torch implementation and the reference.

On CUDA it times forward + backward (``torch.autograd.grad`` into the token log-probs, so no gradient
accumulation copy is counted) with CUDA events, and counts the GPU kernels of one step with the profiler
(memsets and copies included). Without CUDA it runs a tiny sanity comparison on CPU; ``--interpret`` adds the
Triton kernels through the Triton interpreter (slow, fp32 only).

    python benchmarks/losses.py                       # GPU: default shapes, bf16 token log-probs
    python benchmarks/losses.py --dtype float32 --shapes 8x1024 64x4096
    python benchmarks/losses.py --interpret           # CPU sanity incl. the Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

IMPLS = ("triton", "torch", "reference")


def _make_inputs(loss: str, batch: int, length: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def tokens(t: int) -> torch.Tensor:
        values = -2.0 * torch.rand(batch, t, generator=gen)
        lengths = torch.randint(1, t + 1, (batch,), generator=gen)
        return (values * (torch.arange(t)[None, :] < lengths[:, None])).to(device=device, dtype=dtype)

    if loss == "kto":
        x = tokens(length)
        ref = x.float().sum(-1) + 4 * torch.randn(batch, generator=gen).to(device)
        labels = (torch.rand(batch, generator=gen) < 0.5).to(device)
        return (x, ref, labels, torch.tensor(0.3, device=device)), [0]
    real, gen_tokens = tokens(length), tokens(length // 2 + 1)
    ref_real = real.float().sum(-1) + 3 * torch.randn(batch, generator=gen).to(device)
    ref_gen = gen_tokens.float().sum(-1) + 3 * torch.randn(batch, generator=gen).to(device)
    return (real, gen_tokens, ref_real, ref_gen), [0, 1]


def _step_fn(loss: str, impl: str, args: tuple, grad_idx: list[int]) -> Callable[[], tuple]:
    from fabric_align.kernels import losses

    if loss == "kto":
        fn = losses.kto_loss_reference if impl == "reference" else losses.kto_loss
        kwargs = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.33}
    else:
        fn = losses.spin_loss_reference if impl == "reference" else losses.spin_loss
        kwargs = {"beta": 0.1}
    leaves = [a.detach().requires_grad_() if i in grad_idx else a for i, a in enumerate(args)]

    def step() -> tuple:
        if impl != "reference":
            os.environ["FABRIC_ALIGN_KERNELS"] = impl
        value, metrics = fn(*leaves, **kwargs)
        grads = torch.autograd.grad(value, [leaves[i] for i in grad_idx])
        return value, metrics, grads

    return step


def _time_cuda(step: Callable[[], tuple], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # microseconds
    return statistics.median(times)


def _count_gpu_ops(step: Callable[[], tuple]) -> int:
    from torch.profiler import ProfilerActivity, profile

    step()  # compile / autotune outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _max_diff(a: tuple, b: tuple) -> float:
    """Largest abs difference of loss, metrics and gradients between two steps' results."""
    diffs = [(a[0].float() - b[0].float()).abs().item()]
    diffs += [(a[1][k].float() - b[1][k].float()).abs().item() for k in a[1]]
    diffs += [(ga.float() - gb.float()).abs().max().item() for ga, gb in zip(a[2], b[2], strict=True)]
    return max(diffs)


def run_gpu(shapes: list[tuple[int, int]], dtype: torch.dtype, warmup: int, reps: int) -> None:
    print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}  (fwd+bwd, median of {reps}, microseconds)")
    print("| loss | B x T | impl | GPU ops / step | time (us) | max abs diff vs reference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for loss in ("kto", "spin"):
        for batch, length in shapes:
            args, grad_idx = _make_inputs(loss, batch, length, dtype, "cuda")
            expected = _step_fn(loss, "reference", args, grad_idx)()
            for impl in IMPLS:
                step = _step_fn(loss, impl, args, grad_idx)
                diff = _max_diff(step(), expected)
                ops = _count_gpu_ops(step)
                us = _time_cuda(step, warmup, reps)
                shape = f"{batch}x{length}" if loss == "kto" else f"{batch}x{length}/{length // 2 + 1}"
                print(f"| {loss} | {shape} | {impl} | {ops} | {us:.1f} | {diff:.2e} |")


def run_cpu(interpret: bool) -> None:
    impls = [i for i in IMPLS if interpret or i != "triton"]
    print(f"CPU sanity (no CUDA): fp32, impls {impls}")
    for loss in ("kto", "spin"):
        args, grad_idx = _make_inputs(loss, 5, 37, torch.float32, "cpu")
        expected = _step_fn(loss, "reference", args, grad_idx)()
        for impl in impls:
            step = _step_fn(loss, impl, args, grad_idx)
            start = time.perf_counter()
            result = step()
            ms = (time.perf_counter() - start) * 1e3
            diff = _max_diff(result, expected)
            print(f"  {loss:4s} {impl:9s} loss={result[0].item():.6f}  diff={diff:.2e}  {ms:.1f} ms")


def _shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(8, 1024), (16, 2048), (64, 4096)])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--interpret", action="store_true", help="CPU only: also run Triton via its interpreter")
    args = parser.parse_args()
    if torch.cuda.is_available():
        run_gpu(args.shapes, getattr(torch, args.dtype), args.warmup, args.reps)
    else:
        if args.interpret:  # must be set before losses_triton (lazily imported) decorates its kernels
            os.environ["TRITON_INTERPRET"] = "1"
        run_cpu(args.interpret)


if __name__ == "__main__":
    main()
