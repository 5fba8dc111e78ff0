"""Convert a GGUF file (llama.cpp's format) into a Hugging Face model directory that trains like any other.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")      # -> Path("models/smollm2")
    python -m fabric_align.models convert FILE.gguf OUT_DIR [--dtype bfloat16]

transformers' GGUF loader does the architecture-specific work (metadata to config, tensor names, llama.cpp's Q/K
row permutation, dequantization) for every architecture it supports; this module turns what it loads into a plain
directory: ``model.safetensors`` (the dequantized weights in ``dtype``, tied embeddings saved once), ``config.json``,
``generation_config.json`` (``eos_token_id`` lists every token that ends a generation), the tokenizer with its chat
template, and ``gguf_source.json`` (which file it came from, its SHA-256, what was changed). The result loads with
``AutoModelForCausalLM.from_pretrained`` and trains with ``--model.name_or_path DIR``, with no ``gguf`` package.

Quantized weights stay what the file holds: a Q4 weight dequantizes to 16 levels per block, exactly, and fine-tuning
starts from those values (converting to fp32 loses nothing further; bf16 rounds them).

The special tokens come from the GGUF's metadata, which converters sometimes get wrong (an EOS that is the
pretraining document end while the chat template ends each turn with another token, no PAD, a BOS added against the
file's own flag). ``check_special_tokens`` compares them with the chat template and the flags, fixes what disagrees,
and the fixes are logged and recorded. The conversion is written to a temporary directory beside ``out_dir``, read
back and compared with what was loaded, and renamed into place only then, so ``out_dir`` is either absent or
complete.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fabric_align.checkpoints import file_sha256
from fabric_align.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PROVENANCE_FILE = "gguf_source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Special tokens that end a generation wherever a model has them (document ends and turn ends of common families),
# as llama.cpp also stops on them: a model fine-tuned from a base may still close an answer with the document end.
END_TOKENS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|return|>",
)
_PROBE_ANSWER = "fabric-align probe answer"  # plain words: the tokenizer leaves them as ordinary tokens
_UNSET_MAX_LENGTH = 10**12  # transformers writes int(1e30) when a tokenizer has no model_max_length


class GGUFError(DataError):
    """A GGUF file that cannot be converted (not a GGUF, damaged, an architecture transformers cannot load as a
    causal LM, a tokenizer whose special tokens cannot be made consistent), or a conversion that did not read back
    as written. The message names the file."""


# ---------------------------------------------------------------------------------------------------- metadata
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential reads from the GGUF header, bounds-checked (a truncated file is an error, not garbage)."""

    def __init__(self, buffer: mmap.mmap, endian: str) -> None:
        self.buffer, self.endian, self.pos = buffer, endian, 0

    def take(self, fmt: str) -> Any:
        fmt = self.endian + fmt
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buffer):
            raise struct.error("past the end of the file")
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        start = self.pos
        self.skip(n)
        return self.buffer[start : self.pos].decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:  # token lists and merges: skipped, transformers reads them; the count is kept
            item, count = self.take("I"), self.take("Q")
            if item == _STRING:
                for _ in range(count):
                    self.skip(self.take("Q"))
            elif item in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item]))
            else:
                raise ValueError(f"an array of unknown value type {item}")
            return GGUFArray(count)
        raise ValueError(f"unknown value type {kind}")


class GGUFArray(int):
    """An array-valued metadata entry, read as its length only."""


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (``general.architecture``, ``tokenizer.ggml.eos_token_id``...):
    scalars and strings as Python values, arrays as their length (``GGUFArray``). Reads the header only (a few
    milliseconds, where ``gguf.GGUFReader`` parses every token string into numpy views, seconds)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size < 24 or f.read(4) != b"GGUF":
                raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                (version,) = struct.unpack_from("<I", buffer, 4)
                endian = "<"
                if version > 0xFFFF:  # a big-endian file (s390x builds): the version reads byte-swapped
                    endian, version = ">", struct.unpack_from(">I", buffer, 4)[0]
                if version < 2:
                    raise GGUFError(f"{path}: GGUF version {version} predates the versions transformers reads (2, 3)")
                cursor = _Cursor(buffer, endian)
                cursor.skip(8)
                cursor.take("Q")  # tensor count
                metadata: dict[str, Any] = {"GGUF.version": version}
                for _ in range(cursor.take("Q")):
                    key = cursor.string()
                    metadata[key] = cursor.value(cursor.take("I"))
                return metadata
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, GGUFError):
            raise
        raise GGUFError(f"{path}: damaged or truncated GGUF header ({err})") from None


