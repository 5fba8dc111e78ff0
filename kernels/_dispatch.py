"""Choose between the Triton kernels and the plain-torch implementations."""

from __future__ import annotations

import os

import torch

_ENV = "FABRIC_ALIGN_KERNELS"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors, torch elsewhere; ``FABRIC_ALIGN_KERNELS=triton|torch`` forces one.

    Forcing ``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (the Triton interpreter).
    """
    choice = os.environ.get(_ENV, "").strip().lower()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    if choice not in ("", "auto"):
        raise ValueError(f"{_ENV}={choice!r}: expected 'triton', 'torch' or unset")
    if not all(t.is_cuda for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
