"""LoRA: only adapter weights train, the reference is the base model with adapters disabled, and the export holds
the adapter (plus, on request, the merged model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fabric_align import kto
from fabric_align.args import LoRAArgs, ModelArgs
from fabric_align.data import pad_sequences
from fabric_align.modeling import PolicyLogprobs, load_model, load_tokenizer

from conftest import FAST, column, load_safetensors, read_metrics, run_cli

LORA = ["--model.lora.r=4", "--model.lora.alpha=8", "--model.lora.merge_on_export=true"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "out"
    run_cli(
        kto.setup,
        [
            *FAST,
            *LORA,
            f"--out_dir={out}",
            "--train.max_steps=8",
            "--train.lr=1e-2",
            "--train.eval_interval=4",
            "--train.save_interval=8",
        ],
    )
    return out


def test_lora_trains_only_the_adapter(lora_run: Path) -> None:
    state = torch.load(lora_run / "step-000008" / "state", weights_only=True)["model"]
    base = load_model(ModelArgs(), dtype=torch.float32, seed=42).state_dict()  # the same seeded init
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys
    for key, value in state.items():
        if "lora_" in key:
            continue
        plain = key.removeprefix("model.base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, base[plain]), key
    lora_b = [state[k] for k in lora_keys if "lora_B" in k]
    assert all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means the adapter trained
    margins = column(read_metrics(lora_run), "val/rewards/margins")
    assert margins[-1] > margins[0]


def test_lora_reference_is_the_base_model() -> None:
    tokenizer = load_tokenizer(ModelArgs())
    data = kto.load_split("fabric-align/kto-demo-val", "test", kto.ChatRenderer(tokenizer), 128, 0, train=False)
    batch = pad_sequences(data.sequences[:5], tokenizer.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["targets"])
    base = PolicyLogprobs(load_model(ModelArgs(), dtype=torch.float32, seed=42)).eval()
    adapted = PolicyLogprobs(load_model(ModelArgs(lora=LoRAArgs(r=4)), dtype=torch.float32, seed=42)).eval()
    with torch.no_grad():  # make the adapter matter: LoRA's B starts at zero
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        plain = base(*args).sum(-1)
        with adapted.reference():
            reference = adapted(*args).sum(-1)
        policy = adapted(*args).sum(-1)
    torch.testing.assert_close(reference, plain)
    assert (policy - plain).abs().max() > 1e-2


def test_lora_export_adapter_and_merged(lora_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = lora_run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    modes = {f.stat().st_mode & 0o777 for f in final.rglob("*") if f.is_file()}
    assert modes == {(final / "adapter_config.json").stat().st_mode & 0o777}
    adapter = load_safetensors(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)

    tokenizer = load_tokenizer(ModelArgs())
    ids = torch.tensor([tokenizer("Tell me about growing herbs.")["input_ids"]])
    base = load_model(ModelArgs(), dtype=torch.float32, seed=42)
    with_adapter = PeftModel.from_pretrained(base, final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        plain = load_model(ModelArgs(), dtype=torch.float32, seed=42)(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3
    # The base is a seeded init that exists on no disk: final/base/ holds it and the adapter names it, so the export
    # loads as users load adapters, through transformers' peft integration or peft's AutoPeftModel.
    from peft import AutoPeftModelForCausalLM

    assert load_safetensors(final / "base" / "model.safetensors")
    with torch.no_grad():
        for loaded in (AutoModelForCausalLM.from_pretrained(final), AutoPeftModelForCausalLM.from_pretrained(final)):
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
