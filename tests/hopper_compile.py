"""Compile every Triton kernel of fabric_align.kernels for Hopper (sm_90a) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not whether they compile for a GPU:
dtype rules of ``tl.dot``, shared memory per tile config, register spills. Triton's compiler itself needs no GPU,
only a target: this script installs a CUDA driver stand-in that reports a compute-capability 9.0 device, makes
every kernel launch compile only (``warmup``), and then drives the real host code (``fused_linear_logprob``'s
forward and backward with each tile config the autotuner may pick, ``kto_loss`` and ``spin_loss`` with their
backward) on CPU tensors, so the kernels are specialized exactly as in real calls. Each compiled kernel is printed
as one JSON line: name, dtype/precision case, config, shared memory, registers, spilled bytes, and whether its
dots use Hopper's wgmma. ``tests/test_hopper_compile.py`` runs it in a fresh process (Triton must not be in
interpreter mode there, and the active driver is replaced) and checks the numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FABRIC_ALIGN_KERNELS"] = "triton"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCH = 90


class HopperWithoutGPU(CudaDriver):
    """Reports one sm_90 device and no more: enough to compile, never to launch (CudaDriver's own __init__ would
    load libcuda, so it is not called)."""

    def __init__(self) -> None:
        pass

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(ARCH, 10)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", ARCH, 32)


CASE = {"name": ""}
_run = JITFunction.run


def compile_only(self: JITFunction, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    report(self.fn.__name__, kernel, kwargs)
    return kernel


def report(name: str, kernel, kwargs: dict) -> None:
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", source, "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True,
            text=True,
        )
    registers = re.findall(r"Used (\d+) registers", result.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", result.stderr)
    config = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
    row = {
        "kernel": name,
        "case": CASE["name"],
        "config": {k: v for k, v in config.items() if isinstance(v, (int, str, bool))},
        "shared": kernel.metadata.shared,
        "registers": int(registers[0]) if registers else None,
        "spill_bytes": int(spills[0]) if spills else None,
        "wgmma": "wgmma" in ptx,
    }
    print(json.dumps(row), flush=True)


def logprob_kernels(dtype: torch.dtype, precision: str, n: int, width: int, vocab: int, all_configs: bool) -> None:
    from fabric_align.kernels import logprob_triton as lt

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, width, generator=gen).to(dtype)
    weight = torch.randn(vocab, width, generator=gen).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    named = {"h_ptr": hidden}
    precision = lt._dot_precision(dtype)
    forward_configs = [_meta(c) for c in lt._prune(lt._fwd_tuned.configs, named, DOT_PRECISION=precision)]
    grad_configs = [_meta(c) for c in lt._prune(lt._grad_tuned.configs, named, DOT_PRECISION=precision)]
    for with_bias in (False, True) if all_configs else (True,):
        b = bias if with_bias else None
        for meta in forward_configs if all_configs else forward_configs[:1]:
            with lt.override_config(**meta):
                _, lse2 = lt.forward(hidden, weight, b, targets, 1.0)
        for meta in grad_configs if all_configs else grad_configs[:1]:
            with lt.override_config(**meta):
                lt.backward(hidden, weight, b, targets, lse2, upstream, 1.0, True, True, with_bias)


def _meta(config) -> dict[str, int]:
    return {"GROUP_N": 8, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def loss_kernels(dtype: torch.dtype) -> None:
    from fabric_align.kernels import kto_loss, spin_loss

    gen = torch.Generator().manual_seed(0)
    for batch, length in ((32, 512), (7, 33), (100, 9)):
        logps = (-torch.rand(batch, length, generator=gen)).to(dtype).requires_grad_()
        labels = torch.rand(batch, generator=gen) > 0.5
        loss, _ = kto_loss(logps, -torch.rand(batch, generator=gen) * length, labels, torch.tensor(0.1), beta=0.1)
        loss.backward()
        ref = -torch.rand(batch, generator=gen)
        loss, _ = kto_loss(logps, ref, labels, torch.tensor(0.0), loss_type="apo_zero_unpaired")
        loss.backward()
        generated = (-torch.rand(batch, length + 5, generator=gen)).to(dtype).requires_grad_()
        loss, _ = spin_loss(logps, generated, -torch.rand(batch, generator=gen), -torch.rand(batch, generator=gen))
        loss.backward()


def skip_self_check(*args, **kwargs) -> None:
    """Compile-only launches compute nothing, so the first-use self-check would compare garbage with the torch path;
    the kernels it would run are compiled here anyway."""


def main() -> None:
    from fabric_align.kernels import logprob, losses

    driver.set_active(HopperWithoutGPU())
    JITFunction.run = compile_only
    logprob.ensure_checked = losses.ensure_checked = skip_self_check
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")):
        CASE["name"] = f"{str(dtype).removeprefix('torch.')}/{precision}"
        logprob_kernels(dtype, precision, 300, 256, 2048, all_configs=True)
        # Odd sizes (no real model has them): no divisibility specialization of H or V, unaligned rows.
        CASE["name"] += "/odd"
        logprob_kernels(dtype, precision, 37, 200, 1000, all_configs=False)
    for dtype in (torch.float32, torch.bfloat16):
        CASE["name"] = f"{str(dtype).removeprefix('torch.')}/losses"
        loss_kernels(dtype)


if __name__ == "__main__":
    sys.exit(main())
