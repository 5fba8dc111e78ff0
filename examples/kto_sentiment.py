"""KTO on a real pretrained model, on a laptop CPU: SmolLM2-135M-Instruct learns to continue movie reviews positively.

    pip install -e ".[gguf,demo]"
    python examples/kto_sentiment.py                      # both arms: 92 min on 2 cores shared with other jobs
    python examples/kto_sentiment.py --arms vader --train-prefixes 320   # a shorter first look
    python examples/kto_sentiment.py                      # again: reuses the trained models, evaluates anew

The classic sentiment-control task in KTO's natural setting, binary feedback:

- **Prompts**: the first words of movie-review snippets from the VADER paper's ground truth (Hutto & Gilbert, 2014;
  10,605 snippets, each with the mean rating of 10 people), read from the ``vaderSentiment`` source archive on PyPI.
- **vader arm** (on-policy): the model samples continuations of training prefixes, the VADER analyzer labels each
  desirable (compound >= 0.05, VADER's "positive") or undesirable, and ``fabric_align/kto.py`` trains a LoRA adapter
  on them with ``recipes/kto-smollm2-lora.yaml``. One round is enough here; with ``--rounds N`` the merged result
  samples the next round's data and is its reference (a fresh KTO run from the current model, as SPIN iterates).
- **human arm** (off-policy, one round): the snippets themselves as completions of their own first words, labelled by
  the people's mean rating (desirable when above 0): no model samples, no VADER in training.
- **Evaluation** on held-out prefixes, the same random draws for every model: the share of positive continuations
  and the mean VADER compound, with 95% intervals; how far each model moved from the base (the held-out negative
  log-likelihood of the real reviews, per token, and a KL estimate, the mean of log pi(y) - log pi_base(y) over the
  model's own samples). Results go to ``OUT/results.json``, ``OUT/results.md`` and ``OUT/sentiment.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "kto-smollm2-lora.yaml"
VADER_SDIST = "vaderSentiment==3.3.2"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
POSITIVE = 0.05  # VADER's own threshold for a positive compound score
PREFIX_WORDS = 6


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class Snippet:
    text: str
    rating: float  # mean human rating in [-4, 4]

    @property
    def prefix(self) -> str:
        return " ".join(self.text.split()[:PREFIX_WORDS])

    @property
    def rest(self) -> str:
        return " " + " ".join(self.text.split()[PREFIX_WORDS:])


def read_snippets(cache: Path) -> list[Snippet]:
    """The VADER paper's movie-review snippets, from the vaderSentiment source archive (downloaded once)."""
    archive = next(cache.glob("vaderSentiment-*.tar.gz"), None)
    if archive is None:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER_SDIST]
        subprocess.run([*command, "-d", str(cache)], check=True, capture_output=True)
        archive = next(cache.glob("vaderSentiment-*.tar.gz"))
    with tarfile.open(archive) as outer:
        inner = outer.extractfile(next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")))
        with tarfile.open(fileobj=inner) as resources:
            raw = resources.extractfile(SNIPPETS).read().decode("utf-8")
    snippets = []
    for line in raw.splitlines():
        _, rating, text = line.rstrip("\r").split("\t", 2)
        text = " ".join(text.replace("''", '"').split())
        if len(text.split()) >= PREFIX_WORDS + 4:  # room for a continuation to judge
            snippets.append(Snippet(text, float(rating)))
    return snippets


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- the model
class Model:
    """A Hugging Face directory, loaded once for sampling and scoring."""

    def __init__(self, path: Path, ends: list[int] | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fabric_align.modeling import end_token_ids

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        # Every model stops where the base does (its generation config's end tokens): the same rule for all.
        self.ends = ends if ends is not None else end_token_ids(self.model, self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, prompts: list[str], keys: list[int], max_new_tokens: int) -> list[str]:
        """One continuation per prompt at temperature 1; ``keys`` fix the random draws, so two models given the same
        keys are compared on the same noise."""
        from fabric_align.generation import generate

        ids = generate(
            self.model,
            [self.encode(p) for p in prompts],
            keys,
            eos_id=self.ends,
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            batch_size=32,
            desc=f"sampling ({self.path.name})",
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    @torch.no_grad()
    def logps(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Sum of log-probs of each completion's tokens given its prompt (the trainer's own log-prob path)."""
        from fabric_align.data import pad_sequences
        from fabric_align.modeling import PolicyLogprobs

        policy = PolicyLogprobs(self.model).eval()
        pairs = [(self.encode(p), self.encode(c)) for p, c in zip(prompts, completions, strict=True)]
        out = []
        for start in range(0, len(pairs), 32):
            chunk = [(p + c, len(p)) for p, c in pairs[start : start + 32]]
            batch = pad_sequences(chunk, self.tokenizer.pad_token_id)
            out.append(policy(batch["input_ids"], batch["attention_mask"], batch["targets"]).sum(-1))
        return torch.cat(out)

    def token_count(self, texts: list[str]) -> int:
        return sum(len(self.encode(t)) for t in texts)


def vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound(analyzer: Any, texts: list[str]) -> list[float]:
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


# ----------------------------------------------------------------------------------------------------- training
def train(model_dir: Path, rows: list[dict], val_rows: list[dict], out: Path, threads: int) -> Path:
    """One KTO run (LoRA, merged on export) with the recipe, as a user would start it; returns the merged model."""
    merged = out / "final" / "merged"
    if (merged / "model.safetensors").is_file():
        return merged  # this round finished in an earlier call
    train_path = write_jsonl(out.with_name(out.name + "-train.jsonl"), rows)
    val_path = write_jsonl(out.with_name(out.name + "-val.jsonl"), val_rows)
    command = [
        sys.executable,
        str(REPO / "fabric_align" / "kto.py"),
        f"--config={RECIPE}",
        f"--model.name_or_path={model_dir}",
        f"--data.train_path={train_path}",
        f"--data.val_path={val_path}",
        f"--out_dir={out}",
        "--logger.backend=csv",
    ]
    if (out / "logs").is_dir():
        command.append("--resume=auto")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env=env)
    return merged


def whole_sentences(text: str) -> str:
    """A continuation up to its last sentence end, when it has one: the trainer closes every completion with EOS, which
    should follow a finished sentence, not one that max_new_tokens cut off."""
    end = max(text.rfind(mark) for mark in ".!?")
    return text[: end + 1] if end > 0 else text


def labelled_samples(model: Model, snippets: list[Snippet], keys: list[int], args: argparse.Namespace) -> list[dict]:
    analyzer = vader()
    prompts = [s.prefix for s in snippets]
    texts = [whole_sentences(t) for t in model.sample(prompts, keys, args.max_new_tokens)]
    scores = compound(analyzer, texts)
    return [
        {"prompt": p, "completion": t, "label": s >= POSITIVE, "vader": s}
        for p, t, s in zip(prompts, texts, scores, strict=True)
        if t.strip()  # an empty continuation (an immediate end token) says nothing about sentiment
    ]


def vader_arm(base: Path, train_set: list[Snippet], out: Path, args: argparse.Namespace) -> Path:
    """Rounds of: sample from the current model, label with VADER, train KTO from the current model."""
    current = base
    for r in range(args.rounds):
        done = out / f"vader-round-{r}" / "final" / "merged"
        if (done / "model.safetensors").is_file():  # this round finished in an earlier call
            current = done
            continue
        model = Model(current)
        prompts = [s for s in train_set for _ in range(args.samples_per_prefix)]
        keys = [1_000_000 * (r + 1) + i for i in range(len(prompts))]
        rows = labelled_samples(model, prompts, keys, args)
        cut = len(rows) * 9 // 10
        positive = sum(row["label"] for row in rows) / len(rows)
        print(f"vader round {r}: {len(rows)} samples, {positive:.3f} positive", flush=True)
        current = train(current, rows[:cut], rows[cut:], out / f"vader-round-{r}", args.threads)
    return current


def human_arm(base: Path, train_set: list[Snippet], out: Path, args: argparse.Namespace) -> Path:
    """The real snippets as completions of their own first words, labelled by people's mean rating."""
    rows = [
        {"prompt": s.prefix, "completion": s.rest, "label": s.rating > 0}
        for s in train_set
        if s.rating != 0  # no verdict
    ]
    cut = len(rows) * 9 // 10
    return train(base, rows[:cut], rows[cut:], out / "human", args.threads)


# --------------------------------------------------------------------------------------------------- evaluation
def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return center - half, center + half


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


def evaluate(
    path: Path, base: Model | None, held_out: list[Snippet], args: argparse.Namespace
) -> tuple[dict[str, Any], Model]:
    model = Model(path, ends=base.ends if base is not None else None)
    prompts = [s.prefix for s in held_out]
    keys = [7 + i for i in range(len(prompts))]  # the same draws for every model
    texts = model.sample(prompts, keys, args.max_new_tokens)
    scores = compound(vader(), texts)
    n = len(scores)
    positives = sum(s >= POSITIVE for s in scores)
    mean, low, high = mean_interval(scores)
    real = [s.rest for s in held_out]
    nll = -float(model.logps(prompts, real).sum()) / model.token_count(real)
    result = {
        "model": str(path),
        "samples": n,
        "positive_rate": positives / n,
        "positive_rate_ci": wilson(positives, n),
        "negative_rate": sum(s <= -POSITIVE for s in scores) / n,
        "mean_compound": mean,
        "mean_compound_ci": (low, high),
        "heldout_nll_per_token": nll,
        "examples": [{"prompt": prompts[i], "continuation": texts[i], "vader": scores[i]} for i in range(min(6, n))],
    }
    if base is not None:  # KL(model || base) estimated on the model's own samples
        ratio = model.logps(prompts, texts) - base.logps(prompts, texts)
        result["kl_to_base"] = float(ratio.mean())
        result["kl_to_base_se"] = float(ratio.std() / math.sqrt(n))
    result["scores"] = scores
    return result, model


def report(results: dict[str, dict[str, Any]], out: Path, seconds: float) -> None:
    lines = [
        "| model | positive rate (95% CI) | mean VADER compound (95% CI) | held-out NLL/token | KL to base (nats) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        low, high = r["positive_rate_ci"]
        clow, chigh = r["mean_compound_ci"]
        kl = f"{r['kl_to_base']:.2f} ± {1.96 * r['kl_to_base_se']:.2f}" if "kl_to_base" in r else "0"
        lines.append(
            f"| {name} | {r['positive_rate']:.3f} ({low:.3f}-{high:.3f}) | {r['mean_compound']:.3f} "
            f"({clow:.3f}-{chigh:.3f}) | {r['heldout_nll_per_token']:.3f} | {kl} |"
        )
    n = next(iter(results.values()))["samples"]
    lines.append(f"\n{n} held-out prefixes, one continuation per model (the same draws); {seconds / 60:.0f} min.")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table, flush=True)
    plot(results, out / "sentiment.png")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["#8c8c8c", "#3b7dd8", "#e08a2c", "#3aa655"][: len(names)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rates = [results[k]["positive_rate"] for k in names]
    errors = [
        [rate - results[k]["positive_rate_ci"][0] for k, rate in zip(names, rates, strict=True)],
        [results[k]["positive_rate_ci"][1] - rate for k, rate in zip(names, rates, strict=True)],
    ]
    left.bar(names, rates, yerr=errors, capsize=6, color=colors)
    left.set_ylabel("share of positive continuations")
    left.set_ylim(0, 1)
    left.set_title("VADER compound >= 0.05, 95% Wilson intervals")
    bins = [i / 10 for i in range(-10, 11)]
    for name, color in zip(names, colors, strict=True):
        right.hist(results[name]["scores"], bins=bins, histtype="step", linewidth=2, label=name, color=color)
    right.set_xlabel("VADER compound of the continuation")
    right.set_ylabel("continuations")
    right.legend()
    fig.suptitle("SmolLM2-135M-Instruct continuing held-out movie-review openings, before and after KTO")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/kto-sentiment"))
    parser.add_argument("--arms", default="vader,human", help="comma-separated: vader, human")
    parser.add_argument("--rounds", type=int, default=1, help="sample-label-train rounds of the vader arm")
    parser.add_argument("--train-prefixes", type=int, default=640)
    parser.add_argument("--samples-per-prefix", type=int, default=2)
    parser.add_argument("--eval-prefixes", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from fabric_align.models import fetch

    base = fetch("smollm2-135m-instruct")
    snippets = read_snippets(args.out / "cache")
    random.Random(args.seed).shuffle(snippets)
    held_out = snippets[: args.eval_prefixes]
    train_set = snippets[args.eval_prefixes : args.eval_prefixes + args.train_prefixes]
    human_set = snippets[args.eval_prefixes :][: args.train_prefixes * args.samples_per_prefix]

    arms = {"vader": vader_arm, "human": human_arm}
    aligned = {}
    for name in args.arms.split(","):
        source = human_set if name == "human" else train_set
        aligned[name] = arms[name](base, source, args.out, args)

    results, models = {}, {}
    results["base"], models["base"] = evaluate(base, None, held_out, args)
    for name, path in aligned.items():
        results[f"KTO, {name} labels"], _ = evaluate(path, models["base"], held_out, args)
    report(results, args.out, time.perf_counter() - start)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
