"""SPIN training step: fabric-align against TRL's ``DPOTrainer`` (``precompute_ref_log_probs=True``) on the same
(real, generated) pairs, model, batch and precision.

SPIN's training phase is DPO's sigmoid loss with the ground-truth ("real") answer as the chosen one and the
opponent's ("generated") answer as the rejected one, the opponent being the reference. This benchmark times that
phase alone, on pairs given in the data (no generation): fabric-align through ``fabric_align.spin.cli`` (the CLI of
``python fabric_align/spin.py``) with rows in the SPIN authors' form ``{"real": [user, assistant], "generated":
[user, assistant]}`` and ``--spin.reuse_generated=true --spin.iterations=1 --spin.epochs_per_iteration=1``, so its
iteration 0 trains on exactly those pairs; TRL through ``DPOTrainer(...).train()`` on ``{"prompt", "chosen",
"rejected"}`` rows with the same texts (chosen = real, rejected = generated). Both score every pair with the
reference once before training and keep no reference model (fabric-align: its opponent scoring pass; TRL:
``precompute_ref_log_probs=True``).

Each framework runs in its own fresh Python process (one after the other, never at the same time). The parent builds
the model once (random weights from a config of ``kto_step.CONFIGS``, saved with ``save_pretrained`` next to the
repo's byte-level tokenizer and chat template), writes the data, launches the workers and prints one table. The
machinery is ``kto_step.py``'s, imported from it: workers, step clock, rounds, medians and the table.

Same for both: the weights (loaded from the same directory), the token ids (both render the same messages with the
same chat template; the benchmark's tokens per step agree), the pairs and the order in which optimizer steps visit
them (TRL reads the rows, with a sequential sampler, in the order fabric-align's seeded plan visits them, so step s
trains on the same pairs in both, cut into the same micro-batches), each micro-batch's forward (real and generated
answers of its pairs together, right-padded to the longest), global and micro batch (gradient accumulation),
maximum length, precision, attention implementation (sdpa), torch AdamW with the same lr and cosine schedule, betas
0.9/0.95, weight decay 0 and clipping at 1.0 (each framework's own implementation: TRL's default
``adamw_torch_fused``; fabric-align torch's fused kernel too, on CUDA and CPU), beta 0.1, sigmoid loss, activation
checkpointing as in ``kto_step.py`` (fabric-align its default, selective, which changes no number; TRL none;
``--activation-checkpointing``: whole layers in both; ``fabric-align-keep-all``: fabric-align keeping everything;
``fabric-align-keep-softmax``: fabric-align keeping the lm_head's softmax for the backward), no
validation, no checkpoint saving. The reference pass runs ``2 x micro-batch`` sequences per forward in both (TRL's
default ``precompute_ref_batch_size``, the micro-batch in pairs; fabric-align's ``train.eval_batch_size``, in
sequences, is set to match); fabric-align sorts them by length first, TRL does not. Everything else is each
framework's default: in particular TRL's fused LM head, which on devices without Triton scores every position and
adds entropy and mean-logit outputs, and fabric-align's, which scores answer tokens only.

What is measured (``kto_step.py``'s definitions):

- tokens/s: non-padding tokens (prompt + answer, special tokens included, for both sequences of a pair) of optimizer
  steps 2..N, divided by the wall time from the end of step 1 to the end of step N. Step ends: fabric-align's
  per-step metric logging call (the benchmark wraps the logger, the scoring pass and the iteration's pairs to read
  timestamps and counts; the training code path is unchanged), TRL's ``TrainerCallback.on_step_end`` (tokens from
  ``DPOTrainer._total_train_tokens``, its attention-mask count).
- peak memory: CPU: ``VmHWM`` at the end of step N minus ``VmRSS`` right after imports (raw high-water mark
  printed too); CUDA: ``torch.cuda.max_memory_allocated()``.
- tokens per CPU-second (CPU only), time to first step (entry to the end of step 1: loading, tokenization, the
  reference pass, step 1), of which the reference pass, and time to last step.

Every framework runs ``--rounds`` times (default 2), in alternating order; the table shows medians, per-round
tokens/s and the ratios fabric-align / TRL; each run's step times and the 1-minute load average are printed.

    python benchmarks/spin_step.py                                  # CPU: llama-small (44.6M), fp32, 4 steps x 2 rounds
    python benchmarks/spin_step.py --config llama-58m --threads 1   # 58.5M parameters, one torch thread per process
    python benchmarks/spin_step.py --device cuda --config qwen0.5b  # GPU: Qwen2.5-0.5B shapes, bf16, 12 steps
    python benchmarks/spin_step.py --rounds 1 --json results.json

Data: ``steps * global_batch`` synthetic pairs of plain ASCII text (one token per character), so the reference pass
scores exactly the pairs the timed run trains on (2 * steps * global_batch sequences): rendered prompt uniform in
[1/8, 1/2] x seq_len tokens, and the real and the generated sequence (prompt + answer + EOS) each of a total length
drawn independently and uniformly in [3/4, 1] x seq_len, so the two answers of a pair differ in length.
"""

