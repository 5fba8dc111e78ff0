"""Sampling from the policy, for SPIN's self-play phase.

- ``opponent_model``: the policy as one whole model per rank (under FSDP2 a copy gathered once per generation
  phase, LoRA merged), so decoding never triggers FSDP all-gathers per step.
- ``generate``: batched decoding with a KV cache, left padding, stop at EOS, temperature and top-p. The random
  draw for prompt ``i`` at position ``t`` is a hash of ``(seed, i, t, token)``, so a prompt's sample does not
  depend on which rank or batch it lands in: 1 and N processes generate the same answers.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from fabric_align.errors import TrainingError
from fabric_align.modeling import hf_model, with_adapters

_MASK32 = 0xFFFFFFFF


@torch.no_grad()
def opponent_model(fabric: Fabric, policy: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A whole Hugging Face model with the policy's current weights, for generation and scoring.

    ``compute_dtype`` is the dtype the training forward computes in (the autocast dtype under mixed precision).
    An FSDP2-sharded policy is gathered once, one parameter at a time, into a plain copy on this rank's device in
    that dtype, so decoding runs without an all-gather per step. (With LoRA the copy is gathered in the master dtype,
    merged, then narrowed: its peak is the whole model in fp32, once per iteration.) A whole full
    model in wider weights (fp32 masters under bf16-mixed) is copied into that dtype too: under autocast, decoding
    with the fp32 weights would re-cast every weight matrix at every token. Otherwise (single device or DDP with
    weights already in that dtype, and whole LoRA/QLoRA models, whose frozen base must never be merged into) the
    policy is used as it is, adapters active, with no extra memory. The caller puts it back in train mode.
    """
    inner = policy.model  # PolicyLogprobs -> the (peft) model
    base = hf_model(inner)
    sharded = any(hasattr(p, "full_tensor") for p in policy.parameters())
    whole_full_model = not hasattr(inner, "peft_config") and not getattr(base, "is_quantized", False)
    narrower = compute_dtype is not None and any(
        p.is_floating_point() and p.dtype != compute_dtype for p in policy.parameters()
    )
    if not sharded and not (whole_full_model and narrower):
        return base.eval()
    clone = _rebuild(inner, _full_state(fabric, inner, None if hasattr(inner, "peft_config") else compute_dtype))
    if compute_dtype is not None:  # LoRA clones are merged in the master dtype, then narrowed
        for parameter in clone.parameters():  # not .to(): rotary frequencies (buffers) stay in fp32
            parameter.data = parameter.data.to(compute_dtype)
    clone.requires_grad_(False)
    return clone.eval().to(fabric.device)


def _full_state(fabric: Fabric, model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict as fresh tensors on this rank's device, cast to ``dtype`` one tensor at a time
    so that the peak is the narrow copy plus one wide tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Storage of the policy's own tensors (a DTensor's local shard too: on a one-rank mesh full_tensor() returns
    # that shard itself), so that every tensor of the copy is fresh.
    live = {(t.to_local() if hasattr(t, "to_local") else t).data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # Sharded DTensors with clean names; every rank gathers every parameter (one all-gather each, once per phase).
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    full = {}
    for name, tensor in state.items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().to(fabric.device)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # Always a fresh tensor: merging LoRA into the copy must not touch the policy's own weights.
        full[name] = tensor.clone() if tensor.data_ptr() in live else tensor
    return full


def _rebuild(inner: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    base = hf_model(inner)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):  # a copy of the config: from_config records the dtype in it
        clone = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), dtype=dtype)
    if hasattr(inner, "peft_config"):
        clone = with_adapters(clone, copy.deepcopy(inner.peft_config["default"]))
        clone.load_state_dict(state, strict=True, assign=True)
        clone = clone.merge_and_unload()
    else:
        clone.load_state_dict(state, strict=True, assign=True)
    # from_config gives a generation config made from config.json alone: keep the model's own (its end tokens).
    clone.generation_config = copy.deepcopy(base.generation_config)
    if getattr(clone.config, "tie_word_embeddings", False):
        clone.tie_weights()  # loading assigned the two names separate tensors: one copy, as in the policy
    # Non-persistent buffers (rotary frequencies) are not in the state dict: take them from the live model.
    live_buffers = dict(base.named_buffers())
    for name, buffer in list(clone.named_buffers()):
        if buffer.is_meta and name in live_buffers:
            module_name, _, buffer_name = name.rpartition(".")
            clone.get_submodule(module_name).register_buffer(
                buffer_name, live_buffers[name].detach().clone(), persistent=False
            )
    return clone


def answer_cache(model: nn.Module, capacity: int) -> Any:
    """A KV cache for one batch's decoding with room for ``capacity`` positions (the padded prompts and the whole
    answer) in every layer, written in place. transformers' ``DynamicCache`` concatenates at every token, copying
    every layer's whole cache each time: about a tenth of a SmolLM2 decode step on CPU, of which attention reading
    the strided buffer gives some back. Models whose cache needs other layers (sliding windows, linear
    attention...) keep transformers' own."""
    dynamic = DynamicCache(config=model.config)
    if not dynamic.layers or any(type(layer) is not DynamicLayer for layer in dynamic.layers):
        return dynamic
    return Cache(layers=[PreallocatedLayer(capacity) for _ in dynamic.layers])


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers of ``capacity`` positions; ``keys``/``values``
    are views of the filled part, so transformers' attention and masks see what a ``DynamicLayer`` shows."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[3])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # the caller sizes it for the prompts and max_new_tokens: a bug if reached
            raise TrainingError(f"generation: the KV cache holds {self.capacity} positions, {end} were written")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for name in ("key_buffer", "value_buffer"):  # copy the filled part only, into a fresh buffer
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            new[:, :, : self.length] = old[indices, :, : self.length]
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors; products stay below 2^63."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(keys: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [B, V]: a pure function of (key_b, position, token)."""
    token = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = _hash32(keys.unsqueeze(1) * 0x9E3779B1 + position)
    h = _hash32(h ^ _hash32(token.unsqueeze(0) + 0x632BE5AB))
    return (h.double() + 0.5) / 2**32


