"""Ctrl-C while an entry script is still importing (torch, transformers, lightning: seconds) is one line too.

Python would print the traceback of whichever import it interrupted, and an interrupt that lands inside a C++
extension's import can abort the process outright. Nothing has been written by then, so the process ends at once,
with the line a run interrupted later prints. ``run_program`` hands Ctrl-C back to Python's KeyboardInterrupt.
Imported first by ``kto.py`` and ``spin.py``; it acts only when one of them is the program (never in a process that
imports them, like a test run)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

ENTRY_SCRIPTS = {Path(__file__).with_name(name) for name in ("kto.py", "spin.py")}


def interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"error: interrupted before the run started; nothing was written\n")  # one write: ranks share stderr
    os._exit(1)  # not an exception: one raised through an extension's import may abort instead


def hand_back_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt again (the run reports it in one line and its checkpoints stay intact)."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _program_file() -> Path | None:
    main = sys.modules.get("__main__")
    name = getattr(main, "__file__", None)
    return Path(name).resolve() if name else None


if (
    _program_file() in ENTRY_SCRIPTS
    and threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    signal.signal(signal.SIGINT, interrupted_while_starting)
