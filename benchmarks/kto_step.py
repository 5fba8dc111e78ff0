"""KTO training step: fabric-align against TRL's ``KTOTrainer`` on the same model, data, batch and precision.

Each framework runs in its own fresh Python process (one after the other, never at the same time) through its real
entry point: fabric-align through ``fabric_align.kto.cli`` (the CLI of ``python fabric_align/kto.py``, CSV logger),
TRL through ``KTOTrainer(...).train()``. The parent process builds the model once (random weights from a config,
saved with ``save_pretrained`` next to the repo's byte-level tokenizer), writes one synthetic KTO data file, launches
the workers and prints one table, so the ratios come from one run.

Same for every framework: the weights (loaded from the same directory), the data rows and the order in which
optimizer steps visit them (TRL reads the rows in the order fabric-align's seeded plan visits them, so step s
trains on the same examples in both), global and micro batch (gradient accumulation), maximum length, precision,
attention implementation (sdpa), torch AdamW with the same lr, betas, weight decay 0 and clipping at 1.0 (each
framework's own choice of implementation: TRL's default ``adamw_torch_fused``; fabric-align torch's fused kernel
too, on CUDA and CPU), KTO loss ``kto`` with beta 0.1. Activation checkpointing: fabric-align its default,
``selective`` (it keeps the matmul and attention outputs and recomputes the elementwise rest of each layer, which
changes no number), TRL none (it has no selective mode: its choice is none or whole layers);
``--activation-checkpointing`` recomputes whole layers in both (TRL's own default would turn that on). The
``fabric-align-keep-all`` row is fabric-align keeping every activation, to show what selective checkpointing
saves; the ``fabric-align-keep-softmax`` row is fabric-align with ``model.keep_softmax_mib=1024`` (the lm_head's
backward reuses the forward's softmax instead of recomputing the logits: speed for memory). Everything else is each
framework's default: in particular TRL's fused LM head, which on devices without Triton scores every position
(prompt and padding included), and fabric-align's, which scores completion tokens only.

What is measured, identically for every framework:

- tokens/s: non-padding tokens (prompt + completion, special tokens included) of the training examples of optimizer
  steps 2..N, divided by the wall time from the end of step 1 to the end of step N. Nothing else is counted: the KL
  sequences and reference forwards are work each framework does per step, not throughput. Step ends are taken
  where the framework reports a finished step (fabric-align: its per-step metric logging call, after the
  optimizer step; TRL: ``TrainerCallback.on_step_end``), with a device sync on CUDA.
- peak memory: CPU: the process's resident-set high-water mark (``VmHWM``) at the end of step N, minus the resident
  set right after imports (before any model is built), since the libraries each framework imports differ; the raw
  high-water mark is printed too. CUDA: ``torch.cuda.max_memory_allocated()`` at the end of step N.
- tokens per CPU-second (CPU only): the same tokens divided by the process's CPU time (all threads) over the same
  window; less sensitive to other jobs on a shared machine, best read with ``--threads 1`` (no spinning threads).
- time to first step: wall time from calling the framework's entry (imports done) to the end of optimizer step 1:
  model loading, tokenization, the reference pass where there is one, and step 1 itself. Time to last step: the
  same to the end of step N (the whole run but the final export).

Every framework runs ``--rounds`` times (default 2), in alternating order; the table shows the median of each
figure over the rounds, the per-round tokens/s, and the ratios fabric-align / framework. Each run's step times and
the 1-minute load average before and after it are printed, since other jobs on the machine distort timings.

fabric-align computes the reference log-probs of every example and every KL pair once, before training (and keeps
no reference model); TRL by default keeps a reference model and runs it on every micro-batch (``trl`` row);
``trl-precompute`` is TRL with ``precompute_ref_log_probs=True``, which, like fabric-align, scores the whole data
set with the reference first and keeps no reference model.

    python benchmarks/kto_step.py                                  # CPU: llama-small (44.6M), fp32, 4 steps x 2 rounds
    python benchmarks/kto_step.py --threads 1                      # the same with one torch thread per process
    python benchmarks/kto_step.py --device cuda --config qwen0.5b  # GPU: Qwen2.5-0.5B shapes, bf16, 12 steps
    python benchmarks/kto_step.py --frameworks fabric-align trl --rounds 1 --json results.json
    python benchmarks/kto_step.py --min-length 0.125               # lengths spread as in real data (1/8 to 1)

The data set has ``steps * global_batch`` examples, so the reference pass scores exactly the data the timed run
trains on (2 * steps * global_batch sequences).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "fabric_align" / "assets" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
KEEP_ALL = "fabric-align-keep-all"  # fabric-align with model.activation_checkpointing=false
KEEP_SOFTMAX = "fabric-align-keep-softmax"  # fabric-align with model.keep_softmax_mib=KEEP_SOFTMAX_MIB
KEEP_SOFTMAX_MIB = 1024
FRAMEWORKS = ("fabric-align", KEEP_ALL, KEEP_SOFTMAX, "trl", "trl-precompute")

# Random-weight models built locally (the hub is not needed). Token ids stay below 264 (the byte-level tokenizer);
# the vocabulary is as large as the config says, so the lm_head does the full-size work.
CONFIGS: dict[str, dict[str, Any]] = {
    # Llama-style, 44.6M parameters (32.8M of them in the untied embedding and lm_head).
    "llama-small": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # llama-small's widths, twice as deep and without grouped-query attention (8 KV heads): 58.5M parameters
    # (32.8M of them in the untied embedding and lm_head).
    "llama-58m": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # Qwen2.5-0.5B's shapes (494M parameters, tied embeddings).
    "qwen0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
}


# ------------------------------------------------------------------------------------------------ measurements
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: ru_maxrss (KiB on Linux)


def rss_mib() -> float:
    return _proc_status_kib("VmRSS") / 1024


def hwm_mib() -> float:
    return _proc_status_kib("VmHWM") / 1024


class StepClock:
    """End-of-step timestamps, the tokens each step trained on, and the memory high-water mark at the last step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # CPU seconds of this process (all threads)
        self.tokens: list[int] = []
        self.peak_mib = 0.0

    def step_end(self, tokens: int) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.tokens.append(int(tokens))
        if self.device == "cuda":
            import torch

            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mib = hwm_mib()

    def summary(self, t_entry: float) -> dict[str, Any]:
        if len(self.ends) < 2:
            raise RuntimeError(f"need at least 2 steps to time steps 2..N, got {len(self.ends)}")
        train_s = self.ends[-1] - self.ends[0]
        cpu_s = self.cpu_ends[-1] - self.cpu_ends[0]
        timed_tokens = sum(self.tokens[1:])
        return {
            "steps": len(self.ends),
            "time_to_first_step_s": self.ends[0] - t_entry,
            "time_to_last_step_s": self.ends[-1] - t_entry,
            "timed_steps": len(self.ends) - 1,
            "timed_tokens": timed_tokens,
            "train_s": train_s,
            "tokens_per_s": timed_tokens / train_s,
            "cpu_s": cpu_s,
            "tokens_per_cpu_s": timed_tokens / cpu_s,
            "step_s": [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)],
            "tokens_per_step": self.tokens,
        }


