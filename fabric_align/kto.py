"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024) from unpaired desirable/undesirable feedback.

    fabric run fabric_align/kto.py [--config recipes/kto-tiny.yaml] [--group.field=value ...]
    python fabric_align/kto.py           # trains the embedded tiny model on the demo data

Per optimizer step: z0 = max(0, mean r(x_i, y_pi(i)) over the step's KL pairs, all ranks), no gradient; then
desirable L = lambda_D (1 - sigmoid(beta (r - z0))), undesirable L = lambda_U (1 - sigmoid(beta (z0 - r))), with
r = log pi(y|x) - log pi_ref(y|x) summed over completion tokens. Reference log-probs are computed once, cached.
"""

from __future__ import annotations

import fabric_align.startup  # noqa: F401  (first: Ctrl-C while the imports below load is one line too)

# isort: split
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fabric_align.args import DataArgs, KTOArgs, LoggerArgs, ModelArgs, TrainArgs
from fabric_align.checkpoints import load_plain, read_meta, verify_directory, write_sealed
from fabric_align.cli import configure_logging, run_program
from fabric_align.data import (
    ChatRenderer,
    DataError,
    Row,
    StepPlan,
    content_hash,
    deal_by_length,
    derangement,
    fit_length,
    pad_sequences,
    read_rows,
    report_fit,
    require_dict,
    require_field,
    require_messages,
    require_text,
    shown,
    source_of,
)
from fabric_align.errors import TrainingError
from fabric_align.kernels import kto_loss
from fabric_align.loop import Phase, fit, score_sequences
from fabric_align.metrics import MetricSpec
from fabric_align.modeling import PolicyLogprobs, model_fingerprint
from fabric_align.trainer import (
    Job,
    build_policy,
    check_resume_within,
    finish,
    open_out_dir,
    open_run,
    prepare_job,
    require_batches,
    require_resumed_data,
    validation_source,
)

log = logging.getLogger("fabric_align")

Sequence = tuple[list[int], int]  # (prompt + completion token ids, prompt length)


# ----------------------------------------------------------------------------------------------------------- data
def parse_row(row: Row) -> tuple[str | list, str | list, bool]:
    """(prompt, completion, desirable) from TRL's unpaired form (plain or conversational) or NeMo-Aligner's."""
    obj = require_dict(row)
    if ("response" in obj or "preference" in obj) and ("completion" in obj or "label" in obj):
        raise row.error(
            "preference" if "preference" in obj else "response",
            "the row mixes NeMo-Aligner's form (response, preference) with TRL's (completion, label): keep one",
        )
    if "response" in obj or "preference" in obj:  # NeMo-Aligner: prompt, response, preference
        prompt = require_text(row, require_field(row, obj, "prompt"), "prompt", allow_empty=True)
        completion = require_text(row, require_field(row, obj, "response"), "response", allow_empty=False)
        preference = require_field(row, obj, "preference")
        if preference not in ("chosen", "rejected"):
            raise row.error("preference", f'expected "chosen" or "rejected", got {shown(preference)}')
        return prompt, completion, preference == "chosen"
    prompt = require_field(row, obj, "prompt")
    completion = require_field(row, obj, "completion")
    label = require_field(row, obj, "label")
    if isinstance(prompt, str):
        prompt = require_text(row, prompt, "prompt", allow_empty=True)
        completion = require_text(row, completion, "completion", allow_empty=False)
    else:
        prompt = require_messages(row, prompt, "prompt", or_string=True)
        if isinstance(completion, str):
            completion = require_text(row, completion, "completion", allow_empty=False)
        else:
            completion = require_messages(row, completion, "completion", or_string=True)
            for i, message in enumerate(completion):
                if message["role"] != "assistant":
                    raise row.error(
                        f"completion[{i}].role",
                        f"is {message['role']!r}: a completion is the assistant's answer (earlier turns go in the "
                        "prompt)",
                    )
            if not any(m["content"].strip() for m in completion):
                raise row.error("completion", "is empty")
    if isinstance(label, bool):
        return prompt, completion, label
    if label in ("chosen", "rejected"):
        return prompt, completion, label == "chosen"
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        # CSV has no booleans: a column that also holds other text (or "True" written by pandas) reads as strings.
        return prompt, completion, label.strip().lower() == "true"
    raise row.error("label", f'expected true/false (or "chosen"/"rejected"), got {shown(label)}')


@dataclass
class KTOData:
    """Tokenized examples, their KL pairs (x_i, y_pi(i)) and, once computed, reference log-probs."""

    source: str
    sequences: list[Sequence]
    kl_sequences: list[Sequence]
    labels: torch.Tensor  # [n] bool
    rows_id: str = ""
    """A fingerprint of the kept rows' prompts, completions and labels, in order: what the examples are, whatever the
    tokenizer or chat template makes of them (a template may write today's date into every prompt)."""
    ref_logps: torch.Tensor | None = None
    ref_kl_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Each example's padded length: what micro-batches are grouped by."""
        return [len(ids) for ids, _ in self.sequences]

    @functools.cached_property
    def kl_lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.kl_sequences]


def load_split(
    path: str, split: str, renderer: ChatRenderer, max_length: int, seed: int, *, train: bool, kl_pairs: bool = True
) -> KTOData:
    """Read, check and tokenize a KTO split, with its KL pairs (``kl_pairs``: the loss has a KL term; without one a
    single row is a usable split, and the pairs are left empty)."""
    rows = read_rows(path, split)
    if not rows:
        raise DataError(f"{path}: no rows")
    source = source_of(rows, path, split)
    parsed = [parse_row(row) for row in rows]
    if train:
        require_both_labels(source, [label for _, _, label in parsed], "rows")
    encoded, kept, kept_rows = [], [], []
    cut = 0
    for row, (prompt, completion, label) in zip(rows, parsed, strict=True):
        if not isinstance(prompt, str):
            renderer.check_chat(row, "prompt")
        enc = renderer.encode(
            prompt, completion, row, answer_field="response" if "response" in row.value else "completion"
        )
        completion_ids = fit_length(enc.prompt_ids, enc.completion_ids, max_length)
        if completion_ids is not None:
            encoded.append((enc.prompt_ids, enc.completion_ids))
            kept.append(label)
            kept_rows.append((prompt, completion, label))
            cut += len(completion_ids) < len(enc.completion_ids)
    dropped = len(rows) - len(encoded)
    report_fit(source, len(rows), dropped, cut, max_length)
    if not encoded or (kl_pairs and len(encoded) < 2):
        why = f" (after dropping {dropped} whose prompt does not fit)" if dropped else ""
        raise DataError(
            f"{source}: {len(encoded)} usable row{'s' * (len(encoded) != 1)}{why}; "
            + ("the KL pairs need at least 2" if kl_pairs else "nothing to use")
        )
    if train and dropped:
        require_both_labels(source, kept, f"rows left after dropping {dropped} whose prompt does not fit")
    pairing = derangement(len(encoded), seed) if kl_pairs else []
    sequences, kl_sequences = [], []
    for i, (prompt_ids, completion_ids) in enumerate(encoded):
        sequences.append((prompt_ids + fit_length(prompt_ids, completion_ids, max_length), len(prompt_ids)))
        if kl_pairs:
            other = fit_length(prompt_ids, encoded[pairing[i]][1], max_length)
            kl_sequences.append((prompt_ids + other, len(prompt_ids)))
    labels = torch.tensor(kept, dtype=torch.bool)
    return KTOData(source, sequences, kl_sequences, labels, content_hash(kept_rows))


def require_both_labels(source: str, labels: list[bool], what: str) -> None:
    if all(labels) or not any(labels):
        kind = "desirable" if all(labels) else "undesirable"
        raise DataError(
            f"{source}, all {len(labels)} {what}, field 'label': every example is {kind}; KTO needs both "
            "desirable and undesirable examples"
        )


# KTO's recommended band for lambda_D n_D / (lambda_U n_U) (Ethayarajh et al., 2024, section 4.2).
WEIGHT_RATIO_BAND = (1.0, 4 / 3)


def label_counts(data: KTOData) -> tuple[int, int]:
    n_d = int(data.labels.sum())
    return n_d, len(data.labels) - n_d


def resolve_weights(data: KTOData, args: KTOArgs) -> KTOArgs:
    """``args`` with ``desirable_weight=auto`` replaced by the value closest to 1.0 that puts lambda_D n_D /
    (lambda_U n_U) into KTO's recommended band (1.0 when the counts are already balanced enough); logged."""
    if args.desirable_weight != "auto":
        return args
    n_d, n_u = label_counts(data)
    balanced = args.undesirable_weight * n_u / n_d  # lambda_D that makes the ratio exactly 1
    low, high = WEIGHT_RATIO_BAND
    weight = min(max(1.0, balanced * low), balanced * high)
    log.info(
        "kto.desirable_weight=auto: %.4g (%d desirable, %d undesirable, undesirable_weight=%g: ratio %.3f)",
        weight,
        n_d,
        n_u,
        args.undesirable_weight,
        weight * n_d / (args.undesirable_weight * n_u),
    )
    return dataclasses.replace(args, desirable_weight=weight)


def warn_weight_ratio(data: KTOData, args: KTOArgs) -> None:
    """KTO's paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]."""
    n_d, n_u = label_counts(data)
    ratio = args.desirable_weight * n_d / (args.undesirable_weight * n_u)
    low, high = WEIGHT_RATIO_BAND
    if not low <= ratio <= high:
        balanced = args.undesirable_weight * n_u / n_d
        log.warning(
            "kto: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = %.3f * %d / "
            "(%.3f * %d) = %.3f is outside [1, 4/3]; e.g. --kto.desirable_weight=%.3g (any value in "
            "[%.3g, %.3g] with undesirable_weight=%.3g), or --kto.desirable_weight=auto",
            args.desirable_weight,
            n_d,
            args.undesirable_weight,
            n_u,
            ratio,
            balanced * 7 / 6,
            balanced * low,
            balanced * high,
            args.undesirable_weight,
        )


# ---------------------------------------------------------------------------------------------------- algorithm
class KTO:
    """The KTO step for the shared loop: z0 per optimizer step, then the loss per micro-batch."""

    metric_spec = MetricSpec(
        means={
            "loss": "_examples",
            "kl": "_examples",  # the same z0 in every micro-batch; a padding-only part weighs nothing
            "rewards/chosen": "count/chosen",
            "logps/chosen": "count/chosen",
            "rewards/rejected": "count/rejected",
            "logps/rejected": "count/rejected",
        },
        sums=("count/chosen", "count/rejected", "tokens"),
        weights=("_examples",),
    )

    def __init__(
        self,
        fabric: Any,
        policy: PolicyLogprobs,
        args: KTOArgs,
        train: KTOData,
        val: KTOData | None,
        pad_id: int,
    ) -> None:
        self.fabric, self.policy, self.args = fabric, policy, args
        self.train, self.val, self.pad_id = train, val, pad_id
        if not args.uses_kl_term:  # no z0 is measured: no kl metric, rather than a 0 that reads as one
            means = {k: v for k, v in KTO.metric_spec.means.items() if k != "kl"}
            self.metric_spec = MetricSpec(means, KTO.metric_spec.sums, KTO.metric_spec.weights)

    def _logps(self, sequences: list[Sequence], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.fabric.to_device(pad_sequences([sequences[i] for i in indices], self.pad_id))
        token_logps = self.policy(batch["input_ids"], batch["attention_mask"], batch["targets"])
        return token_logps, batch["attention_mask"].sum()

    @torch.no_grad()
    def kl_sum(self, data: KTOData, micro_batches: list[list[int]]) -> torch.Tensor:
        """[sum of r(x_i, y_pi(i)) over this rank's KL pairs, their count]; -1 indices (padding) count for nothing."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.fabric.device)
        # A sum over all of this rank's pairs: regrouped by their own length (as many forwards, of the same size),
        # each forward pads less.
        if micro_batches:
            flat = [i for indices in micro_batches for i in indices]
            micro_batches = deal_by_length(flat, data.kl_lengths, 0, 1, len(micro_batches[0]))
        for indices in micro_batches:
            # Padding rows still run: every rank must join the same FSDP collectives.
            safe = [max(i, 0) for i in indices]
            token_logps, _ = self._logps(data.kl_sequences, safe)
            keep = torch.tensor([i >= 0 for i in indices], dtype=torch.float64, device=token_logps.device)
            r = token_logps.sum(-1).double() - data.ref_kl_logps[safe].to(token_logps.device).double()
            totals += torch.stack([(r * keep).sum(), keep.sum()])
        return totals

    def z0(self, data: KTOData, micro_batches: list[list[int]]) -> torch.Tensor:
        if not self.args.uses_kl_term:
            return torch.zeros((), device=self.fabric.device)
        totals = self.fabric.all_reduce(self.kl_sum(data, micro_batches), reduce_op="sum")
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).float()

    def prepare_step(self, micro_batches: list[list[int]]) -> torch.Tensor:
        return self.z0(self.train, micro_batches)

    def loss(self, data: KTOData, indices: list[int], z0: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict]:
        token_logps, tokens = self._logps(data.sequences, indices)
        device = token_logps.device
        loss, metrics = kto_loss(
            token_logps,
            data.ref_logps[indices].to(device),
            data.labels[indices].to(device),
            z0,
            beta=self.args.beta,
            desirable_weight=self.args.desirable_weight,
            undesirable_weight=self.args.undesirable_weight,
            loss_type=self.args.loss_type,
            normalizer=normalizer,
        )
        metrics = dict(metrics)
        del metrics["rewards/margins"]  # derived from the reduced means in finalize(), not summed over batches
        if not self.args.uses_kl_term:
            del metrics["kl"]
        metrics["loss"] = loss.detach() * normalizer / len(indices)  # per-example mean, weighted by _examples
        metrics["_examples"] = torch.tensor(float(len(indices)))
        metrics["tokens"] = tokens.float()
        return loss, metrics

    def micro_step(self, indices: list[int], z0: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict]:
        return self.loss(self.train, indices, z0, normalizer)

    def eval_lengths(self) -> list[int]:
        return self.val.lengths if self.val is not None else []

    def prepare_eval(self, shares: list[list[int]]) -> torch.Tensor:
        return self.z0(self.val, shares)  # over all of the validation set's KL pairs

    def eval_batch(self, indices: list[int], z0: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss(self.val, indices, z0, float(len(indices)))[1]

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:  # both labels were in the step
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


# ---------------------------------------------------------------------------------------------------------- entry
def setup(
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(
        global_batch_size=16, micro_batch_size=8, lr=3e-3, warmup_steps=5, epochs=4, eval_interval=10, save_interval=25
    ),
    kto: KTOArgs = KTOArgs(),
    logger: LoggerArgs = LoggerArgs(),
    out_dir: Path = Path("out/kto"),
    seed: int = 42,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str | None = None,
    strategy: Literal["auto", "fsdp", "ddp"] = "auto",
    resume: Literal["auto"] | Path | None = None,
) -> None:
    """Align a causal LM with KTO from unpaired desirable/undesirable feedback.

    The defaults train the embedded tiny model on the demo data; recipes in ``recipes/`` hold settings for real
    models.

    Args:
        model: Which model, LoRA/QLoRA, activation checkpointing.
        data: Training and validation data.
        train: Batch sizes, optimizer, schedule, intervals.
        kto: The KTO loss.
        logger: Metric logging (W&B, CSV).
        out_dir: Checkpoints (``step-NNNNNN/``), the export (``final/``), logs and the reference cache.
        seed: Seed for initialization, data order and KL pairing.
        devices: Devices (processes) per node.
        num_nodes: Number of nodes.
        precision: ``32-true``, ``bf16-true``, ``bf16-mixed`` or ``16-mixed`` (default: bf16-mixed on GPUs with
            bf16, else 32-true).
        strategy: ``fsdp`` (FSDP2, one unit per decoder layer), ``ddp`` or ``auto``.
        resume: ``auto`` continues from the newest complete checkpoint in out_dir; or a checkpoint directory.
    """
    configure_logging()
    # Everything that can be wrong with the input is checked before any process is launched or model loaded.
    job = prepare_job(
        model=model,
        data=data,
        train=train,
        logger=logger,
        out_dir=out_dir,
        seed=seed,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        strategy=strategy,
        resume=resume,
        method={"kto": kto},
    )
    renderer = ChatRenderer(job.tokenizer)
    options = {"kl_pairs": kto.uses_kl_term}
    train_data = load_split(data.train_path, data.train_split, renderer, data.max_length, seed, train=True, **options)
    val_path, val_data = validation_source(data), None
    if val_path:
        val_data = load_split(val_path, data.val_split, renderer, data.max_length, seed + 1, train=False, **options)
    require_batches(len(train_data), train_data.source, train)
    require_resumed_data(job, train_data.rows_id)
    check_resume_within(job, train.steps_over(len(train_data)), "train.max_steps or train.epochs")
    kto = resolve_weights(train_data, kto)
    job.config["kto"]["desirable_weight"] = kto.desirable_weight  # the value used, also under auto
    warn_weight_ratio(train_data, kto)
    main(job.launch.make_fabric(), job, kto, train_data, val_data)


def main(fabric: Any, job: Job, kto: KTOArgs, train_data: KTOData, val_data: KTOData | None) -> None:
    logger = open_out_dir(fabric, job)
    policy, optimizer = build_policy(fabric, job)
    fabric.print(f"{len(train_data)} training examples, {len(val_data) if val_data else 0} validation examples")
    # Reference log-probs before any update (and before loading a checkpoint): no reference model is kept.
    reference_logps(fabric, policy, job, kto, train_data, val_data)
    plan = StepPlan(len(train_data), job.train.global_batch_size, job.seed, train_data.lengths)
    run = open_run(fabric, job, logger, policy, optimizer, method="kto")
    recipe = KTO(fabric, policy, kto, train_data, val_data, job.tokenizer.pad_token_id)
    fit(run, recipe, plan, Phase(0, job.train.steps_over(len(train_data))))
    finish(run, recipe)


def reference_logps(
    fabric: Any, policy: PolicyLogprobs, job: Job, kto: KTOArgs, train: KTOData, val: KTOData | None
) -> None:
    """Fill ``ref_logps`` (and, when the loss uses the KL term, ``ref_kl_logps``) of both splits from the cache, or
    compute them in one no-grad pass. ``apo_zero_unpaired`` never reads the KL pairs: their half is skipped."""
    with_kl = kto.uses_kl_term
    splits = [train] + ([val] if val is not None else [])
    sequences = [s for d in splits for s in d.sequences + (d.kl_sequences if with_kl else [])]
    # The precision and strategy decide how the reference forward computes (FSDP2 gathers layers in bf16 under
    # bf16-mixed), so a cache made under other settings is not reused.
    # Rank 0 decides and reads for all: another node's copy of the model has its own inodes and times (so its own
    # key), and out_dir need not be shared; ranks that disagreed would not join the same reference pass.
    key, logps = None, None
    if fabric.is_global_zero:
        weights = model_fingerprint(job.model, job.seed, exact=True)
        key = content_hash(weights, job.launch.precision, job.launch.strategy, sequences)
        logps = read_reference_cache(reference_cache(job.out_dir, key), key, len(sequences))
    key, found = fabric.broadcast((key, logps is not None), src=0)
    cache = reference_cache(job.out_dir, key)
    if found:
        logps = fabric.broadcast(logps, src=0)
        fabric.print(f"reference log-probs from {cache}")
    else:
        logps = score_sequences(
            fabric,
            policy,
            sequences,
            pad_id=job.tokenizer.pad_token_id,
            batch_size=job.train.eval_micro_batch_size,
            desc="reference log-probs",
            reference=True,
        )
        if fabric.is_global_zero:

            def write(tmp: Path) -> dict[str, Any]:
                torch.save(logps, tmp / REFERENCE_FILE)
                return {"sequences": len(sequences), "key": key}

            write_sealed(cache, write)
        fabric.barrier()
    offset = 0
    for d in splits:
        n = len(d)
        d.ref_logps = logps[offset : offset + n]
        d.ref_kl_logps = logps[offset + n : offset + 2 * n] if with_kl else None
        offset += 2 * n if with_kl else n


REFERENCE_FILE = "logps.pt"


def reference_cache(out_dir: Path, key: str) -> Path:
    return out_dir / "cache" / f"kto-reference-{key}"


def read_reference_cache(path: Path, key: str, expected: int) -> torch.Tensor | None:
    """The cached reference log-probs, or None when there are none or the directory is damaged (then they are
    computed again and the directory replaced: the cache only ever holds what this run can recompute). Its
    ``meta.json`` must name ``key``: a directory renamed or copied from another run's cache is not trusted."""
    if not path.is_dir():
        return None
    problem = verify_directory(path)
    if problem is None and read_meta(path).get("key") != key:
        problem = "its meta.json names other weights, data or settings"
    if problem is None:
        try:
            logps = load_plain(path / REFERENCE_FILE)
        except TrainingError as err:  # holds more than a tensor
            problem = str(err)
        else:
            if isinstance(logps, torch.Tensor) and logps.shape == (expected,) and logps.dtype == torch.float32:
                return logps
            problem = f"it does not hold {expected} reference log-probs"
    log.warning("%s is unusable (%s): computing the reference log-probs again", path, problem)
    return None


def cli(args: list[str] | None = None) -> None:
    run_program(setup, args)


if __name__ == "__main__":
    cli()
