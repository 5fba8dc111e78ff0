"""Choose between the Triton kernels and the plain-torch implementations."""

from __future__ import annotations

import os
from typing import Literal

import torch

_ENV = "FABRIC_ALIGN_KERNELS"


def kernel_choice() -> str:
    """``FABRIC_ALIGN_KERNELS``: ``triton``, ``torch`` or ``auto`` (unset); anything else is an error."""
    choice = os.environ.get(_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{_ENV}={choice!r}: expected 'triton', 'torch' or unset")
    return choice


Implementation = Literal["auto", "triton", "torch"]


def use_triton(*tensors: torch.Tensor, implementation: Implementation | None = None) -> bool:
    """Whether to run the Triton kernel: ``implementation`` when given, else ``FABRIC_ALIGN_KERNELS``; ``auto`` means
    Triton on CUDA tensors and torch elsewhere.

    Forcing ``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (the Triton interpreter).
    """
    choice = implementation or kernel_choice()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"implementation={choice!r}: expected 'auto', 'triton' or 'torch'")
    if choice != "auto":
        return choice == "triton"
    if not all(t.is_cuda for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
