"""QLoRA and the bitsandbytes optimizers on CPU: a 4-bit NF4 base (bitsandbytes Linear4bit / Params4bit) under LoRA
trains, only the adapter changes, the base stays 4-bit and bit-identical, resume continues it exactly, and final/
holds an adapter that reproduces the trained policy on a fresh 4-bit base."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fabric_align import kto, spin
from fabric_align.args import LoRAArgs, ModelArgs, TrainArgs
from fabric_align.data import ChatRenderer, pad_sequences
from fabric_align.errors import ConfigError
from fabric_align.modeling import PolicyLogprobs, load_model, load_tokenizer
from fabric_align.optim import make_optimizer

from conftest import FAST, column, load_safetensors, read_metrics, run_cli

LORA = ["--model.lora.r=4", "--model.lora.alpha=8"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more, and on a busy machine OpenMP's spinning threads
    slow these runs down several times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_with_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model saved with weights (random init): 4-bit loading quantizes pretrained weights, so
    QLoRA needs a directory with safetensors, not the config-only embedded model."""
    path = tmp_path_factory.mktemp("tiny-weights") / "tiny"
    load_model(ModelArgs(), dtype=torch.float32, seed=0).save_pretrained(path, safe_serialization=True)
    load_tokenizer(ModelArgs()).save_pretrained(path)
    return path


def qlora_args(path: Path) -> ModelArgs:
    return ModelArgs(name_or_path=str(path), quantize="4bit", lora=LoRAArgs(r=4, alpha=8))


def quantized_layers(model: torch.nn.Module) -> dict[str, Any]:
    import bitsandbytes as bnb

    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers, "no bitsandbytes Linear4bit layers"
    for name, layer in layers.items():
        assert isinstance(layer.weight, bnb.nn.Params4bit), name
        assert layer.weight.quant_state is not None and layer.weight.quant_state.quant_type == "nf4", name
        assert not layer.weight.requires_grad, name
    return layers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: the 4-bit codes are packed into float storage, where some bytes read as NaN."""
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.view(torch.uint8))
    )


@pytest.fixture(scope="module")
def qlora_run(tiny_with_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Six KTO steps of QLoRA with the paged 8-bit AdamW; returns out_dir and the trained policy (caught on its way
    to the export)."""
    out = tmp_path_factory.mktemp("qlora") / "out"
    caught: dict[str, Any] = {}
    real_finish = kto.finish

    def finish(run: Any, *args: Any, **kwargs: Any) -> Any:
        caught["policy"] = run.policy.module  # Fabric's wrapper -> our PolicyLogprobs
        return real_finish(run, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kto, "finish", finish)
        run_cli(
            kto.setup,
            [
                *FAST,
                *LORA,
                f"--model.name_or_path={tiny_with_weights}",
                "--model.quantize=4bit",
                "--train.optimizer=paged_adamw8bit",
                "--train.max_steps=6",
                "--train.lr=1e-2",
                "--train.eval_interval=3",
                "--train.save_interval=3",
                f"--out_dir={out}",
            ],
        )
    return out, caught["policy"]


def test_qlora_trains_only_the_adapter_and_keeps_the_base_4bit(tiny_with_weights: Path, qlora_run: tuple) -> None:
    out, policy = qlora_run
    fresh = load_model(qlora_args(tiny_with_weights), dtype=torch.float32, seed=42)
    before, after = quantized_layers(fresh), quantized_layers(policy)
    assert sorted(before) == sorted(name.removeprefix("model.") for name in after)

    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    trained = {k.removeprefix("model."): v for k, v in policy.state_dict().items()}
    initial = fresh.state_dict()
    assert sorted(trained) == sorted(initial)
    for key, value in initial.items():  # the packed 4-bit bytes, their quantization statistics, norms, embeddings
        if "lora_" not in key:
            assert same_bits(trained[key], value), key
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means it trained

    margins = column(read_metrics(out), "val/rewards/margins")
    assert margins[-1] > margins[0]


def test_qlora_export_holds_the_adapter(tiny_with_weights: Path, qlora_run: tuple) -> None:
    from peft import PeftModel

    out, policy = qlora_run
    final = out / "final"
    assert (final / "adapter_config.json").is_file()
    adapter = load_safetensors(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert not (final / "model.safetensors").exists() and not (final / "merged").exists()

    # The adapter on a freshly quantized base gives the trained policy's log-probs.
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(tiny_with_weights)))
    data = kto.load_split("fabric-align/kto-demo-val", "test", ChatRenderer(tokenizer), 96, 0, train=False)
    batch = pad_sequences(data.sequences[:4], tokenizer.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["targets"])
    base = load_model(qlora_args(tiny_with_weights), dtype=torch.float32, seed=0).unload()  # the bare 4-bit base
    quantized_layers(base)
    reloaded = PolicyLogprobs(PeftModel.from_pretrained(base, final)).eval()
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*args), policy(*args), rtol=1e-5, atol=1e-5)
        with reloaded.reference():  # and with the adapter off, the 4-bit base itself
            plain = reloaded(*args)
        assert (plain.sum(-1) - policy(*args).sum(-1)).abs().max() > 1e-3
    policy.train()