# ---------------------------------------------------------------------------------------------------- workers
def _timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    return wrapper


def checkpointing_for(name: str, whole_layers: bool) -> str:
    """``model.activation_checkpointing`` for a framework's run (TRL reads "true" as its gradient checkpointing)."""
    return "true" if whole_layers else "false" if name == KEEP_ALL or name.startswith("trl") else "selective"


def keep_softmax_for(name: str) -> int:
    """``model.keep_softmax_mib`` for a framework's run."""
    return KEEP_SOFTMAX_MIB if name == KEEP_SOFTMAX else 0


def checkpointing_setting(whole_layers: bool) -> str:
    return "whole layers in every framework" if whole_layers else "fabric-align selective, keep-all and TRL none"


def fabric_align_flags(cfg: dict[str, Any]) -> list[str]:
    """The flags both benchmarks give fabric-align's trainers: the model, data, optimizer and run settings that TRL
    gets through ``trl_train``; each benchmark adds its method's own."""
    return [
        f"--model.name_or_path={cfg['model_dir']}",
        "--model.attn_implementation=sdpa",
        f"--model.activation_checkpointing={cfg['activation_checkpointing']}",
        f"--model.keep_softmax_mib={cfg['keep_softmax_mib']}",
        f"--data.train_path={cfg['data']}",
        "--data.val_path=null",
        f"--data.max_length={cfg['seq_len']}",
        f"--train.global_batch_size={cfg['global_batch']}",
        f"--train.micro_batch_size={cfg['micro_batch']}",
        f"--train.lr={cfg['lr']}",
        "--train.warmup_steps=0",
        "--train.weight_decay=0.0",
        "--train.betas=[0.9, 0.95]",
        "--train.optimizer=adamw",
        "--train.max_norm=1.0",
        "--train.eval_interval=1000000",
        "--train.save_interval=null",
        "--train.log_interval=1",
        "--logger.backend=csv",
        f"--out_dir={cfg['out_dir']}",
        f"--seed={cfg['seed']}",
        "--devices=1",
        "--strategy=auto",
        f"--precision={'bf16-true' if cfg['bf16'] else '32-true'}",
    ]


