"""SPIN's sampler: KV-cached batched decoding with left padding matches Hugging Face's generate, and a prompt's
sample does not depend on its batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fabric_align.args import ModelArgs
from fabric_align.generation import generate, keyed_uniform, sample_next
from fabric_align.modeling import end_token_ids, load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = load_model(ModelArgs(), dtype=torch.float32, seed=7).eval()
    with torch.no_grad():  # a random init is nearly uniform; sharpen it so greedy paths are well separated
        model.get_output_embeddings().weight.mul_(8)
    return model, load_tokenizer(ModelArgs())


PROMPTS = ["Hi", "Tell me a story about a cat.", "2+2=", "A longer prompt, so that left padding matters here."]


def each_alone(model: torch.nn.Module, prompts: list[list[int]], keys: list[int], **kwargs: Any) -> list[list[int]]:
    """Every prompt's answer generated on its own (a batch of one)."""
    return [generate(model, [p], [k], batch_size=1, **kwargs)[0] for p, k in zip(prompts, keys, strict=True)]


@contextlib.contextmanager
def decoder_calls(model: torch.nn.Module) -> Iterator[list[tuple[int, int]]]:
    """The (rows, positions fed) of every decoder call made inside the block."""
    calls: list[tuple[int, int]] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield calls
    finally:
        hook.remove()


def test_greedy_matches_transformers_generate(model_and_tokenizer: tuple) -> None:
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    ours = generate(
        model,
        prompts,
        list(range(4)),
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=12,
        temperature=0.0,
        top_p=1.0,
        batch_size=4,
        show_progress=False,
    )
    for prompt, mine in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        reference = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(prompt) :]
        reference = reference.tolist()
        if tok.eos_token_id in reference:
            reference = reference[: reference.index(tok.eos_token_id) + 1]
        assert mine == reference


def test_sampling_does_not_depend_on_the_batch(model_and_tokenizer: tuple) -> None:
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    kwargs = dict(
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=16,
        temperature=1.0,
        top_p=0.9,
        show_progress=False,
    )
    together = generate(model, prompts, [11, 12, 13, 14], batch_size=4, **kwargs)
    assert together == each_alone(model, prompts, [11, 12, 13, 14], **kwargs)
    other_keys = generate(model, prompts, [21, 22, 23, 24], batch_size=4, **kwargs)
    assert other_keys != together  # the keys do drive the sampling


def test_keyed_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keys = torch.arange(4000)
    draws = torch.stack(
        [sample_next(logits.expand(4000, 4), keys, t, temperature=1.0, top_p=1.0) for t in range(3)]
    ).flatten()
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.double), atol=0.02, rtol=0)
    # top_p=0.6 keeps the smallest prefix reaching 0.6: the two most likely tokens, renormalized 5:3.
    nucleus = sample_next(logits.expand(4000, 4), keys, 0, temperature=1.0, top_p=0.6)
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).double().mean().item() - 0.625) < 0.03
    u = keyed_uniform(keys[:3], 5, 7)
    assert torch.equal(u, keyed_uniform(keys[:3], 5, 7)) and bool(((u > 0) & (u < 1)).all())
    per_row = keyed_uniform(keys[:3], torch.tensor([5, 9, 5]), 7)  # rows at their own positions
    assert torch.equal(per_row[[0, 2]], u[[0, 2]]) and torch.equal(per_row[1], keyed_uniform(keys[1:2], 9, 7)[0])