# ---------------------------------------------------------------------------------------------- special tokens
def _special_ids(tokenizer: Any) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in decoder.items() if getattr(token, "special", False)}


def _render_probe(tokenizer: Any) -> str | None:
    """A user turn and an assistant turn through the chat template, or None (no template, or one that needs
    more than that: a system turn, tools)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception included)
        log.warning("the chat template does not render a plain user/assistant exchange (%s); not checked", err)
        return None
    return text if isinstance(text, str) and _PROBE_ANSWER in text else None


def chat_end_of_turn(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant's answer (``<|im_end|>`` in ChatML,
    ``<|eot_id|>`` in Llama 3): what a completion must end with, so the tokenizer's EOS."""
    text = _render_probe(tokenizer)
    if text is None:
        return None
    tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    special = _special_ids(tokenizer)
    for token_id in tokenizer.encode(tail, add_special_tokens=False):
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return None


def adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def check_special_tokens(tokenizer: Any, metadata: Mapping[str, Any]) -> list[str]:
    """Make a GGUF-loaded tokenizer's special tokens agree with its chat template and the file's flags, in place.

    - EOS is the token the chat template ends an assistant turn with: the trainers append EOS to completions and
      generation stops on it, so an EOS that the template never writes would teach the model to ramble.
    - PAD is EOS when the file names none (padding is masked everywhere, any id works; the trainers do the same).
    - BOS is added by the tokenizer as the file's ``tokenizer.ggml.add_bos_token`` says (llama.cpp runs the model
      that way; transformers' loader usually follows it already, this makes sure).
    - Each of these tokens must encode to its own single id, else the trainers' masks would cut it.

    Returns what was changed, one line each (empty when the file got everything right). Raises ``GGUFError`` when
    it cannot be made consistent.
    """
    fixes: list[str] = []
    end_of_turn = chat_end_of_turn(tokenizer)
    if end_of_turn is not None and tokenizer.eos_token != end_of_turn:
        fixes.append(f"eos_token {tokenizer.eos_token!r} -> {end_of_turn!r} (the chat template ends turns with it)")
        tokenizer.eos_token = end_of_turn
    if tokenizer.eos_token is None:
        raise GGUFError("the tokenizer has no EOS token and the file has no chat template to infer one from")
    if tokenizer.pad_token is None:
        fixes.append(f"pad_token None -> {tokenizer.eos_token!r} (EOS, as the trainers pad)")
        tokenizer.pad_token = tokenizer.eos_token

    want_bos = metadata.get("tokenizer.ggml.add_bos_token")
    if isinstance(want_bos, bool) and adds_bos(tokenizer) != want_bos:
        fixes.append(f"add_bos_token {not want_bos} -> {want_bos} (the file's tokenizer.ggml.add_bos_token)")
        try:
            tokenizer.add_bos_token = want_bos
        except AttributeError:  # a tokenizer class without the switch
            pass
        if adds_bos(tokenizer) != want_bos:
            raise GGUFError(f"cannot make {type(tokenizer).__name__} {'add' if want_bos else 'stop adding'} BOS")
    rendered = _render_probe(tokenizer)
    if adds_bos(tokenizer) and rendered is not None and rendered.startswith(tokenizer.bos_token):
        # Kept as the file says (plain-text prompts need it); the trainers tokenize chat text without specials.
        log.info("the chat template writes BOS itself: tokenize rendered chats with add_special_tokens=False")

    for role in ("bos_token", "eos_token", "pad_token"):
        token = getattr(tokenizer, role)
        if token is None:
            continue
        ids = tokenizer.encode(token, add_special_tokens=False)
        if ids != [tokenizer.convert_tokens_to_ids(token)]:
            raise GGUFError(f"the {role} {token!r} does not encode to its own id (it encodes to {ids})")
    return fixes


