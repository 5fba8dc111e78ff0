"""Sampling from the policy, for SPIN's self-play phase.

- ``opponent_model``: the policy as one whole model per rank (under FSDP2 a copy gathered once per generation
  phase, LoRA merged), so decoding never triggers FSDP all-gathers per step.
- ``generate``: continuously batched decoding with a KV cache, left padding, stop at EOS, temperature and top-p.
  The random draw for prompt ``i`` at position ``t`` is a hash of ``(seed, i, t, token)``, so a prompt's sample
  does not depend on which rank or batch it lands in, nor on when it joined: 1 and N processes generate the same
  answers.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any, NamedTuple

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
    if not _plain(dynamic):
        return dynamic
    return Cache(layers=[PreallocatedLayer(capacity) for _ in dynamic.layers])


def plain_attention_cache(model: nn.Module) -> bool:
    """Whether transformers' cache for this model is one plain ``DynamicLayer`` per layer (no sliding window, no
    linear attention): the layout ``answer_cache`` preallocates and ``generate`` joins rows into."""
    return _plain(DynamicCache(config=model.config))


def _plain(cache: DynamicCache) -> bool:
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


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
        if end > self.capacity:  # the caller sizes it for the prompts and answers: a bug if reached
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


def keyed_uniform(keys: torch.Tensor, position: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape [B, V]: a pure function of (key_b, position_b, token). ``position``: one answer
    position for every row, or one per row."""
    token = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    position = torch.as_tensor(position, dtype=torch.int64, device=keys.device).reshape(-1, 1)
    h = _hash32(keys.unsqueeze(1) * 0x9E3779B1 + position)
    h = _hash32(h ^ _hash32(token.unsqueeze(0) + 0x632BE5AB))
    return (h.double() + 0.5) / 2**32


def sample_next(
    logits: torch.Tensor, keys: torch.Tensor, position: int | torch.Tensor, *, temperature: float, top_p: float
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
    max_length: int | None = None,
    desc: str = "generate",
    show_progress: bool = True,
) -> list[list[int]]:
    """One completion per prompt (token ids, ending with an end token unless ``max_new_tokens`` cut it). ``eos_id``:
    the end token, or every token that ends a generation (a chat model's turn end and its document end).
    ``max_length``: a prompt and its answer together hold at most this many tokens (each row stops at its own
    ``max_length - len(prompt)``, the answer a trainer would keep of a longer one), so decoding never feeds a
    position past ``max_length - 2`` (rows that have ended and wait to leave stay at their last position).

    Continuous batching: at most ``batch_size`` rows decode together. Once a quarter of the rows have ended, they
    leave the batch and its KV cache, and waiting prompts (shortest first) take their places: prefilled on their
    own, then joined to the batch with every row's cache right-aligned on a common last column (left padding,
    masked). Each row keeps its own answer position, which keys its noise, so a prompt samples what it would alone.
    """
    device = next(model.parameters()).device
    limits = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(p)) for p in prompts]
    if limits and min(limits) < 1:
        i = limits.index(min(limits))
        raise ValueError(f"generate: prompt {i} ({len(prompts[i])} tokens) leaves no room in max_length={max_length}")
    end_ids = [eos_id] if isinstance(eos_id, int) else sorted(set(eos_id))
    ends = torch.tensor(end_ids, dtype=torch.long, device=device)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    waiting = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths join together
    results: list[list[int]] = [[] for _ in prompts]
    batch = _Batch.empty(device, max_new_tokens, pad_id)
    # Rows join a running batch only where the cache is ours (plain attention); other caches (sliding windows...)
    # decode in fixed batches that only shrink.
    joinable = plain_attention_cache(model)
    progress = tqdm(total=len(prompts), desc=desc, disable=not show_progress, leave=False)

    def next_tokens(hidden: torch.Tensor, row_keys: torch.Tensor, position: torch.Tensor) -> _Draw:
        logits = (hidden @ head.weight.T).float()  # [rows, V] for the last position only
        if head.bias is not None:
            logits = logits + head.bias.float()
        token = sample_next(logits, row_keys, position, temperature=temperature, top_p=top_p)
        return _Draw(token, (~torch.isfinite(logits)).any(-1), position)

    def collect(left: list[tuple[int, list[int]]]) -> None:
        for index, tokens in left:
            results[index] = tokens
        progress.update(len(left))

    while waiting or batch.rows:
        free = batch_size - batch.rows + batch.done
        if waiting and (batch.rows == 0 or (joinable and free * 4 >= batch_size)):
            collect(batch.leave(end_ids))
            joining, waiting = waiting[:free], waiting[free:]
            width = max(len(prompts[i]) for i in joining)
            input_ids = torch.full((len(joining), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(joining), width), dtype=torch.long)
            for row, i in enumerate(joining):  # left padding: every prompt ends at the same column
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            limit = torch.tensor([limits[i] for i in joining], device=device)
            cache = answer_cache(model, width + max(limits[i] for i in joining))
            hidden = decoder(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                cache=cache,  # transformers' name since 5.x (`past_key_values` warns on every call)
            ).last_hidden_state[:, -1]
            if cache.get_seq_length() != width:
                # A decoder that takes another argument name (remote code) would ignore `cache` and decode every
                # token without its context: refuse rather than sample garbage.
                raise TrainingError(
                    f"generation: {type(decoder).__name__} did not fill the KV cache passed as `cache=` (it holds "
                    f"{cache.get_seq_length()} of {width} prompt positions)"
                )
            row_keys = torch.tensor([keys[i] for i in joining], dtype=torch.int64, device=device)
            first = next_tokens(hidden, row_keys, torch.zeros_like(row_keys))
            joined = _Batch.start(joining, row_keys, limit, mask, cache, first, ends, max_new_tokens, pad_id)
            batch = batch.join(model, joined)
        else:
            batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)  # the fed token's column
            hidden = decoder(
                input_ids=batch.last.unsqueeze(1),
                attention_mask=batch.mask,
                position_ids=batch.next_position.unsqueeze(1),
                use_cache=True,
                cache=batch.cache,
            ).last_hidden_state[:, -1]
            batch.record(next_tokens(hidden, batch.keys, batch.drawn), ends)
        if batch.done == batch.rows or (batch.done * 4 >= batch.rows and not (waiting and joinable)):
            collect(batch.leave(end_ids))  # rows that ended stop decoding; the others sample exactly as before
    progress.close()
    return results


