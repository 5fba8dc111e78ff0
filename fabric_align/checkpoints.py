"""Atomic training checkpoints, resume discovery and the final Hugging Face export.

A checkpoint is written to ``out_dir/.tmp-step-{n}`` and renamed to ``out_dir/step-{n:06d}`` only once every
rank has finished writing and ``meta.json`` is in place, so a crash mid-save never leaves a directory that
``resume=auto`` would pick: resume only considers ``step-NNNNNN`` directories holding ``meta.json``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

STEP_DIR = re.compile(r"^step-(\d{6})$")
META = "meta.json"


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir``, oldest first."""
    found = []
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / META).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_resume_path(out_dir: Path, resume: str | Path | None) -> Path | None:
    if resume is None:
        return None
    if str(resume) == "auto":
        found = checkpoint_dirs(out_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise FileNotFoundError(f"resume={path}: not a complete checkpoint directory (no {META})")
    return path


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
    """Save model, optimizer and counters (``state``) plus per-rank RNG states, atomically."""
    step = int(state["step"])
    final = out_dir / f"step-{step:06d}"
    tmp = out_dir / f".tmp-step-{step:06d}"
    if fabric.is_global_zero and tmp.exists():
        shutil.rmtree(tmp)  # our own leftovers from a save that crashed; never a complete checkpoint
    fabric.barrier()
    fabric.save(tmp / "state", state)
    # Each rank's RNG differs; the strategy's checkpoint keeps only rank 0's extra state.
    torch.save(rng_state(), tmp / f"rng-rank{fabric.global_rank}.pt")
    fabric.barrier()
    if fabric.is_global_zero:
        (tmp / META).write_text(json.dumps({**meta, "step": step, "world_size": fabric.world_size}, indent=2))
        publish(tmp, final)
    fabric.barrier()
    return final


def publish(tmp: Path, final: Path) -> None:
    """Move a completely written ``tmp`` directory to ``final``. An existing ``final`` (the same step saved again
    by a resumed run, a re-export) is swapped out first and removed only once the new one is in place."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old)


def load_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Restore ``state`` in place from ``path``; returns the checkpoint's meta."""
    remainder = fabric.load(path / "state", state)
    for key, value in remainder.items():
        state[key] = value
    meta = json.loads((path / META).read_text())
    rng_file = path / f"rng-rank{fabric.global_rank}.pt"
    if rng_file.is_file() and meta.get("world_size") == fabric.world_size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def full_state_dict(fabric: Fabric, module: nn.Module) -> dict[str, torch.Tensor]:
    """All parameters and buffers, unsharded, on the CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(hasattr(p, "full_tensor") for p in module.parameters()):  # FSDP2, also on a one-rank mesh
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)
    # Copies, also on CPU: the export merges LoRA into these tensors and must not touch the live weights.
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def export_hf(fabric: Fabric, policy: nn.Module, tokenizer: Any, out_dir: Path, *, merge_lora: bool) -> Path:
    """Write ``out_dir/final/`` in Hugging Face format: safetensors weights, config and tokenizer, or with LoRA the
    adapter (and, when asked, ``final/merged/`` with the adapter merged into the base)."""
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
            _export_lora(inner, state, tmp, merge=merge_lora, tokenizer=tokenizer)
        else:
            model = hf_model(inner)
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish(tmp, final)
    fabric.barrier()
    return final


def _export_lora(peft_model: Any, state: dict[str, torch.Tensor], target: Path, *, merge: bool, tokenizer: Any) -> None:
    from peft import get_peft_model_state_dict

    adapter_state = get_peft_model_state_dict(peft_model, state_dict=state)
    peft_model.save_pretrained(target, state_dict=adapter_state, safe_serialization=True)
    if not merge:
        return
    base = peft_model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_quantized", False):
        raise ValueError("merge_on_export needs an unquantized base model (QLoRA exports the adapter only)")
    # Merge into a fresh CPU copy so the training model is left untouched.
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(state.values())).dtype)
    clean = get_peft_model(clean, peft_model.peft_config["default"])
    # Same key names as the training model's peft wrapper; assign=True takes the tensors off the meta device.
    clean.load_state_dict(state, strict=True, assign=True)
    merged = clean.merge_and_unload()
    merged.save_pretrained(target / "merged", safe_serialization=True)
    tokenizer.save_pretrained(target / "merged")
