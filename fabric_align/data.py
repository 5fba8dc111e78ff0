"""Data plumbing shared by the trainers: reading rows, validating them, chat rendering, tokenization, batching.

Every problem with a row raises ``DataError`` naming the file, the line (or dataset row) and the field, before
any model is loaded.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fabric_align.errors import DataError, first_line

log = logging.getLogger("fabric_align")

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_DATA = {
    "fabric-align/kto-demo": ASSETS / "kto_demo_train.jsonl",
    "fabric-align/kto-demo-val": ASSETS / "kto_demo_val.jsonl",
    "fabric-align/sft-demo": ASSETS / "sft_demo_train.jsonl",
    "fabric-align/sft-demo-val": ASSETS / "sft_demo_val.jsonl",
}
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from, for error messages."""

    source: str
    """File path or ``dataset-id[split]``."""
    where: str
    """``line 12`` for JSON lines, ``row 11`` for arrays, parquet and datasets."""
    value: Any

    def error(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.source}, {self.where}, field '{field}': {problem}")


# ----------------------------------------------------------------------------------------------------- reading
def resolve_path(path: str) -> str:
    """Map the embedded demo names to their files; everything else is returned as given."""
    return str(EMBEDDED_DATA[path]) if path in EMBEDDED_DATA else path


def read_rows(path: str, split: str = "train") -> list[Row]:
    """Rows of a local .jsonl/.json/.parquet/.csv/.tsv file (the text kinds also gzipped), a folder of such files, a
    ``save_to_disk`` directory, or a Hugging Face dataset id."""
    path = resolve_path(path)
    local = Path(path).expanduser()
    kind, gzipped = file_kind(local)
    if kind in FILE_SUFFIXES:
        if not local.is_file():
            raise DataError(f"{path}: file not found")
        if kind == ".parquet":
            import pyarrow.parquet as pq

            try:
                records = pq.read_table(local).to_pylist()
            except Exception as err:  # pyarrow raises several types for corrupt files
                raise DataError(f"{path}: not a readable parquet file ({err})") from err
            return [Row(path, f"row {i}", without_nulls(r)) for i, r in enumerate(records)]
        raw = local.read_bytes()
        if gzipped:
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as err:
                raise DataError(f"{path}: not a readable gzip file ({err})") from None
        text = decode_utf8(path, raw)
        if kind in (".csv", ".tsv"):
            return _read_csv(path, text, "\t" if kind == ".tsv" else ",")
        stripped = text.lstrip()
        if kind == ".json" and stripped.startswith("["):
            try:
                records = json.loads(text, object_pairs_hook=unique_keys)
            except KeyTwice as err:
                where = f"row {row_of_key_twice(text)}"
                raise DataError(f"{path}, {where}, field {err.field!r}: given twice in one object") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {err.lineno}, field '<json>': malformed JSON ({err.msg})") from err
            except RecursionError:
                raise DataError(f"{path}, line 1, field '<json>': nested too deeply to read") from None
            except ValueError as err:  # an integer of more digits than Python converts
                raise DataError(f"{path}, line 1, field '<json>': unreadable JSON ({err})") from None
            return [Row(path, f"row {i}", r) for i, r in enumerate(records)]
        if kind == ".json" and stripped.startswith("{") and "\n" in stripped.rstrip():
            # JSON lines, or one pretty-printed object: only the first value is decoded to tell them apart.
            try:
                first, end = json.JSONDecoder().raw_decode(stripped)
            except (ValueError, RecursionError):
                first, end = None, 0  # reported per line below
            if isinstance(first, dict) and not stripped[end:].strip():
                raise DataError(
                    f"{path}, line 1, field '<json>': one JSON object (keys {sorted(first)[:5]}); expected an array "
                    "of rows, or one row per line (.jsonl)"
                )
        return _read_json_lines(path, text)
    if str(path).startswith(("/", "./", "../", "~")) and not local.exists():
        # A local path, not a hub id: said at once, not after the hub's retries.
        raise DataError(f"{path}: no such file or directory")
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        import datasets  # a `save_to_disk` directory

        try:
            loaded = datasets.load_from_disk(str(local))
        except Exception as err:  # datasets raises several types for damaged directories
            raise DataError(f"{path}: not a readable dataset directory ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split '{split}' (has {sorted(loaded)})")
            loaded = loaded[split]
        return [Row(f"{path}[{split}]", f"row {i}", without_nulls(r)) for i, r in enumerate(loaded)]
    if local.is_file():
        raise DataError(f"{path}: unsupported file type (expected {KINDS_SAID})")
    files = split_files(local, path, split) if local.is_dir() else None
    if files is not None:  # read here, so that a bad row is named by its file and line
        return [row for file in files for row in read_rows(str(file))]
    import datasets

    from fabric_align.hub import offline_unless_reachable

    if not local.is_dir():
        offline_unless_reachable()
    try:
        loaded = datasets.load_dataset(path, split=split)
    except Exception as err:  # hub errors come in many types; the message says what went wrong
        what = "could not be read as a dataset folder" if local.is_dir() else "not a local file and could not be loaded"
        raise DataError(f"{path}: {what} ({dataset_error(err)})") from None
    return [Row(f"{path}[{split}]", f"row {i}", without_nulls(r)) for i, r in enumerate(loaded)]


