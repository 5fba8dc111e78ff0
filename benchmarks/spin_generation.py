"""SPIN's generation phase: ``fabric_align.generation.generate`` against Hugging Face ``model.generate``.

Both decode the same prompts with the same model (random weights from a config), batch size, ``max_new_tokens``
and KV cache (``DynamicCache``), with left padding, in two modes: sampling at temperature 1 and top-p 1 (SPIN's
defaults; Hugging Face's default ``top_k=50`` is switched off so both sample from the full distribution) and
greedy. Prompts are batched the same way for both (sorted by length, as fabric-align does, then cut into batches).

Generated tokens/s = generated tokens (up to and including EOS; with random weights EOS almost never comes, so
nearly every answer is ``max_new_tokens`` long) / wall time of the whole call. Methods alternate within each
round; the table shows the median over rounds. Greedy outputs are compared token by token as a sanity check.

Wall time of the whole call includes the prefill (prompts of 32-128 tokens) as well as the decode steps. Small
decode steps are sensitive to other jobs on a shared CPU (threads waiting for each other); ``--threads 1`` gives
steadier numbers there.

    python benchmarks/spin_generation.py                          # CPU: llama-small, fp32, 32 prompts x 128 tokens
    python benchmarks/spin_generation.py --threads 1              # one torch thread
    python benchmarks/spin_generation.py --device cuda --config qwen0.5b --prompts 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kto_step import CONFIGS, environment  # noqa: E402

MODES = {"sample": {"temperature": 1.0, "top_p": 1.0}, "greedy": {"temperature": 0.0, "top_p": 1.0}}
BOS, EOS, PAD = 256, 257, 258


def build_model(config_name: str, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(CONFIGS[config_name])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)


def make_prompts(n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(256) for _ in range(rng.randint(min_len, max_len) - 1)] for _ in range(n)]


def fabric_align_generate(
    model: torch.nn.Module, prompts: list[list[int]], mode: dict[str, float], batch_size: int, max_new_tokens: int
) -> list[list[int]]:
    from fabric_align.generation import generate

    return generate(
        model,
        prompts,
        keys=list(range(len(prompts))),
        eos_id=EOS,
        pad_id=PAD,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=False,
        **mode,
    )


def hf_generate(
    model: torch.nn.Module, prompts: list[list[int]], mode: dict[str, float], batch_size: int, max_new_tokens: int
) -> list[list[int]]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the same batches as fabric-align
    results: list[list[int]] = [[] for _ in prompts]
    sampling = mode["temperature"] > 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=mode["temperature"] if sampling else None,
            top_p=mode["top_p"] if sampling else None,
            top_k=0 if sampling else None,
            eos_token_id=EOS,
            pad_token_id=PAD,
            use_cache=True,
            past_key_values=DynamicCache(),
        )
        for row, i in enumerate(batch):
            tokens = out[row, width:].tolist()
            results[i] = tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens
    return results


METHODS: dict[str, Callable[..., list[list[int]]]] = {"fabric-align": fabric_align_generate, "hf": hf_generate}


def timed(fn: Callable[[], list[list[int]]], device: str) -> tuple[float, list[list[int]]]:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), default=None, help="default: llama-small on CPU, qwen0.5b on CUDA"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["sample", "greedy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    config = args.config or ("qwen0.5b" if cuda else "llama-small")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(config, args.device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = make_prompts(args.prompts, args.min_prompt, args.max_prompt, args.seed)
    env = environment(args.device)
    env["torch_threads"] = str(torch.get_num_threads())
    setting = (
        f"{config} ({n_params / 1e6:.1f}M parameters), {str(dtype).removeprefix('torch.')}, {args.device}, "
        f"{args.prompts} prompts of {args.min_prompt}-{args.max_prompt} tokens, batch size {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, {args.rounds} rounds, torch threads {torch.get_num_threads()}"
    )
    print(setting)
    print(json.dumps(env))

    # Warm-up: one small batch per method and mode (first-call allocations, lazy imports).
    for mode in args.modes:
        for fn in METHODS.values():
            fn(model, prompts[:2], MODES[mode], 2, 4)

    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        tokens: dict[str, int] = {}
        outputs: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            names = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
            for name in names:
                fn = METHODS[name]
                seconds, out = timed(
                    lambda fn=fn, mode=mode: fn(model, prompts, MODES[mode], args.batch_size, args.max_new_tokens),
                    args.device,
                )
                times[name].append(seconds)
                tokens[name] = sum(len(o) for o in out)
                outputs[name] = out
                print(f"  {mode} round {r} {name}: {seconds:.2f} s, {tokens[name]} tokens", flush=True)
        row = {}
        for name in METHODS:
            median = statistics.median(times[name])
            row[name] = {
                "seconds": median,
                "tokens": tokens[name],
                "tokens_per_s": tokens[name] / median,
                "all": times[name],
            }
        if mode == "greedy":
            a, b = outputs["fabric-align"], outputs["hf"]
            same = sum(x == y for x, y in zip(a, b, strict=True))
            row["greedy_identical"] = f"{same}/{len(a)}"
        results[mode] = row

    lines = [
        "| mode | fabric-align tokens/s | HF generate tokens/s | speed-up | generated tokens (fabric-align / HF) |",
        "|---|---|---|---|---|",
    ]
    for mode, row in results.items():
        fa, hf = row["fabric-align"], row["hf"]
        lines.append(
            f"| {mode} | {fa['tokens_per_s']:.0f} | {hf['tokens_per_s']:.0f} | "
            f"{fa['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {fa['tokens']} / {hf['tokens']} |"
        )
    if "greedy" in results:
        lines.append(f"\ngreedy outputs identical (fabric-align vs HF): {results['greedy']['greedy_identical']}")
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"setting": setting, "env": env, "results": results, "table": table}, indent=2))


if __name__ == "__main__":
    main()
