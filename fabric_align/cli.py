"""The program entry of every method: the typed command line (jsonargparse from ``setup``'s signature), logging, and
one ``error:`` line with exit status 1 for everything a user can act on."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from fabric_align.errors import ConfigError, DataError, TrainingError
from fabric_align.kernels.selfcheck import KernelCheckError
from fabric_align.startup import hand_back_ctrl_c


def run_program(setup: Callable[..., Any], args: list[str] | None = None) -> None:
    """The program entry: ``run_cli``, with everything a user can act on (bad input: ``DataError`` and ``ConfigError``,
    which name the file, line and field or the flag; a run that stopped: ``TrainingError``; the system: a full disk,
    a permission) reported as one ``error:`` line on stderr and exit status 1 instead of a traceback."""
    hand_back_ctrl_c()
    try:
        run_cli(setup, args)
    except (DataError, ConfigError, TrainingError, KernelCheckError) as err:
        exit_with_error(str(err))
    except OSError as err:
        exit_with_error(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written atomically, so the newest complete one is intact
        exit_with_error("interrupted; --resume auto continues from the newest complete checkpoint")
    else:
        # The trained model outlives setup() in reference cycles (module hooks), and under FSDP2 holds its device
        # mesh's process groups: free them now, while the interpreter is whole, not in its teardown, where a
        # gloo process group's destruction has, rarely, aborted a rank after a successful run.
        gc.collect()


def exit_with_error(message: str) -> None:
    for bar in list(getattr(tqdm, "_instances", ())):  # end an open progress bar's line: the error gets its own
        bar.close()
    rank = process_rank()
    write_line(f"error: {f'[rank {rank}] ' if rank else ''}{message}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # best effort: every rank raised the same error
            torch.distributed.destroy_process_group()
    raise SystemExit(1) from None


def write_line(line: str) -> None:
    """One line on stderr in one write: the ranks of a run share the stream, and print's separate writes of the text
    and its newline let two ranks' errors run into one line."""
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), f"{line}\n".encode())
    except (AttributeError, OSError, ValueError):  # a stream with no file descriptor (a test's capture)
        print(line, file=sys.stderr, flush=True)


def run_cli(setup: Callable[..., Any], args: list[str] | None = None) -> None:
    """Parse the command line (or ``args``) into ``setup``'s typed signature and call it. A flag the parser rejects
    (an unknown name, a value of the wrong type, a YAML file it cannot read) is a ``ConfigError`` in one line."""
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)  # attribute docstrings -> --help
    # A W&B sweep agent writes a null value as Python prints it (`--train.max_steps=None`); YAML reads null.
    args = [re.sub(r"^(--[\w.]+)=None$", r"\1=null", a) for a in (args if args is not None else sys.argv[1:])]
    warn_flags_before_config(args)
    try:
        jsonargparse.auto_cli(setup, args=args, as_positional=False, exit_on_error=False)
    except jsonargparse.ArgumentError as err:
        message = parser_message(str(err))
        configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
        configs += [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
        # name the file jsonargparse read: not YAML, or YAML that is not a mapping of flags
        if message.startswith(("Problems parsing config", "Unexpected config")) and configs:
            message = f"--config {', '.join(configs)}: {message}"
        raise ConfigError(f"{message} (see --help)") from None
    finally:
        from fabric_align.checkpoints import release_out_dirs

        release_out_dirs()  # the run has ended, whichever way


def warn_flags_before_config(argv: list[str]) -> None:
    """Arguments apply in order, so a file read by a later ``--config`` overrides the flags before it, silently."""
    first = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    early = [a.split("=", 1)[0] for a in argv[:first] if a.startswith("--")] if first else []
    if early:
        logging.getLogger("fabric_align").warning(
            "%s before --config: the file's values override them where it sets them; put --config first",
            ", ".join(early),
        )


def parser_message(text: str) -> str:
    """jsonargparse's multi-line explanation as one line: ``kto.beta: expected a float, got inf``."""
    text = re.sub(r"<class '(\w+)'>", r"\1", " ".join(text.split()))
    text = re.sub(r'^Parser key "([^"]+)":\s*', r"\1: ", text)
    return text.replace(". Got value: ", ", got ").replace("a typing.Literal[", "one of [")


def process_rank() -> int:
    """This process's global rank, before the process group exists too: ``fabric run`` (torchrun) sets ``RANK``,
    Fabric's own launcher ``LOCAL_RANK`` in the processes it starts (one node). 0 outside distributed runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for name in ("RANK", "GLOBAL_RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def rank_zero_or_error(record: logging.LogRecord) -> bool:
    """Every rank reads the same data and settings, so their notes and warnings would repeat once per process: only
    rank 0 shows them. Errors show on every rank, tagged with it."""
    if record.levelno >= logging.ERROR:
        rank = process_rank()
        if rank:
            record.msg = f"[rank {rank}] {record.msg}"
        return True
    return process_rank() == 0


def configure_logging() -> None:
    root = logging.getLogger()
    ours = not root.handlers  # a host program's (or pytest's) handlers are left as they are
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if ours:
        for handler in root.handlers:
            handler.addFilter(rank_zero_or_error)
        # These libraries print through a handler of their own; passed on to ours too, each line showed twice.
        for library in ("huggingface_hub", "datasets"):
            logging.getLogger(library).propagate = False
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a CPU 4-bit matmul kernel from the Hugging Face
    # hub and warns when it cannot. We never use it (modeling.load_model keeps the NF4 layout the GPU path uses).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "from kernels-community" not in record.getMessage()
    )