def source_of(rows: Sequence[Row], path: str, split: str) -> str:
    """What a split's own problems (too few rows, one label only) name: its file, or the folder and split when its
    rows come from several files."""
    sources = {row.source for row in rows}
    return sources.pop() if len(sources) == 1 else f"{path}[{split}]"


def dataset_error(err: BaseException) -> str:
    """The first line of what ``datasets`` raised, or of its cause where it wraps a file's own error in a general one
    ("An error occurred while generating the dataset"); its own messages (gated, not found) say more than the HTTP
    errors under them."""
    cause = err.__cause__ or err.__context__
    while "error occurred while generating the dataset" in str(err) and cause is not None:
        err, cause = cause, cause.__cause__ or cause.__context__
    return first_line(err, limit=300)


# What a row can come from: the text kinds may be gzipped (train.jsonl.gz). Not .txt: a folder's notes.txt or
# LICENSE.txt is no data set of rows.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
KINDS_SAID = ".jsonl, .json, .parquet, .csv or .tsv (the text kinds also as .gz)"


def file_kind(path: Path) -> tuple[str, bool]:
    """A data file's kind (its suffix, lower-case) and whether it is gzipped: ``train.jsonl.gz`` is (".jsonl", True)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in FILE_SUFFIXES and suffixes[-2] != ".parquet":
        return suffixes[-2], True
    return (suffixes[-1] if suffixes else ""), False


def _read_csv(path: str, text: str, delimiter: str) -> list[Row]:
    """Rows of a CSV (or TSV) file with a header, every value as written (text: "4" stays the answer "4", an empty
    cell is an empty string), each named by the line it starts on."""
    csv.field_size_limit(2**31 - 1)  # not the module's default of 128 KiB: a long-context answer is one value
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[Row] = []
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            raise DataError(f"{path}, line {start}, field '<csv>': malformed CSV ({err})") from None
        if not any(value.strip() for value in record):
            continue  # a blank line
        if header is None:
            header = [name.strip() for name in record]
            seen = Counter(header)
            if twice := [name for name, n in seen.items() if n > 1 or not name]:
                problem = "a column with no name" if not twice[0] else "given twice in the header"
                raise DataError(f"{path}, line {start}, field {twice[0]!r}: {problem}")
            continue
        if len(record) > len(header):
            raise DataError(
                f"{path}, line {start}, field '<csv>': {len(record)} values for the header's {len(header)} columns "
                f"({', '.join(header)}); quote a value that holds the delimiter"
            )
        rows.append(Row(path, f"line {start}", dict(zip(header, record, strict=False))))


def split_files(directory: Path, path: str, split: str) -> list[Path] | None:
    """The files of ``split`` in a folder of data files, as ``datasets.load_dataset`` picks them (by its own file
    naming rules: ``train.jsonl``, ``data/test-00000-of-00001.parquet``, all files for ``train`` when no name says),
    less those of no data kind (``train.jsonl.bak``); None to leave the folder to ``datasets`` (a dataset card that
    configures its own files, a split expression)."""
    if configures_files(directory / "README.md"):
        return None
    if not re.fullmatch(r"\w+(\.\w+)*", split):  # a slice or sum of splits ("train[:10%]"): datasets reads it
        return None
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    except Exception:  # datasets found no file it could read at all
        splits = DataFilesDict()
    if any(read_by_datasets_only(Path(f)) for f in splits.get(split, [])):
        return None  # .arrow, .jsonl.bz2...: datasets reads them, and names no line of theirs anyway
    splits = DataFilesDict(
        {name: [f for f in files if file_kind(Path(f))[0] in FILE_SUFFIXES] for name, files in splits.items()}
    )
    splits = DataFilesDict({name: files for name, files in splits.items() if files})
    if not splits:
        found = sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())
        raise DataError(f"{path}: no data files ({KINDS_SAID}) in the folder (it holds {found[:5] or 'nothing'})")
    if split not in splits:
        raise DataError(f"{path}: no split '{split}' (its files make {sorted(str(name) for name in splits)})")
    warn_unread_files(directory, path, splits)
    files = [Path(file) for file in splits[split]]
    kinds = Counter(FILE_KINDS[file_kind(f)[0]] for f in files)
    if len(kinds) > 1:  # rows of one split in two forms: as datasets would, keeping one kind drops the other's rows
        found = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        raise DataError(f"{path}: split '{split}' mixes kinds of data files ({found}); keep one kind per split")
    return files


COMPRESSIONS = (".bz2", ".xz", ".zst", ".lz4", ".zip", ".tar")


def read_by_datasets_only(file: Path) -> bool:
    """A data file of a kind ``datasets`` reads and this module does not (not one that merely matches a split's name,
    like ``train.jsonl.bak``, or a ``.txt`` beside the data)."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    suffix = file.suffix.lower()
    if file_kind(file)[0] in FILE_SUFFIXES or suffix == ".txt":
        return False
    return suffix in COMPRESSIONS or suffix in _EXTENSION_TO_MODULE


