"""Verified, atomic training checkpoints, resume discovery and the final Hugging Face export.

A checkpoint is written to ``out_dir/.tmp-step-{n}`` and renamed to ``out_dir/step-{n:06d}`` only once every
rank has finished writing and ``meta.json`` is in place. ``meta.json`` is the completion marker, written last: it
lists every file of the checkpoint with its size and SHA-256, so a file that was later truncated, emptied, removed
or flipped is found before anything is loaded (``verify_directory``). ``resume=auto`` takes the newest intact
checkpoint and names what is wrong with any newer one; an explicit damaged checkpoint is an error.

Nothing here unpickles code: tensors and counters load with ``weights_only=True``, and the pickled index of a
sharded (torch.distributed.checkpoint) save is read first through an allow-list of its own classes.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from fabric_align.errors import ConfigError, TrainingError, first_line

log = logging.getLogger("fabric_align")

STEP_DIR = re.compile(r"^step-(\d{6})$")
META = "meta.json"
DIGEST_PREFIX = ".digest-rank"  # each rank's share of the checksums while a checkpoint is written


# -------------------------------------------------------------------------------------------------- manifests
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(root: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of ``files`` under ``root``."""
    return {
        str(path.relative_to(root)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(files)
    }


def data_files(root: Path) -> list[Path]:
    """Every file under ``root`` but the completion marker and in-progress checksum shares."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != META and not p.name.startswith(DIGEST_PREFIX))


def verify_directory(path: Path) -> str | None:
    """What is wrong with a published directory (a checkpoint, a SPIN iteration), naming the file; None if every
    file its ``meta.json`` lists is there with the recorded size and checksum."""
    marker = path / META
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{marker} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{marker} is unreadable ({err})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{marker} lists no files (written by an older version, or edited)"
    for name, expected in sorted(files.items()):
        file = path / name
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
            return f"{marker}: the entry for {name} is malformed"
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            how = "truncated or emptied" if size < expected["bytes"] else "written to since"
            return f"{file} has {size} bytes, {expected['bytes']} were written ({how})"
        if file_sha256(file) != expected["sha256"]:
            return f"{file} does not match its checksum (damaged)"
    return None


def seal(tmp: Path, meta: dict[str, Any]) -> None:
    """Write the completion marker of a directory written by one process: ``meta`` plus the manifest of every
    file under ``tmp``, last."""
    record = {**meta, "files": describe_files(tmp, data_files(tmp))}
    (tmp / META).write_text(json.dumps(record, indent=2, ensure_ascii=False))


def load_plain(path: Path) -> Any:
    """A ``torch.save`` file of tensors and plain data (dicts, lists, numbers, strings), never code: anything else
    is refused with an error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        problem = f"refused to load (it holds more than tensors and plain data: {refusal(err)})"
        raise TrainingError(f"{path}: {problem}") from None
    # A damaged file whose manifest was rewritten to match it; torch reports a truncated zip as OSError(EINVAL).
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise TrainingError(f"{path}: unreadable ({first_line(err)})") from None


def refusal(err: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused (its message runs over many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if "Unsupported" in line or "GLOBAL" in line or "global" in line]
    return " ".join((found[0] if found else lines[0] if lines else type(err).__name__).split())[:200]


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text(encoding="utf-8"))


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints under ``out_dir`` (holding ``meta.json``; not yet verified), oldest first."""
    found = []
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / META).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_resume_path(out_dir: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume: with ``auto`` the newest intact one (a damaged newer one is named in a warning and
    passed over; None when there is none at all); a given path must be an intact checkpoint."""
    if resume is None:
        return None
    if str(resume) == "auto":
        found = checkpoint_dirs(out_dir)
        for child in sorted(out_dir.glob("step-*")) if out_dir.is_dir() else ():
            if STEP_DIR.match(child.name) and not (child / META).is_file():
                log.warning("resume=auto: %s has no %s (an unfinished or damaged checkpoint): passed over", child, META)
        for _, path in reversed(found):
            problem = verify_directory(path)
            if problem is None:
                return path
            log.warning("resume=auto: %s is damaged (%s); trying the checkpoint before it", path.name, problem)
        if found:
            raise ConfigError(
                f"resume=auto: no intact checkpoint in {out_dir} (newest: {verify_directory(found[-1][1])})"
            )
        return None
    path = Path(resume).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={path}: no such checkpoint directory")
    if path.is_file() and (path.parent / META).is_file():  # a file inside a checkpoint: its directory was meant
        raise ConfigError(f"resume={path}: a file; pass the checkpoint's directory, resume={path.parent}")
    if not path.is_dir() or not (path / META).is_file():
        raise ConfigError(f"resume={path}: not a complete checkpoint directory (no {META})")
    problem = verify_directory(path)
    if problem is not None:
        raise ConfigError(f"resume={path}: damaged checkpoint: {problem}")
    return path


# ---------------------------------------------------------------------------------------------- the run's lock
LOCK_FILE = ".lock"
_claimed: dict[Path, Any] = {}  # out_dir -> its open lock file, while this process runs there


def claim_out_dir(out_dir: Path) -> str | None:
    """Take ``out_dir`` for this process's run: an exclusive ``flock`` on ``out_dir/.lock``, which the operating
    system releases when the process ends, however it ends (a killed run leaves no stale lock). Returns None, or who
    holds it: a second run writing the same checkpoints, iterations and export would corrupt both (a relaunch while
    the old run's workers still live, two sweep runs given one out_dir). A file system without locks is not
    refused."""
    key = out_dir.resolve()
    if key in _claimed:
        return None
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    try:
        file = open(key / LOCK_FILE, "a+", encoding="utf-8", errors="replace")  # noqa: SIM115 (held while the run lasts)
    except OSError as err:  # the run's own writes will say what is wrong with out_dir
        log.debug("out_dir=%s: no lock (%s)", out_dir, err)
        return None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        file.seek(0)
        holder = file.read().strip()
        file.close()
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return holder or "another process"
        log.debug("out_dir=%s: no lock (%s)", out_dir, err)
        return None
    try:  # who holds it, for the message of a run refused; the lock holds without it (a full disk)
        file.truncate(0)
        file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
    except OSError as err:
        log.debug("out_dir=%s: lock holder not recorded (%s)", out_dir, err)
    _claimed[key] = file
    return None


def remove_unfinished_writes(out_dir: Path) -> None:
    """Remove the temporary directories of writes that a dead run left unfinished (a checkpoint, the export, a SPIN
    iteration, the reference cache): never published, so nothing reads them, and each may hold a model's size.
    Only by a run that holds the lock (before, a live run's writes in progress look the same) and has loaded what it
    resumes (a run refused before that touches nothing). Directories set aside by ``publish`` (``.old-*``,
    ``.replaced-*``, ``.incomplete-*``) are left alone: they may be all that remains of a complete one."""
    leftovers = sorted(p for p in [*out_dir.glob(".tmp-*"), *out_dir.glob("cache/.tmp-*")] if p.is_dir())
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if leftovers:
        names = ", ".join(str(p.relative_to(out_dir)) for p in leftovers)
        log.info("out_dir=%s: removed what an interrupted run left half-written (%s)", out_dir, names)


ROLLED_BACK = ".rolled-back-"


def set_aside_later_checkpoints(out_dir: Path, step: int) -> list[str]:
    """A run resumed from its own checkpoint at ``step`` leaves the branch that went on from there: the checkpoints
    after it (damaged ones too) and the export they led to become ``.rolled-back-NAME``. So ``resume=auto`` after
    this run stops continues this run, never the branch it left (whose log it has dropped). They stay until the run
    ends, whoever wants them back (a roll-back that fails loses nothing), and then those it wrote again go
    (``remove_rolled_back``)."""
    later = sorted(
        path
        for path in out_dir.glob("step-*")
        if (match := STEP_DIR.match(path.name)) and int(match.group(1)) > step and path.is_dir()
    )
    if later and (out_dir / "final").is_dir():
        later.append(out_dir / "final")
    for path in later:
        aside = path.with_name(ROLLED_BACK + path.name)
        if aside.exists():
            shutil.rmtree(aside)  # what an earlier roll-back set aside there: left twice over
        path.rename(aside)
    if later and (out_dir / "logs").is_dir():  # the branch's log too, of which the resumed run keeps the start only
        aside = out_dir / f"{ROLLED_BACK}logs"
        shutil.rmtree(aside, ignore_errors=True)
        shutil.copytree(out_dir / "logs", aside, ignore=shutil.ignore_patterns("wandb"))
    return [path.name for path in later]


def remove_rolled_back(out_dir: Path) -> list[str]:
    """At a run's successful end: remove what a roll-back set aside and the run has since written again; returns the
    names of the others, kept."""
    kept = []
    for aside in sorted(out_dir.glob(ROLLED_BACK + "*")):
        if (out_dir / aside.name.removeprefix(ROLLED_BACK)).exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            kept.append(aside.name)
    return kept


def release_out_dirs() -> None:
    """Release this process's out_dir locks: its run has ended (a test or a sweep may start the next in-process)."""
    while _claimed:
        _, file = _claimed.popitem()
        file.close()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(fabric: Fabric, out_dir: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save model, optimizer and counters (``state``) plus per-rank RNG states, atomically and with a manifest.

    A failed write (a full disk) removes only this save's temporary directory: the earlier checkpoints stay as
    they were, and the error propagates."""
    step = int(state["step"])
    final = out_dir / f"step-{step:06d}"
    tmp = out_dir / f".tmp-step-{step:06d}"
    if fabric.is_global_zero and tmp.exists():
        shutil.rmtree(tmp)  # our own leftovers from a save that crashed; never a complete checkpoint
    fabric.barrier()
    try:
        fabric.save(tmp / "state", state)
        # Each rank's RNG differs; the strategy's checkpoint keeps only rank 0's extra state.
        torch.save(rng_state(), tmp / f"rng-rank{fabric.global_rank}.pt")
        fabric.barrier()
        files = share_checksums(fabric, tmp)
        if fabric.is_global_zero:
            record = {**meta, "step": step, "world_size": fabric.world_size, "files": files}
            (tmp / META).write_text(json.dumps(record, indent=2))
            publish(tmp, final)
    except (OSError, CheckpointException) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_in(err)
        if cause is None:
            raise
        # Name the checkpoint, not the temporary file a library wrote it through (which may live in /tmp).
        raise OSError(cause.errno, f"could not write the checkpoint ({cause.strerror or cause})", str(final)) from None
    fabric.barrier()
    return final


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind a failed save: the error itself, or the first one torch.distributed.checkpoint's sharded
    writer collected from the ranks (it wraps them in a CheckpointException, a BaseException)."""
    if isinstance(err, OSError):
        return err
    for failure in getattr(err, "failures", {}).values():
        found = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(found, OSError):
            return found
    return None


def share_checksums(fabric: Fabric, root: Path) -> dict[str, dict[str, Any]]:
    """Checksums of every file under ``root``, each rank hashing a share (balanced by size) so a large sharded
    checkpoint is read once in all, in parallel; the whole manifest is returned on rank 0 ({} elsewhere)."""
    files = sorted(data_files(root), key=lambda p: (-p.stat().st_size, str(p)))
    if fabric.world_size == 1:
        return describe_files(root, files)
    rank = fabric.global_rank
    share = root / f"{DIGEST_PREFIX}{rank}.json"
    share.write_text(json.dumps(describe_files(root, files[rank :: fabric.world_size])))
    fabric.barrier()
    if not fabric.is_global_zero:
        return {}
    merged: dict[str, dict[str, Any]] = {}
    for r in range(fabric.world_size):
        part = root / f"{DIGEST_PREFIX}{r}.json"
        merged.update(json.loads(part.read_text()))
        part.unlink()
    return dict(sorted(merged.items()))


def publish(tmp: Path, final: Path, *, keep_replaced: bool = False) -> None:
    """Make a completely written ``tmp`` directory ``final`` with one rename: the one way every directory here is
    published (checkpoints, the export, SPIN iterations, the reference cache). An existing ``final`` is swapped out
    first and removed once the new one is in place (the same step saved again by a resumed run, a re-export); with
    ``keep_replaced`` it is set aside as ``.replaced-NAME-N`` (``.incomplete-NAME-N`` without a completion marker)
    instead, never deleted."""
    if not final.exists():
        tmp.rename(final)
    elif keep_replaced:
        kind = "replaced" if (final / META).is_file() else "incomplete"
        n = 1
        while (aside := final.with_name(f".{kind}-{final.name}-{n}")).exists():
            n += 1
        final.rename(aside)
        tmp.rename(final)
    else:
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)


def write_sealed(final: Path, write: Callable[[Path], dict[str, Any]], *, keep_replaced: bool = False) -> None:
    """Write a directory in one process: ``write(tmp)`` fills a temporary directory beside ``final`` and returns its
    metadata, the manifest is sealed into ``meta.json`` last, and the whole is published (a crash never leaves a
    half-written ``final``)."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftovers from a write that crashed
    tmp.mkdir(parents=True)
    seal(tmp, write(tmp))
    publish(tmp, final, keep_replaced=keep_replaced)


def load_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Restore ``state`` in place from a verified checkpoint; returns its meta. Only plain data is unpickled."""
    for index in (path / "state").rglob("*.metadata") if (path / "state").is_dir() else ():
        check_pickle_allowlist(index)
    try:
        remainder = fabric.load(path / "state", state, weights_only=True)
    except CheckpointException as err:  # a sharded load: each rank's failure, gathered (a BaseException)
        causes = [cause for cause, _ in err.failures.values()] or [err]
        refused = [cause for cause in causes if isinstance(cause, pickle.UnpicklingError)]
        raise TrainingError(f"{path / 'state'}: {load_problem(refused[0] if refused else causes[0])}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise TrainingError(f"{path / 'state'}: {load_problem(err)}") from None
    for key, value in remainder.items():
        state[key] = value
    meta = read_meta(path)
    rng_file = path / f"rng-rank{fabric.global_rank}.pt"
    if rng_file.is_file() and meta.get("world_size") == fabric.world_size:
        set_rng_state(load_plain(rng_file))
    return meta


def load_problem(err: BaseException) -> str:
    """Why a checkpoint's state did not load, in one line: code refused, a state made for another model's shapes, or
    damage (files that match a manifest rewritten for them)."""
    if isinstance(err, pickle.UnpicklingError):
        return f"refused to load (it holds more than tensors and numbers: {refusal(err)})"
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.lower().startswith(("size mismatch", "missing key", "unexpected key"))]
    if mismatch:
        return f"does not fit this model ({mismatch[0][:200]}): was it written for another model.name_or_path?"
    return f"unreadable ({first_line(err)})"


# The globals a torch.distributed.checkpoint index (``.metadata``, a plain pickle) is made of: its own dataclasses,
# tensor properties, paths. Listed one by one: a module prefix would admit any function those modules import.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    *(
        (_DCP_METADATA, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by name
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    *(("pathlib", name) for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}
TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _ALLOWED_GLOBALS
        if module == "torch" and isinstance(getattr(torch, name, None), TORCH_ENUMS):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return super().find_class(module, name)


def check_pickle_allowlist(path: Path) -> None:
    """Unpickle ``path`` admitting only the index classes of a distributed checkpoint; anything else (a function,
    a class of another module) is refused before torch reads the file with the unrestricted unpickler."""
    try:
        with path.open("rb") as f:
            _AllowListUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise TrainingError(f"{path}: refused to load ({err})") from err


def nonfinite_parameters(fabric: Fabric, module: nn.Module, *, frozen: bool = False) -> list[str]:
    """Names of trainable parameters (``frozen``: all of them, as a model loads) holding NaN or inf, on this rank's
    shards; every rank gets the global verdict as a non-empty list when any rank found one. 4-bit packed weights are
    not checked (packed bytes stored as floats are not numbers), nor meta tensors (ranks that read no weights); frozen
    ones only when asked, since they never change."""
    bad = []
    for name, parameter in module.named_parameters():
        if (not parameter.requires_grad and not frozen) or hasattr(parameter, "quant_state"):
            continue
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        if local.is_meta or not local.is_floating_point():
            continue
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            # The names the model's own files use: without Fabric's and peft's wrappers.
            bad.append(
                name.replace("_forward_module.", "").removeprefix("base_model.model.").replace(".base_layer.", ".")
            )
    if fabric.world_size > 1:
        count = fabric.all_reduce(torch.tensor(float(len(bad)), device=fabric.device), reduce_op="sum")
        if float(count) > 0 and not bad:
            bad = ["(on another rank)"]
    return bad


def require_finite_parameters(
    fabric: Fabric, module: nn.Module, what: str, *, frozen: bool = False, problem: str = "parameters are not finite"
) -> None:
    bad = nonfinite_parameters(fabric, module, frozen=frozen)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingError(f"{what}: {problem} ({shown})")


def full_state_dict(fabric: Fabric, module: nn.Module) -> dict[str, torch.Tensor]:
    """All parameters and buffers, unsharded, on the CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(hasattr(p, "full_tensor") for p in module.parameters()):  # FSDP2, also on a one-rank mesh
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)
    # Copies, also on CPU: the export merges LoRA into these tensors and must not touch the live weights.
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def export_hf(
    fabric: Fabric, policy: nn.Module, tokenizer: Any, out_dir: Path, *, merge_lora: bool, with_base: bool = False
) -> Path:
    """Write ``out_dir/final/`` in Hugging Face format: safetensors weights, config and tokenizer, or with LoRA the
    adapter (and, when asked, ``final/merged/`` with the adapter merged into the base). ``with_base``: the LoRA base
    exists nowhere else (a random init from a config), so ``final/base/`` holds it and the adapter points there."""
    from fabric_align.modeling import hf_model

    final = out_dir / "final"
    tmp = out_dir / ".tmp-final"
    inner = policy.model  # PolicyLogprobs -> the (peft) model
    state = full_state_dict(fabric, policy)
    if fabric.is_global_zero:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if tmp.exists():
            shutil.rmtree(tmp)
        if hasattr(inner, "peft_config"):
            _export_lora(inner, state, tmp, merge=merge_lora, tokenizer=tokenizer, base_at=final if with_base else None)
        else:
            model = hf_model(inner)
            for name in tied_aliases(inner):  # stored once, as transformers does (the state holds separate copies)
                state.pop(name, None)
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        readable_as_umask(tmp)
        publish(tmp, final)
    fabric.barrier()
    return final


def readable_as_umask(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open`` gives (0666 less the umask): safetensors writes its
    files through private temporary files (0600), which would leave the weights, unlike the rest of the export,
    unreadable by the other users who share a model directory."""
    umask = os.umask(0)
    os.umask(umask)
    for file in root.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


def tied_aliases(module: nn.Module) -> list[str]:
    """Names of parameters that are another parameter under a second name (a tied lm_head), after the first."""
    first: dict[int, str] = {}
    aliases = []
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases.append(name)
        else:
            first[id(parameter)] = name
    return aliases


def _export_lora(
    peft_model: Any, state: dict[str, torch.Tensor], target: Path, *, merge: bool, tokenizer: Any, base_at: Path | None
) -> None:
    """The adapter into ``target``; with ``merge`` the merged model into ``target/merged``; with ``base_at`` (the
    export's final place) the base model into ``target/base``, named as the adapter's base by its absolute path."""
    from peft import get_peft_model_state_dict

    adapter_state = get_peft_model_state_dict(peft_model, state_dict=state)
    peft_model.save_pretrained(target, state_dict=adapter_state, safe_serialization=True)
    if base_at is not None:  # before the merge, which adds the adapter into the (shared) state tensors in place
        base = _fresh_copy(peft_model, state).unload()
        base.save_pretrained(target / "base", safe_serialization=True)
        tokenizer.save_pretrained(target / "base")
        adapter_config = target / "adapter_config.json"
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = str((base_at / "base").resolve())
        adapter_config.write_text(json.dumps(config, indent=2))
    if merge:
        merged = _fresh_copy(peft_model, state).merge_and_unload()
        merged.save_pretrained(target / "merged", safe_serialization=True)
        tokenizer.save_pretrained(target / "merged")


def _fresh_copy(peft_model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A CPU copy of the peft model holding ``state``, to merge or unload without touching the training model."""
    from transformers import AutoModelForCausalLM

    from fabric_align.modeling import with_adapters

    base = peft_model.get_base_model()  # unquantized: ModelArgs.check refuses merge_on_export with quantize
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(state.values())).dtype)
    clean = with_adapters(clean, peft_model.peft_config["default"])
    # Same key names as the training model's peft wrapper; assign=True takes the tensors off the meta device.
    clean.load_state_dict(state, strict=True, assign=True)
    if getattr(base.config, "tie_word_embeddings", False):
        # Loading assigned the embedding and the lm_head separate tensors: tie them again, or a merge unties the
        # model for good (peft then rewrites the config) and the export stores the embedding twice.
        clean.get_base_model().tie_weights()
    clean.get_base_model().generation_config = copy.deepcopy(base.generation_config)  # end tokens, sampling
    return clean