def worker_fabric_align(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    import fabric_align.kto as kto
    from fabric_align import loggers
    from fabric_align.data import StepPlan

    baseline = rss_mib()
    clock = StepClock(cfg["device"])
    captured: dict[str, Any] = {}
    ref_seconds: list[float] = []

    # Instrumentation only: record step ends at the per-step logging call, keep a handle on the tokenized training
    # data (to count each step's tokens) and time the reference pass. The training code path is unchanged.
    original_log = loggers.MetricLogger.log
    original_load = kto.load_split

    def log(self: Any, metrics: dict[str, Any], step: int) -> None:
        if "train/step" in metrics:
            step_index = int(metrics["train/step"]) - 1
            plan = StepPlan(len(captured["train"]), cfg["global_batch"], cfg["seed"])
            sequences = captured["train"].sequences
            clock.step_end(sum(len(sequences[i][0]) for i in plan.global_indices(step_index)))
        original_log(self, metrics, step)

    def load_split(*args: Any, **kwargs: Any) -> Any:
        data = original_load(*args, **kwargs)
        captured.setdefault("train", data)
        return data

    loggers.MetricLogger.log = log
    kto.load_split = load_split
    kto.score_sequences = _timed(kto.score_sequences, ref_seconds)

    out_dir = Path(cfg["out_dir"])
    argv = [
        *fabric_align_flags(cfg),
        f"--train.max_steps={cfg['steps']}",
        "--kto.beta=0.1",
        "--kto.loss_type=kto",
    ]
    t_entry = time.perf_counter()
    kto.cli(argv)
    result = clock.summary(t_entry)
    result.update(baseline_mib=baseline, peak_mib=clock.peak_mib, ref_pass_s=sum(ref_seconds) or None)
    result.update(own_tokens_per_sec(out_dir))
    result["threads"] = torch.get_num_threads()
    return result


def own_tokens_per_sec(out_dir: Path) -> dict[str, float | None]:
    """fabric-align's own metric (attention-mask tokens / step time, per step), mean over steps 2..N, from its CSV
    log: a cross-check of the benchmark's timing ({} when there is no log)."""
    csv_path = out_dir / "logs" / "metrics.csv"
    if not csv_path.is_file():
        return {}
    import csv

    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tokens_per_sec")]
    own = [float(r["train/tokens_per_sec"]) for r in rows[1:]]
    return {"own_tokens_per_sec_mean": sum(own) / len(own) if own else None}


def trainer_step_timer(holder: dict[str, Any], clock: StepClock) -> Any:
    """A TrainerCallback that reports each finished optimizer step and its tokens to ``clock``: TRL's trainers count
    the attention-mask tokens of every training micro-batch in ``_total_train_tokens`` (``holder["trainer"]``)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seen = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            total = holder["trainer"]._total_train_tokens
            clock.step_end(total - self.seen)
            self.seen = total

    return StepTimer()


def trl_train(cfg: dict[str, Any], trainer_cls: Any, config_cls: Any, **method_args: Any) -> tuple[dict[str, Any], Any]:
    """Train with a TRL trainer (``KTOTrainer``, ``DPOTrainer``) on ``cfg["data_trl"]`` with the settings fabric-align
    gets through ``fabric_align_flags``, plus the method's own ``method_args``; its result and the trainer."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    baseline = rss_mib()
    clock = StepClock(cfg["device"])
    ref_seconds: list[float] = []
    trainer_cls._precompute_ref_logps = _timed(trainer_cls._precompute_ref_logps, ref_seconds)
    holder: dict[str, Any] = {}

    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    t_entry = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    with open(cfg["data_trl"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list(rows)
    args = config_cls(
        output_dir=cfg["out_dir"],
        per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=cfg["global_batch"] // cfg["micro_batch"],
        max_steps=cfg["steps"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        # TRL's default optimizer, torch AdamW (fused implementation, on CPU too); fabric-align uses torch's fused
        # AdamW as well (CUDA and CPU). Same algorithm and hyperparameters.
        optim="adamw_torch_fused",
        bf16=cfg["bf16"],
        gradient_checkpointing=cfg["activation_checkpointing"] == "true",
        max_length=cfg["seq_len"],
        beta=0.1,
        model_init_kwargs={"dtype": dtype, "attn_implementation": "sdpa"},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg["seed"],
        use_cpu=cfg["device"] == "cpu",
        **method_args,
    )
    trainer = trainer_cls(model=cfg["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer)
    holder["trainer"] = trainer
    trainer.add_callback(trainer_step_timer(holder, clock))
    trainer.train()
    result = clock.summary(t_entry)
    result.update(
        baseline_mib=baseline,
        peak_mib=clock.peak_mib,
        ref_pass_s=sum(ref_seconds) or None,
        trl_version=trl.__version__,
        threads=torch.get_num_threads(),
        ref_model_kept=trainer.ref_model is not None,
    )
    return result, trainer


def worker_trl(cfg: dict[str, Any], *, precompute: bool) -> dict[str, Any]:
    from trl import KTOConfig, KTOTrainer

    result, _ = trl_train(cfg, KTOTrainer, KTOConfig, loss_type="kto", precompute_ref_log_probs=precompute)
    return result


def run_worker(name: str, cfg: dict[str, Any]) -> None:
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(cfg["threads"])
    if name.startswith("fabric-align"):
        result = worker_fabric_align(cfg)
    else:
        result = worker_trl(cfg, precompute=name == "trl-precompute")
    result["framework"] = name
    result["raw_hwm_mib"] = hwm_mib()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------- parent
def build_model(config_name: str, out: Path, *, bf16: bool, seed: int) -> int:
    """Random weights from the config, saved with the repo's byte-level tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(CONFIGS[config_name])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, bos_token_id=256, eos_token_id=257, pad_token_id=258, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return sum(p.numel() for p in model.parameters())


def make_rows(n: int, seq_len: int, seed: int, min_length: float = 0.75) -> list[dict[str, Any]]:
    """KTO rows of plain ASCII text (one token per character with the byte-level tokenizer): total length
    (BOS + prompt + completion + EOS) uniform in [min_length, 1] x seq_len, prompt uniform in [1/8, 1/2] x seq_len
    (below the default ``min_length``: in [1/8, 1/2] x the total), labels alternating (balanced)."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + "      "

    def text(length: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(length))

    rows = []
    for i in range(n):
        total = rng.randint(int(min_length * seq_len), seq_len)
        if min_length >= 0.75:  # the draw of every recorded result, kept so that they stay reproducible
            prompt = rng.randint(seq_len // 8, seq_len // 2)
        else:
            prompt = rng.randint(max(2, total // 8), total // 2)
        rows.append({"prompt": text(prompt - 1), "completion": text(total - prompt - 1), "label": i % 2 == 0})
    return rows


def visit_order(n: int, global_batch: int, steps: int, seed: int) -> list[int]:
    """The example indices in the order fabric-align's StepPlan trains on them."""
    from fabric_align.data import StepPlan

    plan = StepPlan(n, global_batch, seed)
    return [i for step in range(steps) for i in plan.global_indices(step)]


def environment(device: str) -> dict[str, str]:
    import torch
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = "not installed"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "fabric_align", "kernels"], capture_output=True, text=True
        )
        info["commit"] = commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        family, model = fields.get("cpu family", "?"), fields.get("model", "?")
        return f"{fields.get('model name', '?')} (family {family}, model {model})"
    except OSError:
        return platform.processor() or "unknown"


def launch(name: str, cfg: dict[str, Any], log_path: Path, script: Path | None = None) -> dict[str, Any]:
    """Run one worker (``script --worker NAME``, this file by default) in a fresh process; its RESULT line."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false"
    )
    script = script or Path(__file__).resolve()
    cmd = [sys.executable, str(script), "--worker", name, "--worker-config", json.dumps(cfg)]
    t = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(REPO / "benchmarks"))
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text().splitlines()[-30:]
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode}); stderr tail:\n" + "\n".join(tail))
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_wall_s"] = wall
    return result


def run_rounds(
    frameworks: list[str],
    rounds: int,
    steps: int,
    work: Path,
    config_for: Callable[[str, int], dict[str, Any]],
    script: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every framework's worker once per round, one after another, in alternating order (reversed on odd rounds);
    ``config_for(name, round)`` gives a worker's config. Prints each run's figures and the load average around it."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in frameworks}
    for round_index in range(rounds):
        names = list(frameworks) if round_index % 2 == 0 else list(reversed(frameworks))
        for name in names:
            cfg = config_for(name, round_index)
            load_before = os.getloadavg()[0]
            result = launch(name, cfg, work / f"{name}-{round_index}.log", script)
            result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
            print(
                f"round {round_index} {name}: {result['tokens_per_s']:.0f} tokens/s, steps 2..{steps}: "
                + ", ".join(f"{s:.1f}" for s in result["step_s"])
                + f" s; tokens/step {result['tokens_per_step']}; first step at "
                f"{result['time_to_first_step_s']:.1f} s; {result['tokens_per_cpu_s']:.0f} tokens per CPU-s; "
                f"process {result['process_wall_s']:.0f} s; "
                f"1-min load average {load_before:.1f} -> {result['loadavg_1min'][1]:.1f}",
                flush=True,
            )
            runs[name].append(result)
    return runs


def require_trl(parser: argparse.ArgumentParser, frameworks: list[str]) -> None:
    """Stop with a usage error when a TRL framework is asked for and TRL is not installed."""
    if any(name.startswith("trl") for name in frameworks):
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            parser.error(
                "TRL is not installed (it is not a dependency of fabric-align): `pip install --no-deps trl` into "
                "this environment (then `pip check`), or pass --frameworks fabric-align"
            )


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every per-run figure (a framework's runs are its rounds)."""
    out: dict[str, Any] = {"framework": runs[0]["framework"], "rounds": len(runs)}
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_mib", "baseline_mib", "time_to_first_step_s", "ref_pass_s")
    for key in (*keys, "time_to_last_step_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return out


def table(results: list[dict[str, Any]], device: str) -> str:
    """The results as a Markdown table, with ratios against plain fabric-align (or the first fabric-align variant
    listed, when it is not)."""
    ours = [r for r in results if r["framework"].startswith("fabric-align")]
    base = next((r for r in ours if r["framework"] == "fabric-align"), ours[0] if ours else None)
    cpu = device == "cpu"

    def mem(r: dict[str, Any]) -> float:
        return r["peak_mib"] - r["baseline_mib"] if cpu else r["peak_mib"]

    header = ["framework", "tokens/s (median)", "tokens/s per round"]
    header += ["tokens per CPU-second"] if cpu else []
    header += (
        ["peak memory, MiB (HWM - after imports)", "raw HWM, MiB"] if cpu else ["peak memory, MiB (max allocated)"]
    )
    header += ["time to 1st step, s", "of which reference pass, s", "time to last step, s"]
    if base:
        ratio = f"{base['framework']} / this"
        header += [f"{ratio}: tokens/s"]
        header += [f"{ratio}: tokens per CPU-s"] if cpu else []
        header += [f"{ratio}: memory", f"{ratio}: 1st step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r["framework"], f"{r['tokens_per_s']:.0f}", ", ".join(f"{v:.0f}" for v in r["tokens_per_s_runs"])]
        row += [f"{r['tokens_per_cpu_s']:.0f}"] if cpu else []
        row += [f"{mem(r):.0f}", f"{r['peak_mib']:.0f}"] if cpu else [f"{mem(r):.0f}"]
        row += [f"{r['time_to_first_step_s']:.1f}", "-" if r["ref_pass_s"] is None else f"{r['ref_pass_s']:.1f}"]
        row += [f"{r['time_to_last_step_s']:.1f}"]
        if base:
            row += [f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}x"]
            row += [f"{base['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}x"] if cpu else []
            row += [
                f"{mem(base) / mem(r):.2f}x",
                f"{base['time_to_first_step_s'] / r['time_to_first_step_s']:.2f}x",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def benchmark_parser(doc: str, frameworks: tuple[str, ...], unit: str) -> argparse.ArgumentParser:
    """The command line shared by the step benchmarks (KTO here, SPIN in spin_step.py); ``unit``: what a batch holds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), default=None, help="default: llama-small on CPU, qwen0.5b on CUDA"
    )
    parser.add_argument("--frameworks", nargs="+", choices=frameworks, default=list(frameworks))
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default: 4 on CPU, 12 on CUDA)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs per framework, in alternating order; the table shows medians"
    )
    parser.add_argument("--global-batch", type=int, default=None, help=f"{unit} per step (default: 8 CPU, 32 CUDA)")
    parser.add_argument("--micro-batch", type=int, default=None, help=f"{unit} per forward (default: 4 CPU, 8 CUDA)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute whole layers in every framework"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory, removed after")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=frameworks, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = benchmark_parser(__doc__, FRAMEWORKS, unit="examples")
    parser.add_argument(
        "--min-length",
        type=float,
        default=0.75,
        help="shortest example, as a fraction of --seq-len (lengths are uniform up to it; default 0.75)",
    )
    args = parser.parse_args()

    if args.worker:
        run_worker(args.worker, json.loads(args.worker_config))
        return

    cuda = args.device == "cuda"
    config = args.config or ("qwen0.5b" if cuda else "llama-small")
    steps = args.steps or (12 if cuda else 4)
    global_batch = args.global_batch or (32 if cuda else 8)
    micro_batch = args.micro_batch or (8 if cuda else 4)
    if steps < 2 or global_batch % micro_batch or micro_batch < 2 or args.rounds < 1:
        parser.error("need --steps >= 2, --rounds >= 1, --micro-batch >= 2 (TRL's KL term) dividing --global-batch")
    require_trl(parser, args.frameworks)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kto-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = work / "model"
        n_params = build_model(config, model_dir, bf16=cuda, seed=args.seed)
        n = steps * global_batch
        if not 0.05 <= args.min_length <= 1:
            parser.error("--min-length must be in [0.05, 1]")
        rows = make_rows(n, args.seq_len, args.seed, args.min_length)
        data = work / "kto_train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        order = visit_order(n, global_batch, steps, args.seed)
        data_trl = work / "kto_train_in_visit_order.jsonl"
        data_trl.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))

        env = environment(args.device)
        env["torch_threads"] = str(args.threads) if args.threads else f"{env['torch_threads']} (default)"
        setting = (
            f"{config} ({n_params / 1e6:.1f}M parameters), {'bf16' if cuda else 'fp32'}, {args.device}, "
            f"global batch {global_batch}, micro-batch {micro_batch}, lengths {args.min_length:g}-1 x {args.seq_len}, "
            f"{steps} steps "
            f"(tokens/s over steps 2..{steps}), {n} examples, activation checkpointing "
            f"{checkpointing_setting(args.activation_checkpointing)}, {args.rounds} round(s), torch threads "
            f"{args.threads or 'default'}"
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
                "out_dir": str(work / f"out-{name}-{round_index}"),  # fresh: no reference cache, no checkpoints
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

        runs = run_rounds(args.frameworks, args.rounds, steps, work, config_for)
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