def configures_files(card: Path) -> bool:
    """Whether a dataset card (``README.md`` with YAML front matter) says which files make which split (``configs``):
    then ``datasets`` reads the folder. A card with only a license, tags or a description changes nothing."""
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    import yaml

    front = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return True  # unreadable here: datasets says what is wrong with it
    return not isinstance(meta, dict) or "configs" in meta


FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


def warn_unread_files(directory: Path, path: str, splits: Any) -> None:
    """``datasets``' naming rules read a folder's files by split name (``train.jsonl``; ``data/train-*``): other
    data files are left out without a word, rows a user meant to train on, and so are files of no data kind that a
    split's name pattern takes in (``train.jsonl.bak``). Named here."""
    read = {Path(file).resolve() for files in splits.values() for file in files}
    unread = sorted(
        str(file.relative_to(directory))
        for file in directory.rglob("*")
        if file.is_file()
        and not any(part.startswith((".", "__")) for part in file.relative_to(directory).parts)
        and file.resolve() not in read
        and (file_kind(file)[0] in FILE_SUFFIXES or any(file.name.startswith(str(name)) for name in splits))
    )
    if unread:
        log.warning(
            "%s: %d file(s) no split reads under datasets' naming rules (the splits: %s): %s%s; name each data file "
            "(%s) after its split (train.jsonl, train-2.jsonl, data/train-00001-of-00002.jsonl) or point at a file",
            path,
            len(unread),
            ", ".join(
                f"{name} {len(files)} file(s)" for name, files in sorted(splits.items(), key=lambda kv: str(kv[0]))
            ),
            ", ".join(unread[:5]),
            f" and {len(unread) - 5} more" if len(unread) > 5 else "",
            KINDS_SAID,
        )