def test_opponent_decodes_in_the_compute_dtype_without_touching_the_policy() -> None:
    from lightning.fabric import Fabric

    from fabric_align.args import LoRAArgs
    from fabric_align.generation import opponent_model
    from fabric_align.modeling import PolicyLogprobs

    fabric = Fabric(accelerator="cpu", devices=1)
    model = load_model(ModelArgs(), dtype=torch.float32, seed=7)
    policy = PolicyLogprobs(model)
    # Weights already in the compute dtype (32-true): the policy itself, no copy.
    assert opponent_model(fabric, policy, None) is model
    assert opponent_model(fabric, policy, torch.float32) is model

    # fp32 masters under bf16 autocast: a bf16 copy, rounded from the masters; rotary frequencies stay fp32.
    opponent = opponent_model(fabric, policy, torch.bfloat16)
    assert opponent is not model and not opponent.training
    clone, live = dict(opponent.named_parameters()), dict(model.named_parameters())
    assert clone.keys() == live.keys()
    for name, parameter in clone.items():
        assert parameter.dtype == torch.bfloat16 and not parameter.requires_grad
        assert torch.equal(parameter, live[name].detach().to(torch.bfloat16)), name
        assert parameter.data_ptr() != live[name].data_ptr()
    buffers = dict(opponent.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for n, b in buffers.items() if "inv_freq" in n)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())

    # A whole LoRA model is never copied nor merged: its adapters run live, in place.
    lora_model = load_model(ModelArgs(lora=LoRAArgs(r=2)), dtype=torch.float32, seed=7)
    lora_policy = PolicyLogprobs(lora_model)
    assert opponent_model(fabric, lora_policy, torch.bfloat16) is lora_model.get_base_model()


def test_decoding_stops_at_every_end_token(model_and_tokenizer: tuple) -> None:
    """With several end tokens (a chat model's turn end and document end), each row stops at the first it draws, and
    the model's generation config supplies them (end_token_ids)."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    kwargs = dict(pad_id=tok.pad_token_id, max_new_tokens=12, temperature=0.0, top_p=1.0, batch_size=4)
    free = generate(model, prompts, list(range(4)), eos_id=tok.eos_token_id, show_progress=False, **kwargs)
    # Make the token each row greedily emits third an end token too: decoding must stop right after it.
    extra = {row[2] for row in free if len(row) > 3 and tok.eos_token_id not in row[:3]}
    assert extra
    stopped = generate(model, prompts, list(range(4)), eos_id=[tok.eos_token_id, *extra], show_progress=False, **kwargs)
    for full, cut in zip(free, stopped, strict=True):
        end = next((j for j, t in enumerate(full) if t in extra or t == tok.eos_token_id), len(full) - 1)
        assert cut == full[: end + 1]

    config = model.generation_config
    before = config.eos_token_id
    try:
        config.eos_token_id = [tok.eos_token_id, 5]
        assert end_token_ids(model, tok) == sorted({tok.eos_token_id, 5})
    finally:
        config.eos_token_id = before


def test_rows_that_ended_stop_decoding_and_the_others_sample_as_alone(model_and_tokenizer: tuple) -> None:
    """Once a quarter of a batch has drawn an end token, those rows leave the batch (its KV cache too); every other
    row samples exactly what it samples alone, since its noise is keyed by its own key and position."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS * 2]
    keys = list(range(20, 28))
    probe = dict(pad_id=tok.pad_token_id, max_new_tokens=10, temperature=1.0, top_p=1.0, show_progress=False)
    free = generate(model, prompts, keys, eos_id=tok.eos_token_id, batch_size=8, **probe)
    # End tokens that half of the rows draw early: the tokens they sample at position 1.
    extra = {row[1] for row in free[:4]}
    ends = [tok.eos_token_id, *extra]
    with decoder_calls(model) as calls:
        together = generate(model, prompts, keys, eos_id=ends, batch_size=8, **probe)
    assert together == each_alone(model, prompts, keys, eos_id=ends, **probe)
    rows_seen = [rows for rows, _ in calls]
    assert rows_seen[0] == 8 and min(rows_seen) < 8  # the batch shrank as rows ended
    assert any(len(row) < 10 for row in together) and any(len(row) > 3 for row in together)


