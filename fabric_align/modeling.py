"""Model setup shared by the trainers: loading, LoRA/QLoRA, FSDP2 sharding, and per-token log-probs.

Log-probs never go through the model's ``logits``: ``PolicyLogprobs`` runs the decoder to its final hidden
states and hands them with the lm_head weight to ``fused_linear_logprob``, which never builds N x V logits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fabric_align.args import EMBEDDED_MODEL, ConfigError, LoRAArgs, ModelArgs
from fabric_align.kernels import fused_linear_logprob

log = logging.getLogger(__name__)

EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-llama"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_model_path(name_or_path: str) -> str:
    """The embedded model's directory, a packaged model's cache directory (``python -m fabric_align.models list``;
    the trainers fetch it first), a local path with ``~`` expanded (transformers does not), or a hub id."""
    from fabric_align.models import REGISTRY, models_cache

    if name_or_path == EMBEDDED_MODEL:
        return str(EMBEDDED_MODEL_DIR)
    if name_or_path in REGISTRY:
        return str(models_cache() / name_or_path)
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def has_weights(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def is_random_init(args: ModelArgs) -> bool:
    """A local directory with a config and no weights (the embedded tiny model, benchmark configs)."""
    path = Path(resolve_model_path(args.name_or_path))
    return path.is_dir() and (path / "config.json").is_file() and not has_weights(str(path))


def load_tokenizer(args: ModelArgs) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(args.name_or_path), revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked everywhere, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(args: ModelArgs) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        resolve_model_path(args.name_or_path), revision=args.revision, trust_remote_code=args.trust_remote_code
    )


def check_model_config(args: ModelArgs, config: Any) -> None:
    """What the trainers cannot train, known from the config alone (before any weight is read)."""
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            # The fused log-prob computes log_softmax(h @ W.T / temperature) only.
            raise ConfigError(
                f"model.name_or_path={args.name_or_path}: the model post-processes its logits ({name}="
                f"{getattr(config, name)}), which the fused log-prob kernel does not support"
            )
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"model.name_or_path={args.name_or_path}: an encoder-decoder model, not a causal LM")


def check_model_structure(args: ModelArgs, config: Any) -> None:
    """What only the module tree tells, found by building it on the meta device (no memory, no weights read): that
    the attention implementation exists for this model, and that every LoRA target module names a module in it."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs)
    except (ValueError, ImportError) as err:  # an unknown or unavailable attn_implementation, an unknown model type
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"model.name_or_path={args.name_or_path}: cannot build the model ({reason})") from None
    targets = args.lora.target_modules if args.lora is not None else None
    names = [name for name, _ in model.named_modules()]
    missing = []
    if isinstance(targets, list):
        # peft's rule for a list: a module matches when its name is the entry or ends with "." + the entry.
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    elif targets is not None and targets != "all-linear":
        try:  # peft's rule for a string: a regular expression that a whole module path must match
            pattern = re.compile(targets)
        except re.error as err:
            raise ConfigError(f"model.lora.target_modules={targets!r}: not a regular expression ({err})") from None
        missing = [targets] if not any(pattern.fullmatch(n) for n in names) else []
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules: {missing} name no module of {args.name_or_path} (its linear layers: "
            f"{', '.join(leaves)})"
        )