from __future__ import annotations

import json
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kto_step import (  # noqa: E402
    KEEP_ALL,
    KEEP_SOFTMAX,
    TOKENIZER_DIR,
    StepClock,
    _timed,
    aggregate,
    benchmark_parser,
    build_model,
    checkpointing_for,
    checkpointing_setting,
    environment,
    fabric_align_flags,
    hwm_mib,
    keep_softmax_for,
    own_tokens_per_sec,
    require_trl,
    rss_mib,
    run_rounds,
    table,
    trl_train,
    visit_order,
)

FRAMEWORKS = ("fabric-align", KEEP_ALL, KEEP_SOFTMAX, "trl-precompute")


# ---------------------------------------------------------------------------------------------------- workers
def worker_fabric_align(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    import fabric_align.spin as spin
    from fabric_align import loggers
    from fabric_align.data import StepPlan

    baseline = rss_mib()
    clock = StepClock(cfg["device"])
    captured: dict[str, Any] = {}
    ref_seconds: list[float] = []

    # Instrumentation only: record step ends at the per-step logging call, keep a handle on iteration 0's training
    # pairs (to count each step's tokens) and time the reference (opponent scoring) pass. The training path is
    # unchanged.
    original_log = loggers.MetricLogger.log
    original_set_iteration = spin.SPIN.set_iteration

    def log(self: Any, metrics: dict[str, Any], step: int) -> None:
        if "train/step" in metrics:
            pairs = captured["pairs"]
            # Iteration t's plan is seeded with seed + 1000 t; one iteration here, t = 0.
            plan = StepPlan(len(pairs), cfg["global_batch"], cfg["seed"])
            indices = plan.global_indices(int(metrics["train/step"]) - 1)
            clock.step_end(sum(len(pairs.real[i][0]) + len(pairs.generated[i][0]) for i in indices))
        original_log(self, metrics, step)

    def set_iteration(self: Any, beta: float, train: Any, val: Any) -> None:
        captured["pairs"] = train
        original_set_iteration(self, beta, train, val)

    loggers.MetricLogger.log = log
    spin.SPIN.set_iteration = set_iteration
    spin.score_sequences = _timed(spin.score_sequences, ref_seconds)

    out_dir = Path(cfg["out_dir"])
    argv = [
        *fabric_align_flags(cfg),
        f"--train.eval_batch_size={2 * cfg['micro_batch']}",  # TRL's reference pass: micro-batch pairs per forward
        "--train.schedule=cosine",
        "--spin.reuse_generated=true",
        "--spin.iterations=1",
        "--spin.epochs_per_iteration=1",
        "--spin.beta=0.1",
    ]
    t_entry = time.perf_counter()
    spin.cli(argv)
    result = clock.summary(t_entry)
    result.update(baseline_mib=baseline, peak_mib=clock.peak_mib, ref_pass_s=sum(ref_seconds) or None)
    result.update(own_tokens_per_sec(out_dir))
    result["loss_per_step"] = logged_losses(out_dir / "logs" / "metrics.csv")
    result["threads"] = torch.get_num_threads()
    return result


def logged_losses(csv_path: Path) -> list[float]:
    """fabric-align's training loss of each step, from its CSV log."""
    import csv

    if not csv_path.is_file():
        return []
    with csv_path.open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def worker_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    result, trainer = trl_train(
        cfg,
        DPOTrainer,
        DPOConfig,
        # The rows are written in fabric-align's visit order: read them as they are, not reshuffled.
        train_sampling_strategy="sequential",
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,  # reference pass before training (batch: the micro-batch), no reference model
    )
    result["loss_per_step"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return result


def run_worker(name: str, cfg: dict[str, Any]) -> None:
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(cfg["threads"])
    result = worker_fabric_align(cfg) if name.startswith("fabric-align") else worker_trl(cfg)
    result["framework"] = name
    result["raw_hwm_mib"] = hwm_mib()
    print("RESULT " + json.dumps(result), flush=True)  # the line kto_step.launch reads


# ----------------------------------------------------------------------------------------------------- parent
def template_overheads() -> tuple[int, int]:
    """Tokens the chat template adds around a user message (prompt side, generation prompt included) and to an
    assistant answer (its EOS), as fabric-align renders them; ASCII text is one token per character."""
    from transformers import AutoTokenizer

    from fabric_align.data import ChatRenderer

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    user, answer = "abc de", "xyz w"
    encoded = renderer.encode([{"role": "user", "content": user}], answer)
    return len(encoded.prompt_ids) - len(user), len(encoded.completion_ids) - len(answer)


def make_pairs(n: int, seq_len: int, seed: int) -> tuple[list[dict[str, Any]], list[tuple[int, int, int]]]:
    """SPIN rows ``{"real": [user, assistant], "generated": [user, assistant]}`` of plain ASCII text, and the token
    lengths (prompt, real sequence, generated sequence) each row renders to: prompt uniform in [1/8, 1/2] x seq_len,
    each whole sequence uniform in [3/4, 1] x seq_len, independently."""
    prompt_extra, answer_extra = template_overheads()
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "      "

    def text(length: int) -> str:
        # Letters at both ends: no leading or trailing spaces for a template or tokenizer to treat specially.
        middle = "".join(rng.choice(alphabet) for _ in range(length - 2))
        return rng.choice(string.ascii_lowercase) + middle + rng.choice(string.ascii_lowercase)

    rows, lengths = [], []
    for _ in range(n):
        prompt = rng.randint(seq_len // 8, seq_len // 2)
        real_total = rng.randint(3 * seq_len // 4, seq_len)
        generated_total = rng.randint(3 * seq_len // 4, seq_len)
        user = {"role": "user", "content": text(prompt - prompt_extra)}
        real = {"role": "assistant", "content": text(real_total - prompt - answer_extra)}
        generated = {"role": "assistant", "content": text(generated_total - prompt - answer_extra)}
        rows.append({"real": [user, real], "generated": [user, generated]})
        lengths.append((prompt, real_total, generated_total))
    return rows, lengths


def trl_row(row: dict[str, Any]) -> dict[str, Any]:
    """The same pair in TRL's conversational preference form: chosen = the real answer, rejected = the generated."""
    return {"prompt": row["real"][:1], "chosen": row["real"][1:], "rejected": row["generated"][1:]}


def main() -> None:
    parser = benchmark_parser(__doc__, FRAMEWORKS, unit="pairs")
    args = parser.parse_args()

    if args.worker:
        run_worker(args.worker, json.loads(args.worker_config))
        return

    cuda = args.device == "cuda"
    config = args.config or ("qwen0.5b" if cuda else "llama-small")
    steps = args.steps or (12 if cuda else 4)
    global_batch = args.global_batch or (32 if cuda else 8)
    micro_batch = args.micro_batch or (8 if cuda else 4)
    if steps < 2 or global_batch % micro_batch or micro_batch < 1 or args.rounds < 1 or args.seq_len < 64:
        parser.error("need --steps >= 2, --rounds >= 1, --micro-batch dividing --global-batch, --seq-len >= 64")
    require_trl(parser, args.frameworks)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="spin-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = work / "model"
        n_params = build_model(config, model_dir, bf16=cuda, seed=args.seed)
        n = steps * global_batch
        rows, lengths = make_pairs(n, args.seq_len, args.seed)
        data = work / "spin_train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        order = visit_order(n, global_batch, steps, args.seed)
        data_trl = work / "dpo_train_in_visit_order.jsonl"
        data_trl.write_text("".join(json.dumps(trl_row(rows[i])) + "\n" for i in order))
        expected = [
            sum(lengths[i][1] + lengths[i][2] for i in order[s * global_batch : (s + 1) * global_batch])
            for s in range(steps)
        ]

        env = environment(args.device)
        env["torch_threads"] = str(args.threads) if args.threads else f"{env['torch_threads']} (default)"
        setting = (
            f"{config} ({n_params / 1e6:.1f}M parameters), {'bf16' if cuda else 'fp32'}, {args.device}, "
            f"global batch {global_batch} pairs, micro-batch {micro_batch} pairs, max length {args.seq_len}, "
            f"{steps} steps (tokens/s over steps 2..{steps}), {n} pairs (tokens per step, real + generated: "
            f"{expected}), activation checkpointing {checkpointing_setting(args.activation_checkpointing)}, "
            f"{args.rounds} round(s), torch threads {args.threads or 'default'}"
        )
        print(setting)
        print(json.dumps(env))

        def config_for(name: str, round_index: int) -> dict[str, Any]:
            return {
                "device": args.device,
                "bf16": cuda,
                "model_dir": str(model_dir),
                "data": str(data),
                "data_trl": str(data_trl),
                "out_dir": str(work / f"out-{name}-{round_index}"),  # fresh: no iteration data, no checkpoints
                "seq_len": args.seq_len,
                "global_batch": global_batch,
                "micro_batch": micro_batch,
                "steps": steps,
                "lr": args.lr,
                "seed": args.seed,
                "activation_checkpointing": checkpointing_for(name, args.activation_checkpointing),
                "keep_softmax_mib": keep_softmax_for(name),
                "threads": args.threads,
            }

        runs = run_rounds(args.frameworks, args.rounds, steps, work, config_for, Path(__file__).resolve())
        for name, framework_runs in runs.items():
            for run in framework_runs:
                if run["tokens_per_step"] != expected:  # both must train on exactly the data described
                    print(f"WARNING: {name} trained on {run['tokens_per_step']} tokens per step, expected {expected}")
        # Same pairs in the same order and the same update: the losses agree (to float rounding; step 1's is log 2).
        print(
            "loss per step, round 0: "
            + "; ".join(f"{name} " + ", ".join(f"{v:.5f}" for v in runs[name][0]["loss_per_step"]) for name in runs)
        )
        results = [aggregate(runs[name]) for name in args.frameworks]
        text = table(results, args.device)
        print(text)
        if args.json:
            args.json.write_text(
                json.dumps({"setting": setting, "env": env, "runs": runs, "results": results, "table": text}, indent=2)
            )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
