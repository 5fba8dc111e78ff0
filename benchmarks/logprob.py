"""Benchmark ``fused_linear_logprob``: forward + backward time and extra peak memory against the naive op.

Methods: ``triton`` (the Triton kernels), ``torch`` (the chunked torch path; ``torch-keep-softmax`` with
``keep_softmax_bytes`` unlimited; ``torch-recompute`` forced to recompute the logits in every backward, as before a
frozen weight's forward computed the hidden gradient's factor), ``naive``
(``log_softmax((h @ W.T).float()).gather``), ``compile`` (``torch.compile`` of naive) and ``liger`` (Liger-Kernel's
fused linear cross entropy, sum reduction; skipped when not installed). Every step is forward + backward into
hidden and weight (``--frozen-weight``: hidden only, as with LoRA) with the gradients cleared first, so each method
allocates the same gradient tensors.

GPU (default when CUDA is available): bf16 at N=16384, H=4096, V=128256 and the KTO shape B=32 x T=512,
H=1024, V=128256. Time is the median of CUDA-event timings; extra peak is ``max_memory_allocated`` during the
step minus the memory allocated before it (inputs excluded, gradients included). Throughput counts
8*N*H*V flops per step (forward, recompute, dH, dW) for every method, against the device's dense bf16 peak.

CPU (``--cpu`` or no CUDA): torch path vs naive, fp32, N=2048, H=256, V=131072. Each method runs in fresh
subprocesses (alternating methods across rounds, since CPU timings drift); extra peak is the resident-set
high-water mark during one step (VmHWM, reset through /proc/self/clear_refs) minus the resident set before it,
with glibc told to mmap every large block so that freed buffers leave the resident set.

    python benchmarks/logprob.py                      # GPU if available, else the CPU comparison
    python benchmarks/logprob.py --cpu                # CPU comparison (about 3 minutes on 2 cores)
    python benchmarks/logprob.py --shapes 16384x4096x128256 --methods triton naive liger
    python benchmarks/logprob.py --cpu --frozen-weight --shapes 1024x576x49152 --methods torch torch-recompute naive
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

METHODS = ("triton", "torch", "torch-keep-softmax", "torch-recompute", "naive", "compile", "liger")
GPU_SHAPES = [(16384, 4096, 128256), (32 * 512, 1024, 128256)]
CPU_SHAPE = (2048, 256, 131072)
# Dense bf16 tensor-core peak, TFLOP/s (no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "A100": 312.0}


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0, frozen_weight: bool = False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    # ~unit-variance logits, like a trained lm_head on normalized hidden states
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device=device, dtype=dtype)
    weight.requires_grad_(not frozen_weight)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    upstream = torch.randn(n, generator=gen).to(device)
    return hidden, weight, targets, upstream


def _naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _make_step(method: str, hidden, weight, targets, upstream) -> Callable[[], torch.Tensor | None]:
    """A closure running one forward + backward; returns the per-token log-probs (None for liger)."""
    if method in ("triton", "torch", "torch-keep-softmax", "torch-recompute"):
        from fabric_align.kernels import fused_linear_logprob, logprob

        if method == "torch-recompute":
            logprob._early_gradient = lambda *args: (logprob.RECOMPUTE, 0)
        keep = 1 << 62 if method == "torch-keep-softmax" else 0

        def fwd():
            os.environ["FABRIC_ALIGN_KERNELS"] = "triton" if method == "triton" else "torch"
            return fused_linear_logprob(hidden, weight, targets, keep_softmax_bytes=keep)

    elif method == "naive":
        fwd = lambda: _naive(hidden, weight, targets)
    elif method == "compile":
        compiled = torch.compile(_naive)
        fwd = lambda: compiled(hidden, weight, targets)
    elif method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional dependency

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step() -> None:
            hidden.grad = weight.grad = None
            loss_fn(weight, hidden, targets).backward()  # -sum(logp): same work, scalar upstream gradient

        return step
    else:
        raise ValueError(method)

    def step() -> torch.Tensor:
        hidden.grad = weight.grad = None
        out = fwd()
        out.backward(upstream)
        return out.detach()

    return step


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


def _peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def _gpu_measure(step: Callable, warmup: int, reps: int) -> tuple[float, int, torch.Tensor | None]:
    out = None
    for _ in range(warmup):  # includes autotuning / compilation
        out = step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), peak, out


def run_gpu(shapes, methods, warmup: int, reps: int, peak_override: float | None) -> None:
    peak_tflops = _peak_tflops(peak_override)
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"# dense bf16 peak: {peak_tflops or 'unknown (pass --peak-tflops)'} TFLOP/s")
    for n, h, v in shapes:
        hidden, weight, targets, upstream = _inputs(n, h, v, torch.bfloat16, "cuda")
        grads_mb = (hidden.numel() + weight.numel()) * 2 / 2**20
        print(
            f"\n## N={n} H={h} V={v}  (gradients alone: {grads_mb:.0f} MiB; N x V fp32 logits: "
            f"{n * v * 4 / 2**20:.0f} MiB)"
        )
        rows = {}
        ref = None
        for method in ["naive"] + [m for m in methods if m != "naive"]:  # naive first: the ratios' baseline
            try:
                step = _make_step(method, hidden, weight, targets, upstream)
                seconds, peak, out = _gpu_measure(step, warmup, reps)
            except ImportError as err:
                rows[method] = f"skipped ({err.name} not installed)"
                continue
            except torch.cuda.OutOfMemoryError:
                rows[method] = "out of memory"
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                continue
            if method == "naive":
                ref = out
            diff = (out - ref).abs().max().item() if out is not None and ref is not None else None
            rows[method] = (seconds, peak, diff)
        _print_table(rows, flops=8 * n * h * v, peak_tflops=peak_tflops)


# ----------------------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _cpu_worker(method: str, shape: tuple[int, int, int], reps: int, frozen_weight: bool) -> None:
    """One fresh process: warm-up step, one memory-measured step, then timed steps. Prints one JSON line."""
    n, h, v = shape
    hidden, weight, targets, upstream = _inputs(n, h, v, torch.float32, "cpu", frozen_weight=frozen_weight)
    step = _make_step(method, hidden, weight, targets, upstream)
    out = step()  # warm-up: thread pools, first-touch of the gradient buffers
    hidden.grad = weight.grad = None
    gc.collect()
    rss_before = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak_kb = _proc_status_kb("VmHWM") - rss_before
    print(json.dumps({"method": method, "times": times, "peak": peak_kb * 1024, "out": out.tolist()}))


def run_cpu(shape, methods, rounds: int, reps: int, frozen_weight: bool) -> None:
    n, h, v = shape
    print(
        f"# device: CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), fp32, {datetime.date.today()}"
    )
    print(
        f"## N={n} H={h} V={v}{', frozen weight' * frozen_weight}  (gradients alone: "
        f"{(n * h + v * h * (not frozen_weight)) * 4 / 2**20:.0f} MiB; "
        f"N x V fp32 logits: {n * v * 4 / 2**20:.0f} MiB)"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results: dict[str, dict] = {}
    for r in range(rounds):
        order = methods if r % 2 == 0 else list(reversed(methods))
        for method in order:
            cmd = [sys.executable, __file__, "--worker", method, "--shapes", f"{n}x{h}x{v}", "--reps", str(reps)]
            cmd += ["--frozen-weight"] if frozen_weight else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  round {r} {method:8s} " + " ".join(f"{t:.2f}s" for t in res["times"]), flush=True)
            prev = results.setdefault(method, {"times": [], "peak": res["peak"], "out": res["out"]})
            prev["times"] += res["times"]
            prev["peak"] = max(prev["peak"], res["peak"])
    ref = torch.tensor(results["naive"]["out"]) if "naive" in results else None
    rows = {}
    for method in methods:
        res = results[method]
        diff = (torch.tensor(res["out"]) - ref).abs().max().item() if ref is not None else None
        rows[method] = (statistics.median(res["times"]), res["peak"], diff)
    _print_table(rows, flops=None, peak_tflops=None)


# ----------------------------------------------------------------------------------------------------------------


def _print_table(rows: dict, flops: int | None, peak_tflops: float | None) -> None:
    base = rows.get("naive")
    base = base if isinstance(base, tuple) else None
    head = "| method | fwd+bwd | vs naive | extra peak memory | vs naive | max abs diff vs naive |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if flops:
        head += " TFLOP/s (8NHV) | % of bf16 peak |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for method, row in rows.items():
        if not isinstance(row, tuple):
            print(f"| {method} | {row} |")
            continue
        seconds, peak, diff = row
        time_ratio = f"{seconds / base[0]:.2f}x" if base else "-"
        mem_ratio = f"{peak / base[1]:.3f}x" if base and base[1] > 0 else "-"
        diff_text = "-" if diff is None or method == "naive" else f"{diff:.1e}"
        line = (
            f"| {method} | {seconds * 1e3:.0f} ms | {time_ratio} | {peak / 2**20:.0f} MiB | {mem_ratio} | {diff_text} |"
        )
        if flops:
            tflops = flops / seconds / 1e12
            pct = f"{100 * tflops / peak_tflops:.0f}%" if peak_tflops else "-"
            line += f" {tflops:.0f} | {pct} |"
        print(line)


def _shape(text: str) -> tuple[int, int, int]:
    n, h, v = (int(x) for x in text.lower().split("x"))
    return n, h, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the CPU comparison even if CUDA is available")
    parser.add_argument("--shapes", nargs="+", type=_shape, help="NxHxV, e.g. 16384x4096x128256")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all on GPU, torch naive on CPU")
    parser.add_argument("--warmup", type=int, default=3, help="GPU warm-up steps (autotuning, compilation)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default GPU 10, CPU 2 per round)")
    parser.add_argument("--rounds", type=int, default=2, help="CPU: fresh processes per method")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device dense bf16 peak, TFLOP/s")
    parser.add_argument(
        "--frozen-weight", action="store_true", help="CPU: gradients for hidden only (a frozen lm_head, as with LoRA)"
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        _cpu_worker(args.worker, args.shapes[0], args.reps, args.frozen_weight)
    elif torch.cuda.is_available() and not args.cpu:
        run_gpu(
            args.shapes or GPU_SHAPES, args.methods or list(METHODS), args.warmup, args.reps or 10, args.peak_tflops
        )
    else:
        methods = args.methods or ["torch", "naive"]
        run_cpu((args.shapes or [CPU_SHAPE])[0], methods, args.rounds, args.reps or 2, args.frozen_weight)


if __name__ == "__main__":
    main()
