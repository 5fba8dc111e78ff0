"""Selective activation checkpointing (the default): matmul and attention outputs kept, the elementwise rest
recomputed in the backward, with gradients equal bit for bit to keeping everything."""

from __future__ import annotations

import pytest
import torch

from fabric_align import kto
from fabric_align.args import LoRAArgs, ModelArgs
from fabric_align.data import pad_sequences
from fabric_align.modeling import PolicyLogprobs, enable_activation_checkpointing, load_model, load_tokenizer


@pytest.mark.parametrize("lora", [None, LoRAArgs(r=4, dropout=0.2)], ids=["full", "lora-dropout"])
def test_selective_checkpointing_recomputes_elementwise_ops_to_the_same_gradients(
    lora: LoRAArgs | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default keeps matmul and attention outputs and recomputes the rest; gradients match keeping everything
    bit for bit (LoRA's dropout too: the recompute replays the same random mask)."""
    from fabric_align import modeling

    asked: dict[str, bool] = {}
    decide = modeling.kept_by_selective
    monkeypatch.setattr(modeling, "kept_by_selective", lambda op: asked.setdefault(op.name(), decide(op)))
    tokenizer = load_tokenizer(ModelArgs())
    data = kto.load_split("fabric-align/kto-demo-val", "test", kto.ChatRenderer(tokenizer), 128, 0, train=False)
    batch = pad_sequences(data.sequences[:6], tokenizer.pad_token_id)
    grads = {}
    for mode in (False, "selective"):
        torch.manual_seed(0)  # the same LoRA initialization, and later the same dropout masks, for both
        model = PolicyLogprobs(
            load_model(ModelArgs(lora=lora, activation_checkpointing=mode), dtype=torch.float32, seed=42)
        )
        if lora is not None:
            with torch.no_grad():  # LoRA's B starts at zero, which would hide the adapter's gradients
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.5)
        model.train()(batch["input_ids"], batch["attention_mask"], batch["targets"]).sum().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads["selective"].keys() and grads[False]
    for name, grad in grads[False].items():
        assert torch.equal(grad, grads["selective"][name]), name
    assert asked["aten::mm"] and any("attention" in op and kept for op, kept in asked.items())
    assert not asked["aten::silu"] and not asked["aten::mul.Tensor"] and not asked["aten::rsqrt"]


ARCHITECTURES = {
    "qwen2": {},  # biased q/k/v projections (addmm)
    "mistral": {"sliding_window": 16},
    "phi3": {},  # fused qkv and gate_up projections
    "gemma2": {"head_dim": 16, "attn_implementation": "eager"},  # eager attention (bmm, softmax), soft-capping
    "qwen3": {"head_dim": 16},  # q/k norms
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_selective_checkpointing_is_exact_on_other_architectures(model_type: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(ARCHITECTURES[model_type])
    attention = extra.pop("attn_implementation", "sdpa")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=300,
        pad_token_id=0,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding in one row
    grads = {}
    for mode in (False, "selective"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).train()
        enable_activation_checkpointing(model, mode)
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits.pow(2).mean().backward()
        grads[mode] = [p.grad for p in model.parameters() if p.grad is not None]
    assert model.model.layers[0].gradient_checkpointing  # the selective run did checkpoint its layers
    assert len(grads[False]) == len(grads["selective"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads["selective"], strict=True))