def without_nulls(record: Any) -> Any:
    """A columnar row (parquet, datasets) without its null columns: a table gives every row every column, so a
    file mixing row forms, or setting ``system`` on some rows only, has nulls where a JSON line has no key."""
    return {k: v for k, v in record.items() if v is not None} if isinstance(record, dict) else record


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def decode_utf8(path: str, raw: bytes) -> str:
    """The file's text; bytes that are not UTF-8 (a Latin-1 or binary file) are named by line and column."""
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is not part of the first row
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        byte = raw[err.start : err.start + 1].hex()
        raise DataError(
            f"{path}, line {line}, field '<bytes>': not UTF-8 text (byte 0x{byte} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _read_json_lines(path: str, text: str) -> list[Row]:
    rows = []
    # Lines end at "\n" only (and "\r\n"): str.splitlines() would also split at U+2028, U+0085 or \x1c..\x1e,
    # which JSON allows raw inside strings (json.dumps(..., ensure_ascii=False) writes them so).
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append(Row(path, f"line {lineno}", json.loads(line, object_pairs_hook=unique_keys)))
        except KeyTwice as err:
            raise DataError(f"{path}, line {lineno}, field {err.field!r}: given twice in one object") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {lineno}, field '<json>': malformed JSON ({err.msg})") from err
        except RecursionError:
            raise DataError(f"{path}, line {lineno}, field '<json>': nested too deeply to read") from None
        except ValueError as err:  # an integer of more digits than Python converts
            raise DataError(f"{path}, line {lineno}, field '<json>': unreadable JSON ({err})") from None
    return rows


class KeyTwice(Exception):
    """A JSON object names one key twice: Python's json keeps the last value in silence, so a row edited by hand
    (``"label": true, ..., "label": false``) would train on whichever came last."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        raise KeyTwice(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


def row_of_key_twice(text: str) -> int:
    """The index of the first row of a JSON array that names a key twice (the array is valid JSON)."""
    decoder = json.JSONDecoder(object_pairs_hook=unique_keys)
    space = re.compile(r"[ \t\n\r]*")
    pos, row = space.match(text, text.index("[") + 1).end(), 0
    while True:
        try:
            _, pos = decoder.raw_decode(text, pos)
        except KeyTwice:
            return row
        pos = space.match(text, pos).end() + 1  # past the comma
        pos, row = space.match(text, pos).end(), row + 1


# --------------------------------------------------------------------------------------------------- validation
Messages = list[dict[str, str]]


def require_dict(row: Row) -> dict[str, Any]:
    if not isinstance(row.value, dict):
        raise row.error("<row>", f"expected a JSON object, got {type(row.value).__name__}")
    return row.value


def require_field(row: Row, obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise row.error(name, f"missing (the row has {shown(sorted(obj), 200)})")
    if obj[name] is None:
        raise row.error(name, "is null")
    return obj[name]


def require_text(row: Row, value: Any, field: str, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise row.error(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise row.error(field, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON can spell a lone surrogate ("\ud800"), which no tokenizer can encode
        code = ord(value[err.start])
        problem = f"holds a lone surrogate (U+{code:04X} at character {err.start}), not valid text"
        raise row.error(field, problem) from None
    return value


def require_messages(
    row: Row,
    value: Any,
    field: str,
    *,
    key_role: str = "role",
    key_content: str = "content",
    role_map: dict[str, str] | None = None,
    or_string: bool = False,
) -> Messages:
    """A non-empty list of chat messages with known roles and string contents (``field[i].role`` in errors);
    ``or_string``: the field also takes a plain string (only the message wording depends on it)."""
    if not isinstance(value, list):
        expected = "a string or a list of messages" if or_string else "a list of messages"
        raise row.error(field, f"expected {expected}, got {type(value).__name__}")
    if not value:
        raise row.error(field, "is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise row.error(where, f"expected a message object, got {type(message).__name__}")
        role = message.get(key_role)
        role = role_map.get(role, role) if role_map and isinstance(role, str) else role
        if role not in ROLES:
            problem = f"unknown role {shown(message.get(key_role))} (expected one of {ROLES})"
            raise row.error(f"{where}.{key_role}", problem)
        content = require_text(row, message.get(key_content), f"{where}.{key_content}", allow_empty=True)
        messages.append({"role": role, "content": content})
    return messages


# ------------------------------------------------------------------------------------------------ tokenization
@dataclass
class Encoded:
    """A prompt and a completion as token ids; the prompt is masked out of every log-prob."""

    prompt_ids: list[int]
    completion_ids: list[int]


class ChatRenderer:
    """Turns prompts/completions (strings or message lists) into token ids with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")

    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def check_chat(self, row: Row, field: str) -> None:
        if not self.has_template():
            raise row.error(
                field,
                f"conversational data needs a chat template, and the tokenizer "
                f"{self.tokenizer.name_or_path!r} has none",
            )

    def encode(
        self,
        prompt: str | Messages,
        completion: str | Messages,
        row: Row | None = None,
        field: str = "prompt",
        *,
        answer_field: str | None = "completion",
    ) -> Encoded:
        """Prompt and completion token ids (the completion ends in exactly one EOS). ``row`` and ``field`` name what
        a chat template that refuses the conversation (``raise_exception`` in Gemma's, Mistral's) was given;
        ``answer_field`` names a completion that holds nothing but its end (``"</s>"``), which is refused (None: an
        empty one is allowed, as a generated answer may be)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            # Plain text: the tokenizer adds its own specials (BOS) to the prompt, none to the completion.
            prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
            completion_text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        else:
            from jinja2 import TemplateError

            completion_msgs = (
                completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            )
            try:
                prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                full_text = tok.apply_chat_template(prompt + completion_msgs, tokenize=False)
            except TemplateError as err:
                problem = f"the chat template of {tok.name_or_path!r} refuses this conversation ({err})"
                raise (row.error(field, problem) if row is not None else DataError(problem)) from None
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
            if full_text.startswith(prompt_text):
                completion_text = full_text[len(prompt_text) :]
            else:  # templates that rewrite earlier turns: fall back to the raw contents
                completion_text = "".join(m["content"] for m in completion_msgs)
        if not prompt_ids:
            # An empty prompt and no BOS (SmolLM2, Qwen): the first completion token needs something to be predicted
            # from. The model reads it after BOS, or after the end-of-text token that separates documents.
            prompt_ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        completion_ids = strip_final_eos(tok, tok(completion_text, add_special_tokens=False)["input_ids"])
        if answer_field is not None and not tok.decode(completion_ids, skip_special_tokens=True).strip():
            problem = "is empty once its end token is dropped (the answer holds no text)"
            raise row.error(answer_field, problem) if row is not None else DataError(f"{answer_field} {problem}")
        return Encoded(list(prompt_ids), [*completion_ids, tok.eos_token_id])


def strip_final_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """The completion without the EOS that closes it (templates often add EOS plus a newline, some a turn-end
    token and then EOS again), so that exactly one EOS ends it. Only trailing EOS count, each followed by nothing
    but whitespace: an earlier EOS closes an earlier message of a multi-turn completion, or is ``</s>`` written
    inside the text, and cutting there would silently drop the rest of the answer."""
    eos = tokenizer.eos_token_id
    while eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        tail = ids[last + 1 :]
        if tail and tokenizer.decode(tail).strip():
            break  # something other than whitespace follows: not a closing EOS
        ids = ids[:last]
    return ids


def fit_length(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> list[int] | None:
    """Keep the whole prompt and cut the completion; None when the prompt alone leaves no room."""
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return completion_ids[:room]


def report_fit(source: str, total: int, dropped: int, cut: int, max_length: int, detail: str = "") -> None:
    """Say what ``data.max_length`` did to a split: rows dropped because their prompt alone does not fit, and
    completions cut to fit (their ends are not trained on)."""
    if not dropped and not cut:
        return
    log.warning(
        "%s: data.max_length=%d%s dropped %d of %d rows whose prompt alone does not fit and cut the completion of %d",
        source,
        max_length,
        f" ({detail})" if detail else "",
        dropped,
        total,
        cut,
    )


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point: example i is paired with the completion of example pi(i)."""
    if n < 2:
        raise DataError(f"the KL reference point needs at least 2 examples, got {n}")
    generator = torch.Generator().manual_seed(seed)
    while True:  # a random permutation is a derangement with probability ~1/e
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            return perm.tolist()


def content_hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- batching
def pad_sequences(sequences: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs and next-token targets for (token ids, prompt length) pairs.

    The model reads ``input_ids`` (all tokens but the last) and ``targets[t]`` is the token at ``t + 1`` where
    that token is part of the completion, else IGNORE_INDEX.
    """
    width = max(len(ids) for ids, _ in sequences) - 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(sequences):
        n = len(ids) - 1
        input_ids[i, :n] = torch.tensor(ids[:-1])
        attention_mask[i, :n] = 1
        targets[i, prompt_len - 1 : n] = torch.tensor(ids[prompt_len:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


@dataclass
class StepPlan:
    """Which examples each optimizer step uses: a seeded shuffle per epoch, cut into global batches.

    Step s always reads the same ``global_batch_size`` examples whatever the number of ranks and micro-batches,
    so runs with different splits see identical data and a resumed run continues exactly where it stopped.
    """

    num_examples: int
    global_batch_size: int
    seed: int
    lengths: Sequence[int] | None = None
    """Each example's padded length (tokens). When given, a step's examples are sorted by it before they are cut into
    micro-batches, so each micro-batch pads to the length of similar rows instead of to its longest row's. The step
    still reads the same examples: its loss and gradient change only by the round-off of the other grouping."""

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = position * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        indices = self.global_indices(step)
        if self.lengths is None:
            per_rank = len(indices) // world_size
            mine = indices[rank * per_rank : (rank + 1) * per_rank]
            return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
        return deal_by_length(indices, self.lengths, rank, world_size, micro_batch_size)


def deal_by_length(
    indices: list[int], lengths: Sequence[int], rank: int, world_size: int, micro_batch_size: int
) -> list[list[int]]:
    """This rank's micro-batches of ``indices`` (a multiple of ``world_size * micro_batch_size`` of them; -1:
    padding, sorted last), each holding examples of neighbouring lengths, so it pads little. The micro-batches are
    dealt to the ranks back and forth (0, 1, ..., w-1, w-1, ..., 0, 0, ...): every rank gets as many and a similar
    amount of work, since the ranks wait for each other."""
    ordered = sorted(indices, key=lambda i: lengths[i] if i >= 0 else math.inf)
    groups = [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    return [group for k, group in enumerate(groups) if snake_rank(k, world_size) == rank]


def snake_rank(k: int, world_size: int) -> int:
    """The rank that the k-th of a sequence of groups goes to when they are dealt back and forth."""
    lap, position = divmod(k, world_size)
    return position if lap % 2 == 0 else world_size - 1 - position


def shard_by_length(lengths: Sequence[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's share of ``range(len(lengths))`` in micro-batches of neighbouring lengths (``deal_by_length``),
    padded with -1 so every rank runs the same number of forwards (FSDP needs every rank in every collective); -1
    entries are dropped from results."""
    per_rank = math.ceil(math.ceil(len(lengths) / world_size) / micro_batch_size) * micro_batch_size
    indices = list(range(len(lengths))) + [-1] * (per_rank * world_size - len(lengths))
    return deal_by_length(indices, lengths, rank, world_size, micro_batch_size)