class _Draw(NamedTuple):
    token: torch.Tensor  # [rows]
    nonfinite: torch.Tensor  # [rows]: a NaN/inf logit makes the draw garbage (every token 0, an answer of NUL bytes)
    position: torch.Tensor  # [rows]: the answer position drawn


def _check_and_count(draw: _Draw, finished: torch.Tensor) -> int:
    """The one host sync per step: how many rows have ended, and whether every row's logits were finite."""
    first_bad = torch.where(draw.nonfinite, draw.position, torch.iinfo(torch.int64).max).min()
    done, nonfinite, position = torch.stack([finished.sum(), draw.nonfinite.any().long(), first_bad]).tolist()
    if nonfinite:
        raise TrainingError(
            f"generation: the next-token logits are not finite at answer position {position} (the model's weights "
            "are NaN/inf or it diverged); refusing to sample from them"
        )
    return done


class _Batch:
    """The rows decoding together: for each, its prompt index, key, answer so far (``out``, ``drawn`` tokens), longest
    answer (``limit``), last token (fed next), next position id and whether it has ended, with the attention mask and
    KV cache of all."""

    def __init__(self, **state: Any) -> None:
        self.__dict__.update(state)

    @classmethod
    def empty(cls, device: torch.device, max_new_tokens: int, pad_id: int) -> _Batch:
        nothing = torch.zeros(0, dtype=torch.long, device=device)
        return cls(
            index=[], keys=nothing, out=nothing.new_full((0, max_new_tokens + 1), pad_id), drawn=nothing, limit=nothing,
            last=nothing, next_position=nothing, finished=nothing.bool(), mask=nothing.reshape(0, 0), cache=None,
            done=0, pad_id=pad_id,
        )  # fmt: skip

    @classmethod
    def start(
        cls, index: list[int], keys: torch.Tensor, limit: torch.Tensor, mask: torch.Tensor, cache: Any, first: _Draw,
        ends: torch.Tensor, max_new_tokens: int, pad_id: int,
    ) -> _Batch:  # fmt: skip
        """Rows that have just been prefilled and drawn their first token."""
        token = first.token
        out = token.new_full((len(index), max_new_tokens + 1), pad_id)  # the last column is spare (see record)
        out[:, 0] = token
        finished = torch.isin(token, ends) | (limit == 1)
        return cls(
            index=index, keys=keys, out=out, drawn=torch.ones_like(token), limit=limit, last=token,
            next_position=mask.sum(-1) - finished.long(), finished=finished, mask=mask, cache=cache,
            done=_check_and_count(first, finished), pad_id=pad_id,
        )  # fmt: skip

    @property
    def rows(self) -> int:
        return len(self.index)

    def record(self, draw: _Draw, ends: torch.Tensor) -> None:
        """One decode step's draws. Rows that had ended keep what they have (their draws never mattered); a row ends
        at an end token or when its answer is ``limit`` long."""
        token = torch.where(self.finished, torch.full_like(draw.token, self.pad_id), draw.token)
        # A row that has ended writes padding just past its answer (a full one, into the spare last column).
        self.out.scatter_(1, self.drawn.unsqueeze(1), token.unsqueeze(1))
        self.drawn = self.drawn + (~self.finished).long()
        self.finished = self.finished | torch.isin(token, ends) | (self.drawn == self.limit)
        # A row that has ended is fed padding until it leaves, at the position it last had: never a position past
        # its answer's end (one past the model's limit, or one that rescales a dynamic rotary embedding for all).
        self.last, self.next_position = token, self.next_position + (~self.finished).long()
        self.done = _check_and_count(draw, self.finished)

    def leave(self, end_ids: list[int]) -> list[tuple[int, list[int]]]:
        """Drop the rows that have ended (from the KV cache too); their answers, cut after the first end token."""
        if not self.done:
            return []
        ended = self.finished.nonzero().squeeze(1).tolist()
        answers, lengths = self.out[self.finished].cpu().tolist(), self.drawn[self.finished].tolist()
        left = []
        for row, tokens, length in zip(ended, answers, lengths, strict=True):
            end = next((j for j, token in enumerate(tokens[:length]) if token in end_ids), None)
            left.append((self.index[row], tokens[:length] if end is None else tokens[: end + 1]))
        keep = (~self.finished).nonzero().squeeze(1)
        self.cache.batch_select_indices(keep)
        self.index = [self.index[row] for row in keep.tolist()]
        for name in ("keys", "out", "drawn", "limit", "last", "next_position", "finished", "mask"):
            setattr(self, name, getattr(self, name)[keep])
        self.done = 0
        return left

    def join(self, model: nn.Module, other: _Batch) -> _Batch:
        """The two batches as one: rows appended, masks and caches right-aligned on the longer of the two. Leading
        columns no row of ``self`` attends to any more (those of rows that left) are dropped."""
        if not self.rows:
            return other
        lead = int(self.mask.any(0).long().argmax())  # the first column some row still attends to
        own_mask = self.mask[:, lead:]
        width = max(own_mask.shape[1], other.mask.shape[1])
        mask = own_mask.new_zeros(self.rows + other.rows, width)
        mask[: self.rows, width - own_mask.shape[1] :] = own_mask
        mask[self.rows :, width - other.mask.shape[1] :] = other.mask
        # Room for the longest answer still to come: every row gets a column per step until the batch ends.
        remaining = torch.cat([self.limit - self.drawn, other.limit - other.drawn]).max()
        cache = answer_cache(model, width + int(remaining) + 1)
        for layer, mine, theirs in zip(cache.layers, self.cache.layers, other.cache.layers, strict=True):
            joined = []
            for a, b in ((mine.keys[:, :, lead:], theirs.keys), (mine.values[:, :, lead:], theirs.values)):
                both = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], width, a.shape[3])  # zeros: masked, finite
                both[: a.shape[0], :, width - a.shape[2] :] = a
                both[a.shape[0] :, :, width - b.shape[2] :] = b
                joined.append(both)
            layer.update(*joined)
        return _Batch(
            index=self.index + other.index,
            keys=torch.cat([self.keys, other.keys]),
            out=torch.cat([self.out, other.out]),
            drawn=torch.cat([self.drawn, other.drawn]),
            limit=torch.cat([self.limit, other.limit]),
            last=torch.cat([self.last, other.last]),
            next_position=torch.cat([self.next_position, other.next_position]),
            finished=torch.cat([self.finished, other.finished]),
            mask=mask,
            cache=cache,
            done=self.done + other.done,
            pad_id=self.pad_id,
        )


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