def test_the_preallocated_cache_decodes_what_transformers_cache_does(
    model_and_tokenizer: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys and values written in place into buffers sized for the answer give the same samples as transformers'
    concatenating ``DynamicCache``, through rows leaving the batch too; a model whose cache needs other layers (a
    sliding window) keeps transformers' own."""
    from transformers import DynamicCache, MistralConfig

    from fabric_align import generation

    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS * 2]
    keys = list(range(40, 48))
    probe = dict(pad_id=tok.pad_token_id, max_new_tokens=12, temperature=1.0, top_p=1.0, show_progress=False)
    free = generate(model, prompts, keys, eos_id=tok.eos_token_id, batch_size=8, **probe)
    ends = [tok.eos_token_id, *{row[2] for row in free[:3]}]  # some rows end early, the batch shrinks
    caches: list[object] = []
    real_cache = generation.answer_cache
    monkeypatch.setattr(generation, "answer_cache", lambda *a: caches.append(real_cache(*a)) or caches[-1])
    preallocated = generate(model, prompts, keys, eos_id=ends, batch_size=8, **probe)
    monkeypatch.setattr(generation, "answer_cache", lambda *a: DynamicCache())
    concatenated = generate(model, prompts, keys, eos_id=ends, batch_size=8, **probe)
    assert preallocated == concatenated and any(len(row) < 12 for row in preallocated)
    layers = caches[0].layers
    assert all(isinstance(layer, generation.PreallocatedLayer) for layer in layers) and layers
    assert layers[0].key_buffer.shape[0] < 8  # rows left: the buffers were narrowed to the rows still decoding
    windowed = MistralConfig(num_hidden_layers=2, sliding_window=4, hidden_size=16, num_attention_heads=2)
    assert type(real_cache(type("M", (), {"config": windowed})(), 32)) is DynamicCache


def test_waiting_prompts_take_the_places_of_rows_that_ended(model_and_tokenizer: tuple) -> None:
    """Continuous batching: with more prompts than rows, rows that end make room for waiting prompts, which join the
    running batch; every prompt still samples what it samples alone, in fewer decode steps than fixed batches."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS * 3]
    keys = list(range(60, 72))
    probe = dict(pad_id=tok.pad_token_id, max_new_tokens=10, temperature=1.0, top_p=1.0, show_progress=False)
    free = generate(model, prompts, keys, eos_id=tok.eos_token_id, batch_size=12, **probe)
    ends = [tok.eos_token_id, *{row[1] for row in free[:3]}]  # a few rows end at their second token
    with decoder_calls(model) as calls:
        together = generate(model, prompts, keys, eos_id=ends, batch_size=4, **probe)
    alone = each_alone(model, prompts, keys, eos_id=ends, **probe)
    assert together == alone
    lengths = sorted(range(12), key=lambda i: len(prompts[i]))
    fixed_steps = sum(max(len(alone[i]) for i in lengths[b : b + 4]) - 1 for b in range(0, 12, 4))
    decode_steps = sum(1 for rows, fed in calls if fed == 1)
    prefills = [rows for rows, fed in calls if fed > 1]
    assert max(rows for rows, _ in calls) <= 4 and len(prefills) > 3  # prompts joined in smaller groups
    assert decode_steps < fixed_steps, (decode_steps, fixed_steps)


def test_each_answer_stops_where_prompt_and_answer_fill_max_length(model_and_tokenizer: tuple) -> None:
    """With ``max_length``, a row stops decoding once its prompt and answer hold that many tokens: the answer is the
    uncapped one cut there (what a trainer keeps of it), no position past ``max_length - 2`` is fed, and rows that
    reach their limit leave early, so fewer rows are decoded."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS * 2]
    keys = list(range(80, 88))
    probe = dict(pad_id=tok.pad_token_id, max_new_tokens=12, temperature=1.0, top_p=1.0, show_progress=False)
    longest = max(map(len, prompts))
    max_length = longest + 3  # the longest prompts get 3 tokens, the shortest the whole 12
    positions: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(int(kwargs["position_ids"].max())), with_kwargs=True
    )
    try:
        with decoder_calls(model) as free_calls:
            free = generate(model, prompts, keys, eos_id=[], batch_size=4, **probe)
        free_positions, positions[:] = max(positions), []
        with decoder_calls(model) as capped_calls:
            capped = generate(model, prompts, keys, eos_id=[], batch_size=4, max_length=max_length, **probe)
    finally:
        hook.remove()
    assert all(len(row) == 12 for row in free)  # no end token: every row runs to max_new_tokens
    assert capped == [row[: max_length - len(p)] for p, row in zip(prompts, free, strict=True)]
    assert min(map(len, capped)) == 3 and max(map(len, capped)) == 12
    assert max(positions) <= max_length - 2 < free_positions
    assert sum(rows for rows, _ in capped_calls) < sum(rows for rows, _ in free_calls)
    # A row that ends early waits in the batch until a quarter of it has ended: fed padding, it must not move on to
    # positions past max_length - 2 (past the model's limit, they would index out of GPT-2's position table).
    waiting = [prompts[3]] + [prompts[0]] * 6  # the long prompt's row ends after 3 tokens, the others run 12
    positions[:] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(int(kwargs["position_ids"].max())), with_kwargs=True
    )
    try:
        with decoder_calls(model) as calls:
            answers = generate(model, waiting, keys[:7], eos_id=[], batch_size=7, max_length=max_length, **probe)
    finally:
        hook.remove()
    assert [len(a) for a in answers] == [3] + [12] * 6 and max(rows for rows, _ in calls) == 7
    assert max(positions) <= max_length - 2
    alone = each_alone(model, waiting, keys[:7], eos_id=[], **probe)
    assert answers == [row[: max_length - len(p)] for p, row in zip(waiting, alone, strict=True)]
    with pytest.raises(ValueError, match=f"prompt 3 \\({longest} tokens\\) leaves no room in max_length={longest}"):
        generate(model, prompts[:4], keys[:4], eos_id=[], batch_size=4, max_length=longest, **probe)