def end_token_ids(tokenizer: Any, metadata: Mapping[str, Any]) -> list[int]:
    """Every token id that ends a generation: EOS first, then the file's EOS/end-of-turn/end-of-message ids, then
    the well-known end tokens (``END_TOKENS``) the tokenizer has as special tokens. For generation_config.json."""
    ids = [tokenizer.eos_token_id]
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if isinstance(metadata.get(key), int) and not isinstance(metadata.get(key), GGUFArray):
            ids.append(metadata[key])
    special = _special_ids(tokenizer)
    for token in END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id in special:
            ids.append(token_id)
    return [i for i in dict.fromkeys(ids) if isinstance(i, int) and 0 <= i < len(tokenizer)]


# -------------------------------------------------------------------------------------------------- conversion
def require_gguf_packages() -> None:
    """transformers' GGUF loader needs ``gguf`` and ``accelerate``: say so before anything is downloaded or read."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"reading GGUF files needs the {' and '.join(missing)} package(s): pip install 'fabric-align[gguf]'"
        )


def convert_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert ``gguf_path`` into the Hugging Face directory ``out_dir`` (weights in ``dtype``) and return it.

    ``out_dir`` must not exist or be empty; a directory that already holds this very conversion (same file by
    SHA-256, same dtype) is returned as it is, and any other existing one is refused (``FileExistsError``).
    Needs the ``gguf`` and ``accelerate`` packages (``pip install "fabric-align[gguf]"``).
    """
    source = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in DTYPES.values():
        raise ConfigError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
    if not source.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such GGUF file", str(source))
    metadata = read_gguf_metadata(source)
    dtype_name = str(dtype).removeprefix("torch.")
    digest = file_sha256(source)
    if _holds_conversion(out_dir, source, digest, dtype_name):
        log.info("%s already holds %s converted to %s", out_dir, source.name, dtype_name)
        return out_dir
    require_gguf_packages()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside out_dir, so the final rename stays on one filesystem; a dot name keeps it out of listings.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        record = _convert_into(source, staging, metadata, dtype)
        record["gguf"] = {
            "file": source.name,
            "bytes": source.stat().st_size,
            "sha256": digest,
            "architecture": metadata.get("general.architecture"),
            "name": metadata.get("general.name"),
            "license": metadata.get("general.license"),
        }
        record["dtype"] = dtype_name
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        _publish(staging, out_dir)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and not err.filename and err.errno:  # name the place that is full or locked
            raise OSError(err.errno, err.strerror or str(err), str(out_dir.parent)) from err
        raise
    log.debug("converted %s -> %s", source, out_dir)
    return out_dir


