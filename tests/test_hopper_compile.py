"""Every Triton kernel compiles for Hopper (sm_90a) with the configs the autotuner may pick, without a GPU.

``tests/hopper_compile.py`` compiles them through Triton's real compiler and ptxas against a stand-in sm_90 target;
this test checks what came out: nothing fails to compile, every tile config fits a Hopper SM's shared memory, the
log-prob kernels' dots run on tensor cores (wgmma) for 16-bit and tf32 inputs, and nothing spills registers at
real-model shapes. (The interpreter tests check the values; the gpu-marked tests run them on a GPU.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_MEMORY = 227 * 1024

pytestmark = pytest.mark.slow  # compiles every kernel config through Triton and ptxas (a minute or two)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")))
    script = Path(__file__).with_name("hopper_compile.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_hopper(compiled: list[dict]) -> None:
    kernels = {row["kernel"] for row in compiled}
    assert kernels == {
        "_fwd_kernel",
        "_grad_logits_kernel",
        "_kto_fwd_kernel",
        "_spin_fwd_kernel",
        "_broadcast_rows_kernel",
    }
    cases = {row["case"] for row in compiled if row["kernel"] == "_fwd_kernel"}
    assert {"bfloat16/tf32", "float32/tf32", "float32/ieee"} <= cases
    for row in compiled:
        assert row["shared"] <= HOPPER_SHARED_MEMORY, row
        assert row["registers"] is not None and row["spill_bytes"] is not None, row


def test_logprob_dots_use_tensor_cores_and_do_not_spill(compiled: list[dict]) -> None:
    logprob = [row for row in compiled if row["kernel"] in ("_fwd_kernel", "_grad_logits_kernel")]
    assert len(logprob) >= 30
    for row in logprob:
        # FMA dots only where asked for (fp32 inputs with TF32 off).
        assert row["wgmma"] == (row["config"]["DOT_PRECISION"] == "tf32"), row
        if not row["case"].endswith("/odd"):
            assert row["spill_bytes"] <= 32, row
    for row in compiled:
        if row["kernel"] not in ("_fwd_kernel", "_grad_logits_kernel"):
            assert row["spill_bytes"] == 0, row