def sample_next(
    logits: torch.Tensor, keys: torch.Tensor, position: int, *, temperature: float, top_p: float
) -> torch.Tensor:
    """Next tokens from [B, V] fp32 logits: greedy at temperature 0, else Gumbel-max over the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(keyed_uniform(keys, position, logits.shape[-1])))
    return (logits.double() + gumbel).argmax(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    keys: list[int],
    *,
    eos_id: int | Collection[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    desc: str = "generate",
    show_progress: bool = True,
) -> list[list[int]]:
    """One completion per prompt (token ids, ending with an end token unless ``max_new_tokens`` cut it). ``eos_id``:
    the end token, or every token that ends a generation (a chat model's turn end and its document end)."""
    device = next(model.parameters()).device
    end_ids = [eos_id] if isinstance(eos_id, int) else sorted(set(eos_id))
    ends = torch.tensor(end_ids, dtype=torch.long, device=device)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[list[int]] = [[] for _ in prompts]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        row_keys = torch.tensor([keys[i] for i in batch], dtype=torch.int64, device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = answer_cache(model, width + max_new_tokens - 1)  # the last token drawn is never fed back
        rows = torch.arange(len(batch), device=device)  # the batch rows still decoding
        finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
        out = torch.full((len(batch), max_new_tokens), pad_id, dtype=torch.long, device=device)
        step_ids, step_positions = input_ids, positions
        for t in range(max_new_tokens):
            hidden = decoder(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                use_cache=True,
                cache=cache,  # transformers' name since 5.x (`past_key_values` warns on every call)
            ).last_hidden_state[:, -1]
            if t == 0 and cache.get_seq_length() != width:
                # A decoder that takes another argument name (remote code) would ignore `cache` and decode every
                # token without its context: refuse rather than sample garbage.
                raise TrainingError(
                    f"generation: {type(decoder).__name__} did not fill the KV cache passed as `cache=` (it holds "
                    f"{cache.get_seq_length()} of {width} prompt positions)"
                )
            logits = (hidden @ head.weight.T).float()  # [rows, V] for the last position only
            if head.bias is not None:
                logits = logits + head.bias.float()
            token = sample_next(logits, row_keys, t, temperature=temperature, top_p=top_p)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            out[rows, t] = token
            finished |= torch.isin(token, ends)
            # One host sync per token for both: how many rows are done, and whether the distribution is one (NaN
            # logits would make every draw token 0, an answer of NUL bytes).
            done, nonfinite = torch.stack([finished.sum(), (~torch.isfinite(logits)).any()]).tolist()
            if nonfinite:
                raise TrainingError(
                    f"generation: the next-token logits are not finite at answer position {t} (the model's weights "
                    "are NaN/inf or it diverged); refusing to sample from them"
                )
            if done == len(rows):
                break
            step_ids = token.unsqueeze(1)
            step_positions = step_positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            if done * 4 >= len(rows):
                # A quarter of the rows have ended: stop decoding them (their draws never mattered). Each row's noise
                # is keyed by its own key and position, so the others sample exactly what they would have.
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, row_keys, finished = rows[keep], row_keys[keep], finished[keep]
                step_ids, step_positions, mask = step_ids[keep], step_positions[keep], mask[keep]
        generated = out.cpu()
        for row, i in enumerate(batch):
            tokens = generated[row].tolist()
            end = next((j for j, token in enumerate(tokens) if token in end_ids), None)
            results[i] = tokens if end is None else tokens[: end + 1]
    return results


def rollout(
    fabric: Fabric, model: nn.Module, prompts: list[list[int]], keys: list[int], **kwargs: Any
) -> list[list[int]]:
    """Each rank generates its share of ``prompts``; every rank gets all completions back, in order."""
    world, rank = fabric.world_size, fabric.global_rank
    per_rank = -(-len(prompts) // world)
    mine = list(range(rank * per_rank, min(len(prompts), (rank + 1) * per_rank)))
    local = generate(
        model, [prompts[i] for i in mine], [keys[i] for i in mine], show_progress=fabric.is_global_zero, **kwargs
    )
    if world == 1:
        return local
    width = max([len(c) for c in local] + [1])
    width = int(fabric.all_reduce(torch.tensor(width, device=fabric.device), reduce_op="max"))
    packed = torch.full((per_rank, width), -1, dtype=torch.long)
    for row, tokens in enumerate(local):
        packed[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    gathered = fabric.all_gather(packed.to(fabric.device)).reshape(world * per_rank, width).cpu()
    return [[t for t in gathered[i].tolist() if t >= 0] for i in range(len(prompts))]