def test_qlora_resume_continues_exactly(tiny_with_weights: Path, qlora_run: tuple, tmp_path: Path) -> None:
    """Resuming from the 4-bit checkpoint (whose state holds bitsandbytes' quantization statistics) ends with the
    same adapter as the uninterrupted run."""
    out, _ = qlora_run
    resumed = tmp_path / "resumed"
    run_cli(
        kto.setup,
        [
            *FAST,
            *LORA,
            f"--model.name_or_path={tiny_with_weights}",
            "--model.quantize=4bit",
            "--train.optimizer=paged_adamw8bit",
            "--train.max_steps=6",
            "--train.lr=1e-2",
            "--train.eval_interval=3",
            "--train.save_interval=3",
            f"--out_dir={resumed}",
            f"--resume={out / 'step-000003'}",
        ],
    )
    expected = load_safetensors(out / "final" / "adapter_model.safetensors")
    got = load_safetensors(resumed / "final" / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_spin_qlora_trains(tiny_with_weights: Path, tmp_path: Path) -> None:
    run_cli(
        spin.setup,
        [
            *FAST,
            *LORA,
            f"--model.name_or_path={tiny_with_weights}",
            "--model.quantize=4bit",
            "--spin.iterations=1",
            "--spin.epochs_per_iteration=1",
            "--spin.max_new_tokens=4",
            "--train.save_interval=null",
            f"--out_dir={tmp_path / 'out'}",
        ],
    )
    adapter = load_safetensors(tmp_path / "out" / "final" / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().max() > 0 for t in lora_b)  # lora_B starts at zero: the adapter was trained
    losses = column(read_metrics(tmp_path / "out"), "train/loss")
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw", "paged_adamw8bit"])
def test_bitsandbytes_optimizers_step_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64, 128))  # 8-bit states are blockwise: more than one 4096-element block
    small = torch.nn.Parameter(torch.randn(7))
    optimizer = make_optimizer(name, [big, small], TrainArgs(lr=1e-2, weight_decay=0.0))
    start = [big.detach().clone(), small.detach().clone()]
    for _ in range(2):
        (big.square().sum() + small.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(big, start[0]) and not torch.equal(small, start[1])
    state = optimizer.state[big]
    expected = torch.uint8 if name.endswith("8bit") else torch.float32
    assert state["state1"].dtype == expected and state["state1"].device.type == "cpu"


def test_bitsandbytes_optimizers_refuse_fsdp2_parameters() -> None:
    class Sharded(torch.nn.Parameter):  # stands for FSDP2's DTensor parameters (they have full_tensor())
        def full_tensor(self) -> torch.Tensor:
            return self

    params = [Sharded(torch.zeros(8))]
    with pytest.raises(ConfigError, match="adamw8bit .*strategy=fsdp"):
        make_optimizer("adamw8bit", params, TrainArgs())
    assert isinstance(make_optimizer("adamw", params, TrainArgs()), torch.optim.AdamW)


def test_parameter_counts_count_4bit_values_not_storage(tiny_with_weights: Path) -> None:
    from fabric_align.modeling import parameter_counts

    full = load_model(
        ModelArgs(name_or_path=str(tiny_with_weights), lora=LoRAArgs(r=4, alpha=8)), dtype=torch.float32, seed=0
    )
    quantized = load_model(qlora_args(tiny_with_weights), dtype=torch.float32, seed=0)
    assert parameter_counts(quantized) == parameter_counts(full)
    assert parameter_counts(full)[1] < parameter_counts(full)[0]  # only the adapter trains


@pytest.mark.slow
def test_qlora_under_fsdp2_and_bf16_mixed(tiny_with_weights: Path, tmp_path: Path) -> None:
    """FSDP2's bf16 all-gather would cast the floats that store packed 4-bit weights: 4-bit models are sharded
    without it, and QLoRA trains on 2 processes."""
    from conftest import assert_no_unactionable_warnings, fabric_cli, run_script

    out = tmp_path / "out"
    args = [*FAST, *LORA, "--model.quantize=4bit", f"--model.name_or_path={tiny_with_weights}"]
    args += ["--train.global_batch_size=8", "--train.micro_batch_size=2", "--train.max_steps=3"]
    args += ["--precision=bf16-mixed", "--strategy=fsdp", f"--out_dir={out}"]
    result = run_script("kto.py", args, launcher=[*fabric_cli(), "--accelerator=cpu", "--devices=2"])
    assert_no_unactionable_warnings(result.stdout + result.stderr)
    losses = column(read_metrics(out), "train/loss")
    assert len(losses) == 3 and all(0 < x < 1 for x in losses)
    assert (out / "final" / "adapter_model.safetensors").is_file()
