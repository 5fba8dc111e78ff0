"""First-use self-check of the Triton kernels against the torch implementations.

A kernel compiled for a GPU, driver or Triton version that CI has never run on must not silently return wrong
log-probs. The first time a Triton kernel runs in a process on a given device and dtype, a small probe with ragged
shapes is computed by both implementations; if any output disagrees beyond what the dtype's rounding explains, the
run stops with an error that names ``FABRIC_ALIGN_KERNELS=torch`` as the way around. The probe costs a fraction of
a second once (compilation aside, which the first real call would pay anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CHECKED: set[tuple[str, str, torch.dtype]] = set()

# Largest error allowed, relative to the largest magnitude of the torch result, per input dtype. Rounding differences
# between two correct implementations stay far below; a wrong tile, index or reduction gives errors of order one.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_TOLERANCE = 3e-3  # fp32 inputs whose dots run on tensor cores in tf32

Probe = Callable[[torch.device, torch.dtype], dict[str, tuple[torch.Tensor, torch.Tensor]]]


class KernelCheckError(RuntimeError):
    """A Triton kernel disagreed with the torch implementation on this device."""


def ensure_checked(kind: str, device: torch.device, dtype: torch.dtype, probe: Probe, tolerance: float) -> None:
    """Run ``probe`` (``{name: (triton result, torch result)}``) once per (kind, device, dtype) in this process."""
    key = (kind, str(device), dtype)
    if key in _CHECKED:
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        outputs = probe(device, dtype)
    for name, (got, want) in outputs.items():
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        scale = float(want.abs().max()) if want.numel() else 0.0
        error = float((got - want).abs().max()) / max(scale, 1e-6) if want.numel() else 0.0
        if not error <= tolerance:  # also catches NaN
            raise KernelCheckError(
                f"the Triton {kind} kernel disagrees with the torch implementation on {device} ({dtype}): {name} "
                f"is off by {error:.2e} of its largest value (allowed: {tolerance:.0e}); this GPU, driver or Triton "
                "version computes it wrongly. Set FABRIC_ALIGN_KERNELS=torch to use the torch kernels"
            )
    _CHECKED.add(key)


def forget() -> None:
    """Check again on next use (tests)."""
    _CHECKED.clear()
