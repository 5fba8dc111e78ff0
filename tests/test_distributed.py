"""Real multi-process training on CPU with gloo: FSDP2 through `fabric run`, DDP through the script's own launch.

With the same global batch, 2 processes follow the same loss curve as 1 process, and z0 (the KL reference point)
does not depend on how the step's examples are split into micro-batches and ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fabric_align import kto

from conftest import FAST, REPO, column, fabric_cli, load_safetensors, read_metrics, run_cli, run_script

ARGS = [
    *FAST,
    "--train.global_batch_size=8",
    "--train.max_steps=6",
    "--train.eval_interval=3",
    "--train.save_interval=3",
    "--train.lr=2e-3",
]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    run_cli(kto.setup, [*ARGS, "--train.micro_batch_size=4", f"--out_dir={out}"])  # 2 accumulation steps
    return out


def assert_same_curves(a: Path, b: Path) -> None:
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    for key in ("train/loss", "train/kl", "train/rewards/margins", "val/loss", "val/kl", "val/rewards/margins"):
        torch.testing.assert_close(
            torch.tensor(column(rows_a, key)), torch.tensor(column(rows_b, key)), rtol=1e-4, atol=1e-5, msg=key
        )


def fsdp_launch() -> list[str]:
    return [*fabric_cli(), "--accelerator=cpu", "--devices=2"]


FSDP_ARGS = [*ARGS, "--train.micro_batch_size=2", "--strategy=fsdp"]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "out"
    run_script("kto.py", [*FSDP_ARGS, f"--out_dir={out}"], launcher=fsdp_launch())
    return out


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(single: Path, fsdp: Path) -> None:
    assert_same_curves(single, fsdp)
    shards = {p.name for p in (fsdp / "step-000003" / "state").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= shards  # a sharded (DCP) checkpoint, one file per rank
    assert (fsdp / "step-000003" / "rng-rank1.pt").is_file()
    # The run records what `fabric run` launched (its --devices, the script's --strategy), not the flags' defaults.
    config = json.loads((fsdp / "step-000003" / "meta.json").read_text())["config"]
    assert (config["devices"], config["num_nodes"], config["strategy"]) == (2, 1, "fsdp")
    a = load_safetensors(single / "final" / "model.safetensors")
    b = load_safetensors(fsdp / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp2_resume_is_bit_identical(fsdp: Path, tmp_path: Path) -> None:
    """Resuming the 2-process run from its sharded step-3 checkpoint ends where the unbroken run ended."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(fsdp / "step-000003", out / "step-000003")
    shutil.copytree(fsdp / "cache", out / "cache")
    run_script("kto.py", [*FSDP_ARGS, f"--out_dir={out}", "--resume=auto"], launcher=fsdp_launch())
    assert column(read_metrics(out), "train/step") == [4, 5, 6]
    a = load_safetensors(fsdp / "final" / "model.safetensors")
    b = load_safetensors(out / "final" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_ddp_with_the_scripts_own_launch(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run_script("kto.py", [*ARGS, "--train.micro_batch_size=4", "--devices=2", "--strategy=ddp", f"--out_dir={out}"])
    assert_same_curves(single, out)


def test_z0_does_not_depend_on_the_micro_batch_split(single: Path, tmp_path: Path) -> None:
    out = tmp_path / "micro1"
    run_cli(kto.setup, [*ARGS, "--train.micro_batch_size=1", f"--out_dir={out}"])  # 8 accumulation steps
    kl_a, kl_b = column(read_metrics(single), "train/kl"), column(read_metrics(out), "train/kl")
    # Sequence log-probs are sums of ~100 fp32 terms around -300: batches padded to other widths differ by ~1e-5.
    assert max(kl_a) > 0.05  # the runs moved away from the reference, so z0 is not trivially 0
    torch.testing.assert_close(torch.tensor(kl_a), torch.tensor(kl_b), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_fsdp2_rank0_reads_the_weights_of_a_tied_pretrained_model(tmp_path: Path) -> None:
    """A local pretrained model with tied embeddings and attention biases (Qwen2-style): under FSDP2 only rank 0
    reads it, rank 1 builds on the meta device and gets its shards and rotary buffers from rank 0; training then
    matches 1 process, and the export keeps the tie."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fabric_align.args import ModelArgs
    from fabric_align.modeling import load_tokenizer

    model_dir = tmp_path / "tiny-qwen2"
    config = Qwen2Config(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    load_tokenizer(ModelArgs()).save_pretrained(model_dir)

    args = [*ARGS, "--train.max_steps=3", "--train.save_interval=null", f"--model.name_or_path={model_dir}"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run_cli(kto.setup, [*args, "--train.micro_batch_size=4", f"--out_dir={single}"])
    result = run_script(
        "kto.py", [*args, "--train.micro_batch_size=2", "--strategy=fsdp", f"--out_dir={fsdp}"], launcher=fsdp_launch()
    )
    output = result.stdout + result.stderr
    assert output.count("the other ranks build it on the meta device and take their shards from rank 0") == 1
    # Setup notes and warnings, which every rank meets alike, are shown once (rank 0's), not once per process.
    assert output.count("validation data: fabric-align/kto-demo-val") == 1
    assert output.count("data.max_length=96 dropped 0 of 256 rows") == 1
    assert_same_curves(single, fsdp)
    a = load_safetensors(single / "final" / "model.safetensors")
    b = load_safetensors(fsdp / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    exported = AutoModelForCausalLM.from_pretrained(fsdp / "final")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert any(k.endswith("q_proj.bias") for k in b)


def run_in_one_rank_group(body: str, tmp_path: Path) -> str:
    """Run ``body`` in a fresh process inside a one-process gloo group (on a free port); returns its stdout."""
    from fabric_align.rendezvous import free_port

    port = free_port()
    script = tmp_path / "check.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
        "mesh = init_device_mesh('cpu', (1,))\n" + body + "\ndist.destroy_process_group()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fsdp2_bf16_mixed_all_gathers_bf16_from_fp32_shards(tmp_path: Path) -> None:
    """Under bf16-mixed each decoder layer is gathered in bf16 for the forward while its shards (what the optimizer
    steps) and all gradients stay fp32; the root (embeddings, lm_head) stays fp32. The backward's recomputation
    (selective activation checkpointing, the default) gathers the layer in bf16 again."""
    out = run_in_one_rank_group(
        """
from fabric_align.args import ModelArgs
from fabric_align.modeling import PolicyLogprobs, fsdp2_parallelize, load_model
policy = PolicyLogprobs(load_model(ModelArgs(), dtype=torch.float32, seed=0))
fsdp2_parallelize(policy, mesh, compute_dtype=torch.bfloat16)
seen = []
q_proj = policy.model.model.layers[0].self_attn.q_proj  # inside its unit's forward: the gathered weight
q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
embed = policy.model.model.embed_tokens
embed.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
ids = torch.tensor([[256, 72, 105, 257]])
with torch.autocast("cpu", dtype=torch.bfloat16):  # as Fabric's bf16-mixed runs every forward
    logps = policy(ids, torch.ones_like(ids), torch.tensor([[72, 105, 257, -100]]))
logps.sum().backward()
print(seen, {p.dtype for p in policy.parameters()}, {p.grad.dtype for p in policy.parameters()})
""",
        tmp_path,
    )
    assert out.strip() == "[torch.float32, torch.bfloat16, torch.bfloat16] {torch.float32} {torch.float32}"


def test_fsdp2_opponent_copy_never_writes_into_the_policy(tmp_path: Path) -> None:
    """On a one-rank mesh full_tensor() hands back the shard itself: merging LoRA into the SPIN opponent's copy
    must still leave the policy's frozen base untouched. A tied model's copy stays tied."""
    out = run_in_one_rank_group(
        """
import types
from transformers import Qwen2Config
from fabric_align.args import LoRAArgs, ModelArgs
from fabric_align.generation import opponent_model
from fabric_align.modeling import PolicyLogprobs, add_lora, fsdp2_parallelize, load_model
fabric = types.SimpleNamespace(device=torch.device("cpu"))
policy = PolicyLogprobs(load_model(ModelArgs(lora=LoRAArgs(r=2)), dtype=torch.float32, seed=0))
fsdp2_parallelize(policy, mesh)
with torch.no_grad():
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.full_tensor()  # a collective, like the real gather
            p.to_local().fill_(0.5)
before = {n: p.full_tensor().clone() for n, p in policy.named_parameters() if "base_layer" in n}
opponent = opponent_model(fabric, policy, torch.bfloat16)
after = {n: p.full_tensor() for n, p in policy.named_parameters() if "base_layer" in n}
print(all(torch.equal(before[n], after[n]) for n in before), len(before) > 0)
merged = opponent.model.layers[0].self_attn.q_proj.weight
base = before[next(n for n in before if "layers.0.self_attn.q_proj" in n)]
print(not torch.equal(merged.float(), base.to(torch.bfloat16).float()), merged.dtype)
from transformers import AutoModelForCausalLM
config = Qwen2Config(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=True)
tied = PolicyLogprobs(AutoModelForCausalLM.from_config(config))
fsdp2_parallelize(tied, mesh)
copy = opponent_model(fabric, tied, torch.bfloat16)
print(copy.lm_head.weight is copy.model.embed_tokens.weight)
""",
        tmp_path,
    )
    assert out.split() == ["True", "True", "True", "torch.bfloat16", "True"]


@pytest.mark.slow
def test_fsdp2_bf16_mixed_trains_like_one_process(tmp_path: Path) -> None:
    args = [*ARGS, "--train.max_steps=4", "--train.save_interval=null", "--precision=bf16-mixed"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run_cli(kto.setup, [*args, "--train.micro_batch_size=4", f"--out_dir={single}"])
    run_script(
        "kto.py", [*args, "--train.micro_batch_size=2", "--strategy=fsdp", f"--out_dir={fsdp}"], launcher=fsdp_launch()
    )
    rows_a, rows_b = read_metrics(single), read_metrics(fsdp)
    for key in ("train/loss", "train/rewards/margins", "val/rewards/margins"):
        # The layers' weights are bf16 copies where autocast made per-op ones: bf16 rounding, not fp32's.
        torch.testing.assert_close(
            torch.tensor(column(rows_a, key)), torch.tensor(column(rows_b, key)), rtol=1e-2, atol=1e-2, msg=key
        )


def test_a_meta_built_model_adopts_the_loaded_dtypes() -> None:
    """from_pretrained keeps some modules in fp32 where from_config does not: ranks > 0 take rank 0's dtypes
    (free on the meta device) before anything is broadcast, and tied parameters stay tied."""
    from fabric_align.args import ModelArgs
    from fabric_align.modeling import adopt_dtypes, load_model, parameter_signature

    loaded = load_model(ModelArgs(), dtype=torch.bfloat16, seed=0)
    loaded.model.norm.weight.data = loaded.model.norm.weight.data.float()  # as _keep_in_fp32_modules would
    meta = load_model(ModelArgs(), dtype=torch.bfloat16, seed=0, on_meta=True)
    assert all(t.is_meta for t in meta.parameters())
    assert parameter_signature(meta) != parameter_signature(loaded)
    norm = meta.model.norm.weight
    adopt_dtypes(meta, parameter_signature(loaded))
    assert parameter_signature(meta) == parameter_signature(loaded)
    assert meta.model.norm.weight is norm and norm.dtype == torch.float32 and norm.is_meta