def model_fingerprint(args: ModelArgs, seed: int, *, exact: bool = False) -> dict[str, Any]:
    """What identifies the reference weights: the path and its weight files' sizes and modification times, the
    revision, the quantization, and the seed when the weights are a random init (no file is read: models are large).

    ``exact`` (cache keys): also each file's inode and status-change time, which no copy tool sets back. Weights
    replaced by others of the same size and with the old modification time (``cp -p``, ``touch -r``, a tar
    extraction) then get a new key; a copied or re-permissioned model only costs a recomputation."""
    path = Path(resolve_model_path(args.name_or_path))
    files = {}
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in (".safetensors", ".bin", ".json") and file.is_file():
                stat = file.stat()
                files[file.name] = [stat.st_size, int(stat.st_mtime)]
                if exact:
                    files[file.name] += [stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    return {
        "model": str(path),
        "revision": args.revision,
        "quantize": args.quantize,
        "files": files,
        "seed": seed if is_random_init(args) else None,
    }


def load_model(args: ModelArgs, *, dtype: torch.dtype, seed: int, on_meta: bool = False) -> nn.Module:
    """The Hugging Face causal LM, with LoRA adapters when ``args.lora`` is set (base frozen).

    ``on_meta``: build the same modules on the meta device without reading any weights (the FSDP2 ranks other
    than 0, which get their shards from rank 0 after sharding: see ``broadcast_from_rank0``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(args.name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if on_meta:
        config = AutoConfig.from_pretrained(path, revision=args.revision, trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    elif is_random_init(args):
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        log.info("no weights in %s: initializing randomly with seed %d", path, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    else:
        if args.quantize == "4bit":
            from transformers import BitsAndBytesConfig

            # NF4 with double quantization (QLoRA). The matmuls run in the parameter dtype (bf16 with bf16-true; fp32
            # with 32-true and the mixed precisions, whose autocast then lowers them to bf16/fp16), and the packed
            # 4-bit bytes are stored in that same dtype: a uniform parameter dtype is what FSDP needs, and Fabric's
            # bf16-true plugin casts the whole module with `module.to(dtype)`, which would turn uint8 storage into
            # numbers.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=dtype,
            )
        model = AutoModelForCausalLM.from_pretrained(path, revision=args.revision, dtype=dtype, **kwargs)
        if args.quantize == "4bit":
            import re

            import bitsandbytes as bnb

            # On CPUs with AVX512-BF16, a Linear4bit called in eval mode without grad (our reference and scoring
            # passes) rewrites its own weight in place into a CPU-only tiled layout with bf16 block scales: the
            # reference log-probs would then come from rounded weights, and layers whose output size is not a
            # multiple of 32 fail an assertion. Training never needs that layout (GPUs never take it): keep the
            # NF4 layout the training forward uses.
            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.support_avx512bf16_for_cpu = False
            # A Linear4bit's state dict also holds its quantization statistics (``weight.absmax``,
            # ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``...), which load_state_dict does not
            # take back and strict loading (resume) reports as unexpected. The base is frozen and re-quantized
            # from the same weights at load, so those entries are equal to the loaded ones: let them pass.
            quant_state_key = re.compile(
                r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)$"
            )

            def ignore_quant_state_keys(module: nn.Module, incompatible_keys: Any) -> None:
                unexpected = incompatible_keys.unexpected_keys
                unexpected[:] = [k for k in unexpected if not quant_state_key.search(k)]

            model.register_load_state_dict_post_hook(ignore_quant_state_keys)
    check_model_config(args, model.config)
    model.config.use_cache = False
    if args.disable_dropout:
        disable_dropout(model)
    enable_activation_checkpointing(model, args.activation_checkpointing)
    if args.lora is not None:
        model = add_lora(model, args.lora, quantized=args.quantize is not None)
    return model


def enable_activation_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """Checkpoint every decoder layer: whole (``True``) or selectively (``"selective"``, see ``kept_by_selective``).

    A model without activation checkpointing (some remote code) keeps everything under the ``selective`` default
    and refuses an explicit ``true``."""
    if mode is False:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        if mode == "selective":
            log.info("%s has no activation checkpointing: keeping every activation", type(model).__name__)
            return
        raise ConfigError(f"model.activation_checkpointing=true: {type(model).__name__} does not support it")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


@functools.cache  # asked for every op of every checkpointed forward: decide each op once
def kept_by_selective(op: Any) -> bool:
    """Whether selective checkpointing keeps an op's output: the matmuls and every attention kernel, whose
    recomputation would cost as much as their forward. The rest of a decoder layer (norms, rotary embedding,
    activation function, products, residual adds, casts) is elementwise: recomputed in the backward from the
    kept outputs, it gives the same values bit for bit at a small fraction of the layer's time. A Llama layer
    then keeps, per token, the q, k, v, attention, output, gate, up and down products (7 x hidden + 2 x
    intermediate numbers, plus the attention's log-sum-exp): 5,896 numbers at hidden 512 and intermediate 1408,
    where keeping everything holds 10,378."""
    name = op.name()
    return op in _MATMULS or "attention" in name or "flash_attn" in name


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if kept_by_selective(op) else CheckpointPolicy.PREFER_RECOMPUTE


_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._int_mm.default,
    torch.ops.aten._scaled_mm.default,
}


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout of the model: ``nn.Dropout`` modules and the attention dropout that transformers' attention
    layers read from a float attribute. The config is left as it is, so the export describes the model as given."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def add_lora(model: nn.Module, args: LoRAArgs, *, quantized: bool) -> nn.Module:
    from peft import LoraConfig, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
        task_type="CAUSAL_LM",
    )
    return with_adapters(model, config)


def with_adapters(model: nn.Module, config: Any) -> nn.Module:
    """``peft.get_peft_model``, without the FutureWarning it triggers by reading transformers' deprecated
    ``is_gradient_checkpointing`` alias (a warning no user can act on)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers already injected into it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def end_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a generation: the tokenizer's EOS and each ``eos_token_id`` the model's generation
    config lists (a chat model's turn end and its document end, e.g. SmolLM2's ``<|im_end|>`` and
    ``<|endoftext|>``; Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``)."""
    listed = getattr(getattr(hf_model(model), "generation_config", None), "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return sorted({tokenizer.eos_token_id, *(i for i in listed if isinstance(i, int))})


class PolicyLogprobs(nn.Module):
    """Wraps a causal LM so that its forward returns per-token log-probs of given targets.

    This module is the FSDP root: its forward runs inside the root's all-gather of the embedding, final norm and
    lm_head, so ``lm_head.weight`` is the unsharded tensor when the kernel reads it.

    ``keep_softmax_mib``: ``ModelArgs.keep_softmax_mib``, the torch path's budget for keeping the softmax from the
    forward for the backward.
    """

    def __init__(self, model: nn.Module, keep_softmax_mib: int = 0) -> None:
        super().__init__()
        self.model = model
        self.keep_softmax_bytes = keep_softmax_mib << 20

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        lm = hf_model(self.model)
        decoder = lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        logps = fused_linear_logprob(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            targets.reshape(-1),
            bias=head.bias,
            temperature=temperature,
            keep_softmax_bytes=self.keep_softmax_bytes,
        )
        # A fresh tensor, not a view: FSDP2 registers its pre-backward hook on the root's output, and warns on every
        # step that an in-place op on a view would drop that hook.
        return logps.reshape(targets.shape).clone()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy: with LoRA, the base model with adapters disabled; else the weights as they are
        (the trainers only ask for reference log-probs before the first update)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The decoder layer classes named by the transformers model's ``_no_split_modules`` (found at any depth, so
    wrappers like peft and PolicyLogprobs do not hide it)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"{type(model).__name__}: no decoder layer class found (_no_split_modules={sorted(names)}); "
            "cannot shard per layer"
        )
    return tuple(classes)


def fsdp2_parallelize(module: nn.Module, device_mesh: Any, *, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: one ``fully_shard`` unit per decoder layer, then the root (embeddings, final norm, lm_head).

    ``compute_dtype`` (bf16 under bf16-mixed): the decoder layers' shards stay in the fp32 master dtype, but each
    layer is all-gathered in bf16 and its gradients are reduced in fp32. That halves the all-gather traffic and the
    unsharded weights' memory, and autocast finds bf16 weights instead of casting fp32 ones at every op. The root
    stays fp32, so the embeddings start an fp32 residual stream as under plain autocast. Not for 4-bit models,
    whose packed weights are stored as floats that a cast would destroy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    layer_kwargs: dict[str, Any] = {"mesh": mesh}
    quantized = any(hasattr(p, "quant_state") for p in module.parameters())
    if compute_dtype is not None and not quantized:
        # The layers take the fp32 residual stream as it is (autocast lowers each matmul), so it stays fp32.
        layer_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    layer_classes = decoder_layer_classes(module)
    for submodule in list(module.modules()):
        if isinstance(submodule, layer_classes):
            fully_shard(submodule, **layer_kwargs)
    fully_shard(module, mesh=mesh)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        # Built on the meta device (ranks other than 0): allocate the shards without initializing them, since the
        # values come from rank 0 (``broadcast_from_rank0``). Fabric would run each module's reset_parameters,
        # whose DTensor random ops synchronize with rank 0, which has nothing to initialize: a deadlock.
        device_type = mesh.device_type
        index = torch.cuda.current_device() if device_type == "cuda" else None
        module.to_empty(device=torch.device(device_type, index))
    return module


def parameter_signature(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """Name, dtype and shape of every parameter and buffer: what must agree between a loaded and a meta-built
    model before rank 0's tensors are broadcast into the latter."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors]


def adopt_dtypes(model: nn.Module, signature: list[tuple[str, str, tuple[int, ...]]]) -> None:
    """Give a meta-built model the dtypes of the loaded one: ``from_pretrained`` keeps some modules in fp32
    (``_keep_in_fp32_modules``) where ``from_config`` does not. Free on the meta device; ties are kept."""
    dtypes = {name: getattr(torch, dtype) for name, dtype, _ in signature}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta and name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = torch.empty_like(tensor, dtype=dtypes[name])


def broadcast_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
    """Fill an FSDP2-sharded module whose ranks other than 0 were built on the meta device: every rank takes its
    shard of rank 0's full state dict (``full_state``, None elsewhere), and the buffers (rotary frequencies, which
    state dicts leave out) are copied from rank 0. One tensor at a time, so no rank holds more than its shards
    plus one full tensor."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(module, full_state if dist.get_rank() == 0 else {}, options=options)
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts; a 4-bit weight counts the values it packs, not its storage elements."""

    def count(p: torch.Tensor) -> int:
        quant_state = getattr(p, "quant_state", None)
        return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else p.numel()

    total = sum(count(p) for p in model.parameters())
    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    return total, trainable
