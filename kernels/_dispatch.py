"""Choose between the Triton kernels and the plain-torch implementations."""

from __future__ import annotations

import os

import torch

_ENV = "FABRIC_ALIGN_KERNELS"


def kernel_choice() -> str:
    """``FABRIC_ALIGN_KERNELS``: ``triton``, ``torch`` or ``auto`` (unset); anything else is an error."""
    choice = os.environ.get(_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{_ENV}={choice!r}: expected 'triton', 'torch' or unset")
    return choice


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors, torch elsewhere; ``FABRIC_ALIGN_KERNELS=triton|torch`` forces one.

    Forcing ``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (the Triton interpreter).
    """
    choice = kernel_choice()
    if choice != "auto":
        return choice == "triton"
    if not all(t.is_cuda for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