def _holds_conversion(out_dir: Path, source: Path, digest: str, dtype_name: str) -> bool:
    """True when ``out_dir`` holds this conversion already; False when it is absent or empty; else refuses."""
    if not out_dir.exists():
        return False
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return False
    try:
        record = json.loads((out_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
        same = record["gguf"]["sha256"] == digest and record["dtype"] == dtype_name
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if same:
        return True
    raise FileExistsError(
        errno.EEXIST,
        f"exists and is not a {dtype_name} conversion of {source.name}; remove it or choose another directory",
        str(out_dir),
    )


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    try:
        staging.rename(out_dir)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(
                errno.EEXIST, "was created by something else during the conversion", str(out_dir)
            ) from None
        raise


def _convert_into(source: Path, staging: Path, metadata: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = metadata.get("general.architecture")
    what = f"{source}: transformers {transformers.__version__} cannot load this {arch!r} GGUF as a causal LM"
    model_kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5.x always dequantizes
        pass
    else:
        # With the `kernels` package and a hub connection, newer transformers keep the weights packed in GGUF
        # blocks (GgufLinear modules): not a state dict a plain model can take.
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        # Dequantized in float32 (what the GGUF blocks decode to, exactly); cast to dtype once, below. The file as an
        # absolute path: transformers looks a bare file name up in the working directory first.
        gguf_model, info = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=str(source), dtype=torch.float32, output_loading_info=True, **model_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=str(source))
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise GGUFError(f"{what}: {_first_line(err)}") from err
    not_read = sorted(set(info.get("missing_keys") or ()) | set(info.get("mismatched_keys") or ()))
    if not_read:
        # transformers would leave them randomly initialized: a model that looks loaded and is not.
        raise GGUFError(
            f"{what}: {len(not_read)} weights are not in the file or do not fit ({', '.join(not_read[:5])})"
        )

    try:
        fixes = check_special_tokens(tokenizer, metadata)
    except GGUFError as err:
        raise GGUFError(f"{source}: {err}") from None
    for fix in fixes:
        log.warning("%s: tokenizer fixed: %s", source.name, fix)
    end_ids = end_token_ids(tokenizer, metadata)
    context = metadata.get(f"{arch}.context_length")
    if tokenizer.model_max_length >= _UNSET_MAX_LENGTH and isinstance(context, int) and context > 0:
        tokenizer.model_max_length = context  # the loader leaves it unset: truncation=True would never truncate

    # Rebuilt from the config: a GGUF-loaded model carries the GGUF quantizer, which save_pretrained refuses.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    # Built on the meta device and allocated empty: a random init of weights about to be overwritten costs
    # seconds for 135M parameters and minutes for billions. The buffers that state dicts leave out (rotary
    # frequencies) come from the loaded model, which has the same class and config.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    loaded_buffers = dict(gguf_model.named_buffers())
    for name, buffer in model.named_buffers():
        if name not in loaded_buffers:
            raise GGUFError(f"{what}: the rebuilt model has a buffer {name!r} the loaded one lacks")
        buffer.copy_(loaded_buffers[name])
    model.tie_weights()
    generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = end_ids
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config._from_model_config = False  # written on purpose: generate() must not re-derive it
    model.generation_config = generation_config
    _check_tied(model, where=str(source))

    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    except SafetensorError as err:  # safetensors reports a full disk as its own error, not an OSError
        code = re.search(r"os error (\d+)", str(err))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from err
        raise OSError(f"cannot write the weights: {err}") from err
    _apply_umask(staging)
    _check_saved(staging, model, tokenizer)
    return {
        "tokenizer": {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "adds_bos": adds_bos(tokenizer),
            "end_token_ids": end_ids,
            "fixes": fixes,
        },
        "converter": {
            "transformers": transformers.__version__,
            "gguf": _version("gguf"),
            "torch": torch.__version__.split("+")[0],
        },
    }


def _apply_umask(directory: Path) -> None:
    """Give the files the permissions a plain ``open`` would: the weights are written through a private temporary
    file (mode 0600), which other users of a shared cache could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def _check_tied(model: Any, *, where: str) -> None:
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text_config, "tie_word_embeddings", False):
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or head.weight is not embedding.weight:
            raise GGUFError(f"{where}: the config ties the embeddings but the lm_head has its own weight")


def _check_saved(staging: Path, model: Any, tokenizer: Any) -> None:
    """Read the directory back as a trainer will and compare: every weight bit for bit, the ties, the tokenizer's
    special tokens and its encoding of a chat-formatted text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=model.dtype)
    _check_tied(reloaded, where=str(staging))
    expected, got = model.state_dict(), reloaded.state_dict()
    differ = [name for name in expected if name not in got or not torch.equal(expected[name], got[name])]
    if differ or got.keys() != expected.keys():
        raise GGUFError(f"{staging}: the saved weights do not read back as written ({', '.join(differ[:5])})")
    del reloaded, got

    saved = AutoTokenizer.from_pretrained(str(staging))
    probe = (_render_probe(tokenizer) or "") + " Hello world, 12345."
    for attribute in ("bos_token", "eos_token", "pad_token", "chat_template"):
        if getattr(saved, attribute) != getattr(tokenizer, attribute):
            raise GGUFError(f"{staging}: the saved tokenizer's {attribute} does not read back as written")
    if saved(probe).input_ids != tokenizer(probe).input_ids:
        raise GGUFError(f"{staging}: the saved tokenizer encodes differently from the GGUF's")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
