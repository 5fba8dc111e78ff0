"""fabric-align: KTO and SPIN alignment of Hugging Face causal LMs with Lightning Fabric."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parents[1]


class _KernelsNameGuard(importlib.abc.MetaPathFinder):
    """Resolve the top-level name ``kernels`` past this checkout's root.

    The checkout's ``kernels/`` folder is the source of ``fabric_align.kernels``. When the root is on ``sys.path``
    (``python -m fabric_align.kto`` run from it), a plain ``import kernels`` would find that folder before Hugging
    Face's ``kernels`` package, which transformers imports (and depends on): the tokenizer load then fails with
    "cannot import name ... from 'kernels'". With Hugging Face's package installed, this finder returns it; without
    it, the search goes on as usual (and the folder's ``__init__`` tells transformers' probe that it is absent).
    """

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "kernels":
            return None
        elsewhere = [p for p in sys.path if _resolved(p) != _CHECKOUT]
        return importlib.machinery.PathFinder.find_spec(fullname, elsewhere)


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except (OSError, RuntimeError):
        return None


if (_CHECKOUT / "kernels" / "__init__.py").is_file() and not any(
    isinstance(f, _KernelsNameGuard) for f in sys.meta_path
):
    sys.meta_path.insert(0, _KernelsNameGuard())
