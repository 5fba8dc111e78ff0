"""SPIN on a real pretrained model, on a CPU: SmolLM2-135M-Instruct plays against itself on a dialogue SFT set.

    pip install -e ".[gguf]"
    python examples/spin_dialogue.py                 # 2 iterations with LoRA, ~45 min on 2 busy cores

The SFT data is the English part of ``chatterbot-corpus`` (BSD-3; PyPI), about 2,000 short question/answer
conversations on 20 topics, downloaded as a wheel and converted to ``messages`` rows (each conversation cut to end
on an answer). ``fabric_align/spin.py`` then runs ``recipes/spin-smollm2-lora.yaml``: each iteration the model
answers every prompt, learns to prefer the corpus's answers over its own, and becomes the next opponent. The script
reports, per iteration, the held-out negative log-likelihood of the ground-truth answers (per token), the reward
accuracy on held-out pairs, and sample generations, in ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "spin-smollm2-lora.yaml"
CORPUS = "chatterbot-corpus==1.3.3"


def read_conversations(cache: Path) -> list[list[str]]:
    """The English conversations of chatterbot-corpus (downloaded once), each a list of alternating turns."""
    import yaml

    wheel = next(cache.glob("chatterbot_corpus-*.whl"), None)
    if wheel is None:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", CORPUS, "-d", str(cache)]
        subprocess.run(command, check=True, capture_output=True)
        wheel = next(cache.glob("chatterbot_corpus-*.whl"))
    conversations = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if "/data/english/" in name and name.endswith(".yml"):
                document = yaml.safe_load(archive.read(name).decode("utf-8")) or {}
                for turns in document.get("conversations") or []:
                    turns = [str(t).strip() for t in turns if str(t).strip()]
                    if len(turns) >= 2:
                        conversations.append(turns[: len(turns) // 2 * 2])  # end on an answer
    return conversations


def to_row(turns: list[str]) -> dict[str, Any]:
    roles = ["user", "assistant"] * (len(turns) // 2)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def report(out: Path, iterations: int) -> str:
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    validation = [r for r in rows if r.get("val/nll")]
    lines = [
        "| after | step | held-out NLL/token (real answers) | held-out reward accuracy | held-out margin |",
        "|---|---|---|---|---|",
    ]
    for r in validation:
        step = int(float(r["step"]))
        lines.append(
            f"| step {step} | {step} | {float(r['val/nll']):.4f} | {float(r['val/rewards/accuracy']):.3f} | "
            f"{float(r['val/rewards/margins']):.3f} |"
        )
    lines.append("\nSample generations (held-out prompts), per iteration's opponent:\n")
    for t in range(iterations):
        samples = [json.loads(line) for line in (out / f"iter-{t}" / "generations.jsonl").read_text().splitlines()]
        held_out = [s for s in samples if s["split"] == "val"][:3]
        for s in held_out:
            question = s["prompt"].split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            lines.append(f"- iteration {t}: **{question}** real: {s['real']!r}; generated: {s['generated']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/spin-dialogue"))
    parser.add_argument("--train", type=int, default=128, help="training conversations")
    parser.add_argument("--val", type=int, default=32, help="held-out conversations")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args(argv)  # anything else goes to spin.py (e.g. --spin.iterations=3)

    from fabric_align.models import fetch

    model = fetch("smollm2-135m-instruct")
    conversations = read_conversations(args.out / "cache")
    random.Random(args.seed).shuffle(conversations)
    val = write_jsonl(args.out / "val.jsonl", [to_row(c) for c in conversations[: args.val]])
    train = write_jsonl(args.out / "train.jsonl", [to_row(c) for c in conversations[args.val : args.val + args.train]])
    run = args.out / "run"
    command = [
        sys.executable,
        str(REPO / "fabric_align" / "spin.py"),
        f"--config={RECIPE}",
        f"--model.name_or_path={model}",
        f"--data.train_path={train}",
        f"--data.val_path={val}",
        f"--out_dir={run}",
        "--logger.backend=csv",
        *(["--resume=auto"] if (run / "logs").is_dir() else []),
        *extra,
    ]
    print("$", " ".join(command[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline"}
    subprocess.run(command, check=True, env=env)
    iterations = len(sorted(run.glob("iter-*")))
    table = report(run, iterations)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