def test_learned_positions_up_to_max_length_are_enough() -> None:
    """GPT-2's position table of exactly ``max_length`` entries (what the trainers' check asks for) suffices, however
    long the answers still decoding beside a row that has ended: decoding feeds no position past ``max_length - 2``."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=20)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [list(range(3, 21))] + [[5, 6, 7]] * 6  # the first row's answer ends after 2 tokens, the others run 12
    probe = dict(eos_id=[], pad_id=0, max_new_tokens=12, temperature=1.0, top_p=1.0, show_progress=False)
    answers = generate(model, prompts, list(range(7)), batch_size=7, max_length=20, **probe)
    assert [len(a) for a in answers] == [2] + [12] * 6
    assert answers == each_alone(model, prompts, list(range(7)), max_length=20, **probe)


def test_the_opponent_copy_keeps_the_models_end_tokens(model_and_tokenizer: tuple) -> None:
    """The copy decoded under mixed precision is rebuilt from the config: it must keep the generation config's end
    tokens, or an FSDP2 / bf16 run would stop at other tokens than a plain one."""
    from fabric_align.generation import opponent_model
    from fabric_align.modeling import PolicyLogprobs

    model, tok = model_and_tokenizer
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, 5]
    try:

        class OneDevice:
            device = torch.device("cpu")

        clone = opponent_model(OneDevice(), PolicyLogprobs(model), torch.bfloat16)
        assert clone is not model and next(clone.parameters()).dtype == torch.bfloat16
        assert end_token_ids(clone, tok) == end_token_ids(model, tok) == sorted({tok.eos_token_id, 5})
    finally:
        model.generation_config.eos_token_id = before


def test_a_decoder_that_ignores_the_cache_is_refused(
    model_and_tokenizer: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.cache_utils import Cache

    from fabric_align.errors import TrainingError

    model, tok = model_and_tokenizer
    # As if the decoder did not take `cache=`: our check (no argument) finds it empty; transformers' own calls, per
    # layer, still see the real cache.
    real_length = Cache.get_seq_length

    def empty_for_the_check(self: Cache, *args: object, **kwargs: object) -> int:
        return 0 if not args and not kwargs else real_length(self, *args, **kwargs)

    monkeypatch.setattr(Cache, "get_seq_length", empty_for_the_check)
    with pytest.raises(TrainingError, match="did not fill the KV cache"):
        generate(
            model,
            [tok("Hi")["input_ids"]],
            [1],
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            max_new_tokens=4,
            temperature=1.0,
            top_p=1.0,
            batch_size=1,
            show_progress=False,
        )
