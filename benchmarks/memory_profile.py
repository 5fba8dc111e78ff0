"""Where the peak memory of a KTO or SPIN training step goes, phase by phase (CPU).

Runs the real trainer (``fabric_align.kto.cli`` / ``fabric_align.spin.cli``, in this process, CSV logger) on a
random-weight model from ``benchmarks/kto_step.py``'s configs and synthetic rows, and samples the bytes the process
has allocated (glibc's ``mallinfo2``, where torch's CPU tensors live; unlike the resident set it drops as soon as a
tensor is freed) every 2 ms while tagging what the loop is doing: the step's no-grad pass (KTO's KL pairs), each
micro-batch's forward, its backward, gradient clipping, the optimizer step. The table shows, per phase, the highest
allocation seen during it minus the allocation after step 1 (weights, optimizer state, reference log-probs and data
in place), over steps 2..N. The largest phase is the one to cut.

    python benchmarks/memory_profile.py --method kto --config llama-58m --micro-batch 8 --seq-len 256
    python benchmarks/memory_profile.py --method spin --config llama-58m --micro-batch 4 --seq-len 256
    python benchmarks/memory_profile.py --method kto ... --flags --train.foreach=false   # extra trainer flags
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kto_step import CONFIGS, build_model, environment, hwm_mib, make_rows  # noqa: E402
from spin_step import make_pairs  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_LIBC.mallinfo2.restype = _MallInfo2


def allocated_mib() -> float:
    """Bytes the process has allocated and not freed (glibc's heap in use plus its mmapped blocks, where torch's
    CPU tensors live): unlike the resident set, it drops as soon as a tensor is freed."""
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


class PhaseSampler:
    """A thread that samples the allocated bytes every ``interval`` seconds and keeps each phase's maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.phase, self.peaks = interval, "setup", {}
        self.counting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.counting:  # the phase first: a sample taken as a phase ends must not count for the next one
                phase = self.phase
                self.peaks[phase] = max(self.peaks.get(phase, 0.0), allocated_mib())
            time.sleep(self.interval)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            if self.counting:  # the phase's end counts too (a sample may fall between two of ours)
                self.peaks[phase] = max(self.peaks.get(phase, 0.0), allocated_mib())
            self.phase = before

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wrap(owner: Any, name: str, phase: str, sampler: PhaseSampler) -> None:
    real: Callable[..., Any] = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with sampler.during(phase):
            return real(*args, **kwargs)

    setattr(owner, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("kto", "spin"), default="kto")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama-58m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="extra flags for the trainer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightning.fabric import Fabric

    from fabric_align import kto, loop, spin

    work = Path(tempfile.mkdtemp(prefix="memory-profile-"))
    n_params = build_model(args.config, work / "model", bf16=False, seed=0)
    rows = args.global_batch * args.steps
    if args.method == "kto":
        data = make_rows(rows, args.seq_len, seed=0)
    else:
        data, _ = make_pairs(rows, args.seq_len, seed=0)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))

    sampler = PhaseSampler()
    recipe = kto.KTO if args.method == "kto" else spin.SPIN
    wrap(recipe, "prepare_step", "no-grad pass (KTO: KL pairs)", sampler)
    wrap(recipe, "micro_step", "forward", sampler)
    wrap(Fabric, "backward", "backward", sampler)
    wrap(Fabric, "clip_gradients", "clip gradients", sampler)
    wrap(torch.optim.AdamW, "step", "optimizer step", sampler)
    state: dict[str, Any] = {"baseline": None, "steps": 0}
    real_fit_log = loop.MetricLogger.log

    def on_log(self: Any, metrics: dict[str, float], step: int) -> None:
        if "train/step" in metrics:
            state["steps"] += 1
            if state["steps"] == 1:  # from step 2 on: the optimizer state exists
                sampler.peaks.clear()
                state["baseline"] = allocated_mib()
                sampler.counting = True
        real_fit_log(self, metrics, step)

    loop.MetricLogger.log = on_log
    flags = [
        f"--model.name_or_path={work / 'model'}",
        f"--data.train_path={work / 'train.jsonl'}",
        "--data.val_path=null",
        f"--data.max_length={args.seq_len}",
        f"--train.global_batch_size={args.global_batch}",
        f"--train.micro_batch_size={args.micro_batch}",
        f"--train.eval_batch_size={2 * args.micro_batch}",
        "--train.save_interval=null",
        "--logger.backend=csv",
        "--precision=32-true",
        f"--out_dir={work / 'out'}",
    ]
    if args.method == "kto":
        flags += [f"--train.max_steps={args.steps}"]
        entry = kto.cli
    else:
        flags += ["--spin.iterations=1", "--spin.epochs_per_iteration=1", "--spin.reuse_generated=true"]
        entry = spin.cli
    sampler.start()
    try:
        entry([*flags, *args.flags])
    finally:
        sampler.stop()

    print(json.dumps(environment("cpu")))
    print(
        f"{args.method}: {args.config} ({n_params / 1e6:.1f}M parameters), micro-batch {args.micro_batch} x "
        f"{args.seq_len} tokens, global batch {args.global_batch}, {args.threads} thread(s)"
    )
    weights = n_params * 4 / 2**20
    print(f"static: weights {weights:.0f} MiB, gradients {weights:.0f} MiB, AdamW state {2 * weights:.0f} MiB")
    baseline = state["baseline"] or 0.0
    print(f"allocated after step 1: {baseline:.0f} MiB; peak above it, per phase (steps 2..{args.steps}):")
    print("| phase | peak allocated - after step 1, MiB |")
    print("|---|---:|")
    for phase, peak in sorted(sampler.peaks.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {peak - baseline:.0f} |")
    print(f"process high-water mark: {hwm_mib():.0f} MiB")


if __name__ == "__main__":
    main()
