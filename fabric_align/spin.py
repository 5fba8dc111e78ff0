"""SPIN: Self-Play Fine-Tuning (Chen et al., 2024) from SFT data alone.

    fabric run fabric_align/spin.py [--config recipes/spin-tiny.yaml] [--group.field=value ...]
    python fabric_align/spin.py          # two iterations on the embedded tiny model and the SFT demo data

Iteration t: the opponent (and reference) is the policy at the start of t. It answers every prompt; the real
(ground-truth) and generated answers are scored under it and saved to ``out_dir/iter-{t}/``. Then the policy
trains on loss = -log sigmoid(beta_t ((log pi(y_real) - ref(y_real)) - (log pi(y_gen) - ref(y_gen)))).
"""

from __future__ import annotations

import fabric_align.startup  # noqa: F401  (first: Ctrl-C while the imports below load is one line too)

# isort: split
import hashlib
import json
import logging
import zlib
from array import array
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fabric_align.args import DataArgs, LoggerArgs, ModelArgs, SPINArgs, TrainArgs
from fabric_align.checkpoints import META, file_sha256, load_plain, read_meta, verify_directory, write_sealed
from fabric_align.cli import configure_logging, run_program
from fabric_align.data import (
    ChatRenderer,
    DataError,
    Messages,
    Row,
    StepPlan,
    content_hash,
    fit_length,
    pad_sequences,
    read_rows,
    report_fit,
    require_dict,
    require_field,
    require_messages,
    require_text,
    source_of,
)
from fabric_align.errors import ConfigError, TrainingError
from fabric_align.generation import opponent_model, rollout
from fabric_align.kernels import spin_loss
from fabric_align.loop import Phase, Run, fit, log_validation, score_sequences
from fabric_align.metrics import MetricSpec
from fabric_align.modeling import PolicyLogprobs, end_token_ids
from fabric_align.trainer import (
    Job,
    build_policy,
    check_resume_within,
    finish,
    open_out_dir,
    open_run,
    prepare_job,
    require_batches,
    shaping_settings,
    validation_source,
)

log = logging.getLogger("fabric_align")

Sequence = tuple[list[int], int]  # (prompt + answer token ids, prompt length)
NEMO_ROLES = {"User": "user", "Assistant": "assistant", "System": "system", "human": "user", "gpt": "assistant"}


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class SFTRow:
    """A prompt (text or messages), its ground-truth answer and, when the row has one, a generated answer."""

    prompt: str | Messages
    answer: str
    generated: str | None = None


def answer_field_of(row: Row) -> str:
    """The field that holds a row's ground-truth answer, for errors about it."""
    keys = row.value.keys() if isinstance(row.value, dict) else ()
    return next((name for name in ("real", "messages", "conversations", "completion") if name in keys), "messages")


def marks_undesirable(value: Any) -> bool:
    """A KTO label or NeMo preference that says "undesirable", in any form KTO reads (a CSV holds text)."""
    if isinstance(value, str):
        return value.strip().lower() in ("false", "rejected")
    return value is False


def parse_row(row: Row, answer_turn: str = "last", *, with_generated: bool = False) -> SFTRow:
    """The prompt and ground-truth answer of a row: ``messages`` (the ``answer_turn`` assistant turn is the answer,
    what precedes it the prompt), plain ``prompt``/``completion``, NeMo-Aligner's ``system`` + ``conversations``, or
    the SPIN authors' ``real`` (messages) with an optional ``generated`` answer (messages or text)."""
    obj = require_dict(row)
    # Rows often carry a `prompt` column beside their conversation (ultrachat_200k, no_robots: prompt, prompt_id,
    # messages), and the SPIN authors' `real` form is read whatever else the row holds; but a `completion` beside a
    # conversation is a second ground truth, and which one to train toward would be a guess.
    forms = [name for name in ("messages", "conversations", "completion") if name in obj and "real" not in obj]
    if len(forms) > 1:
        raise row.error(
            forms[1], f"the row gives both {forms[0]!r} and {forms[1]!r}: keep one form of the conversation"
        )
    if "real" in obj:
        prompt, answer = split_turn(row, require_messages(row, obj["real"], "real"), "real", answer_turn)
        value = obj.get("generated") if with_generated else None  # read (and checked) only when it is used
        if value is None:
            return SFTRow(prompt, answer)
        if isinstance(value, str):
            return SFTRow(prompt, answer, require_text(row, value, "generated", allow_empty=True))
        messages = require_messages(row, value, "generated", or_string=True)
        generated_prompt, generated = split_turn(row, messages, "generated", answer_turn, allow_empty=True)
        if generated_prompt != prompt:
            raise row.error("generated", "answers another prompt than 'real' (the messages before the answer differ)")
        return SFTRow(prompt, answer, generated)
    if "messages" in obj:
        messages = require_messages(row, obj["messages"], "messages")
        return SFTRow(*split_turn(row, messages, "messages", answer_turn))
    if "conversations" in obj:
        messages = require_messages(
            row, obj["conversations"], "conversations", key_role="from", key_content="value", role_map=NEMO_ROLES
        )
        system = require_text(row, obj.get("system", ""), "system", allow_empty=True)
        if system.strip():
            prompt, answer = split_turn(row, messages, "conversations", answer_turn, content_key="value")
            return SFTRow([{"role": "system", "content": system}, *prompt], answer)
        return SFTRow(*split_turn(row, messages, "conversations", answer_turn, content_key="value"))
    if "prompt" not in obj and "completion" not in obj:
        raise row.error(
            "messages",
            "missing (expected 'messages', 'prompt'/'completion', 'conversations' or 'real'; the row has "
            f"{sorted(obj)})",
        )
    for field in ("label", "preference"):
        if field in obj and marks_undesirable(obj[field]):
            # KTO data: its undesirable completions are no ground truth to play against.
            raise row.error(field, "marks the completion undesirable; SPIN trains toward it as the ground truth")
    prompt_value = require_field(row, obj, "prompt")
    if not isinstance(prompt_value, list):
        prompt = require_text(row, prompt_value, "prompt", allow_empty=True)
        answer = require_text(row, require_field(row, obj, "completion"), "completion", allow_empty=False)
        return SFTRow(prompt, answer)
    # TRL's conversational form: messages before the answer, and the answer as one assistant message (or text).
    messages = require_messages(row, prompt_value, "prompt")
    if not any(m["role"] != "assistant" for m in messages):
        raise row.error("prompt", "no user (or system) message")
    value = require_field(row, obj, "completion")
    if isinstance(value, str):
        return SFTRow(messages, require_text(row, value, "completion", allow_empty=False))
    completion = require_messages(row, value, "completion", or_string=True)
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise row.error("completion", "expected the assistant's answer: one assistant message")
    if not completion[0]["content"].strip():
        raise row.error("completion[0].content", "is empty")
    return SFTRow(messages, completion[0]["content"])


def split_turn(
    row: Row,
    messages: Messages,
    field: str,
    answer_turn: str,
    *,
    content_key: str = "content",
    allow_empty: bool = False,
) -> tuple[Messages, str]:
    """(the messages before the answer, the answer) of a conversation: its last message, which must be the
    assistant's (``answer_turn=last``), or its first assistant message (``first``)."""
    if answer_turn == "first":
        index = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if index is None:
            raise row.error(field, "no assistant turn: a conversation needs an assistant answer")
    else:
        index = len(messages) - 1
        if messages[index]["role"] != "assistant":
            raise row.error(field, "no assistant turn: the last message must be the assistant's answer")
    if not any(m["role"] != "assistant" for m in messages[:index]):
        raise row.error(field, "no prompt: the assistant's answer must follow a user (or system) message")
    if not allow_empty and not messages[index]["content"].strip():
        raise row.error(f"{field}[{index}].{content_key}", "is empty")
    return messages[:index], messages[index]["content"]


@dataclass
class SFTData:
    """Prompts and their ground-truth answers as token ids (answers cut to fit ``max_length``, ending in EOS), and
    the rows' own generated answers when they are used (``spin.reuse_generated``)."""

    source: str
    prompts: list[list[int]]
    answers: list[list[int]]
    generated: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def real(self, i: int) -> Sequence:
        return self.prompts[i] + self.answers[i], len(self.prompts[i])

    def fingerprint(self) -> str:
        """A hash of the token ids: what the data is, whatever file it came from."""
        digest = hashlib.sha256()
        for i, (prompt, answer) in enumerate(zip(self.prompts, self.answers, strict=True)):
            digest.update(array("q", [len(prompt), len(answer), *prompt, *answer]).tobytes())
            if self.generated is not None:
                digest.update(array("q", [len(self.generated[i]), *self.generated[i]]).tobytes())
        return digest.hexdigest()[:16]


def load_split(
    path: str,
    split: str,
    renderer: ChatRenderer,
    max_length: int,
    *,
    answer_turn: str = "last",
    with_generated: bool = False,
) -> SFTData:
    """Read, check and tokenize an SFT split; ``with_generated``: also the rows' ``generated`` answers, which every
    row must then have."""
    rows = read_rows(path, split)
    if not rows:
        raise DataError(f"{path}: no rows")
    parsed = [parse_row(row, answer_turn, with_generated=with_generated) for row in rows]
    if with_generated:
        for row, item in zip(rows, parsed, strict=True):
            if item.generated is None:
                problem = "missing"
                if isinstance(row.value, dict) and "generated" in row.value:  # beside 'messages' or 'prompt'
                    problem = "read only beside 'real' (the SPIN authors' row form: 'real' messages, 'generated')"
                raise row.error("generated", f"{problem}: spin.reuse_generated needs every row's generated answer")
    prompts, answers, generated = [], [], []
    cut = 0
    for row, item in zip(rows, parsed, strict=True):
        if not isinstance(item.prompt, str):
            renderer.check_chat(row, "messages")
        enc = renderer.encode(item.prompt, item.answer, row, "messages", answer_field=answer_field_of(row))
        answer = fit_length(enc.prompt_ids, enc.completion_ids, max_length)
        if answer is None:
            continue
        cut += len(answer) < len(enc.completion_ids)
        prompts.append(enc.prompt_ids)
        answers.append(answer)
        if with_generated:
            ids = renderer.encode(item.prompt, item.generated or "", row, "generated", answer_field=None).completion_ids
            generated.append(fit_length(enc.prompt_ids, ids, max_length) or [])
    source = source_of(rows, path, split)
    report_fit(source, len(rows), len(rows) - len(prompts), cut, max_length, f"answer_turn={answer_turn}")
    if not prompts:
        raise DataError(f"{source}: no usable rows after dropping over-long prompts")
    return SFTData(source, prompts, answers, generated if with_generated else None)


@dataclass
class Pairs:
    """Training pairs of one iteration: a real and a generated answer to the same prompt, with reference
    (opponent) log-probs of both."""

    real: list[Sequence]
    generated: list[Sequence]
    ref_real: torch.Tensor
    ref_generated: torch.Tensor

    def __len__(self) -> int:
        return len(self.real)

    @property
    def lengths(self) -> list[int]:
        """What each pair pads to (its real and generated sequences share one batch): what micro-batches group by."""
        return [max(len(real), len(gen)) for (real, _), (gen, _) in zip(self.real, self.generated, strict=True)]


@dataclass
class IterationData:
    """What iteration t's opponent made: its answer to every prompt of each split, the reference log-probs of the
    real and generated answers under it, and with mix_previous the previous iteration's training answers rescored.
    ``id`` names it (the SHA-256 of its stored form): a checkpoint records the ids it trained on."""

    generated: dict[str, list[list[int]]]
    ref_real: dict[str, torch.Tensor]
    ref_generated: dict[str, torch.Tensor]
    previous: list[list[int]] | None = None
    ref_previous: torch.Tensor | None = None
    id: str = ""

    def to_plain(self) -> dict[str, Any]:
        """Lists and tensors only, loadable with ``weights_only=True`` (the ``pairs.pt`` layout)."""
        generated = dict(self.generated)
        ref: dict[str, dict[str, torch.Tensor]] = {
            name: {"real": self.ref_real[name], "generated": self.ref_generated[name]} for name in self.generated
        }
        if self.previous is not None:
            generated["previous"] = self.previous
            ref["previous"] = {"generated": self.ref_previous}
        return {"generated": generated, "ref": ref}

    @classmethod
    def from_plain(cls, plain: dict[str, Any], id: str) -> IterationData:
        generated = {k: v for k, v in plain["generated"].items() if k != "previous"}
        return cls(
            generated=generated,
            ref_real={name: plain["ref"][name]["real"] for name in generated},
            ref_generated={name: plain["ref"][name]["generated"] for name in generated},
            previous=plain["generated"].get("previous"),
            ref_previous=plain["ref"].get("previous", {}).get("generated"),
            id=id,
        )


class IterationStore:
    """``out_dir/iter-{t}/``: each iteration's data, ``generations.jsonl`` to read, ``pairs.pt`` to reuse and
    ``meta.json`` (its provenance and a manifest) last. A run reuses an iteration only when its provenance is what the
    run would make; a replaced directory is set aside, never deleted."""

    def __init__(
        self, out_dir: Path, tokenizer: Any, splits: dict[str, SFTData], end_ids: Collection[int] = ()
    ) -> None:
        self.out_dir, self.tokenizer, self.splits = out_dir, tokenizer, splits
        self.end_ids = set(end_ids) | {tokenizer.eos_token_id}  # what closes an answer (shown without it)

    def directory(self, t: int) -> Path:
        return self.out_dir / f"iter-{t}"

    def load(self, t: int) -> IterationData:
        """An iteration's data, read as plain tensors and lists (never code)."""
        directory = self.directory(t)
        return IterationData.from_plain(load_plain(directory / "pairs.pt"), read_meta(directory)["id"])

    def reusable(self, t: int, provenance: dict[str, Any], *, quiet: bool) -> IterationData | None:
        """Iteration t's stored data when it is intact and has this provenance; else None (and a warning why)."""
        directory = self.directory(t)
        if not (directory / META).is_file():
            return None
        why_not = verify_directory(directory) or provenance_mismatch(read_meta(directory), provenance)
        if why_not is None:
            return self.load(t)
        if not quiet:
            log.warning("iteration %d: not reusing %s: %s; generating again", t, directory, why_not)
        return None

    def problem_with(self, t: int, data_id: str, data: list[str]) -> str | None:
        """What keeps iteration t's stored data from being what a checkpoint trained on: it must be intact, of id
        ``data_id``, and of this run's SFT splits (``data``: their fingerprints). None when it is."""
        directory = self.directory(t)
        problem = verify_directory(directory)
        meta = read_meta(directory) if problem is None else {}
        if problem is None and meta.get("id") != data_id:
            problem = f"it holds other iteration data than the checkpoint trained on (id {data_id})"
        if problem is None and meta.get("data", data) != data:
            problem = "its answers belong to other SFT data than this run's (data.train_path or val_path changed)"
        return problem

    def check_required(self, t: int, data_id: str, data: list[str], why: str) -> None:
        """Iteration t's stored data is needed as the checkpoint left it, and cannot be made again (``why``)."""
        problem = self.problem_with(t, data_id, data)
        if problem is not None:
            raise TrainingError(f"{self.directory(t)}: {problem}; {why}")

    def previous_answers(self, t: int) -> list[list[int]]:
        """Iteration t - 1's generated training answers, for mix_previous."""
        problem = verify_directory(self.directory(t - 1))
        if problem is not None:
            raise TrainingError(f"spin.mix_previous needs iteration {t - 1}'s answers: {problem}")
        return self.load(t - 1).generated["train"]

    def save(self, t: int, data: IterationData, provenance: dict[str, Any], args: SPINArgs) -> None:
        def decode(ids: list[int]) -> str:
            # Without the closing end token, but with any other special token the answer holds: a role marker the
            # opponent generated (mid-answer, or last where max_new_tokens cut it) is trained on, so the file shows it.
            shown = ids[:-1] if ids and ids[-1] in self.end_ids else ids
            return self.tokenizer.decode(shown, skip_special_tokens=False)

        def write(tmp: Path) -> dict[str, Any]:
            with (tmp / "generations.jsonl").open("w", encoding="utf-8") as f:
                for name, split in self.splits.items():
                    for i in range(len(split)):
                        row = {
                            "split": name,
                            "index": i,
                            "prompt": self.tokenizer.decode(split.prompts[i]),
                            "real": decode(split.answers[i]),
                            "generated": decode(data.generated[name][i]),
                            "generated_tokens": len(data.generated[name][i]),
                            "ref_logp_real": float(data.ref_real[name][i]),
                            "ref_logp_generated": float(data.ref_generated[name][i]),
                        }
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            torch.save(data.to_plain(), tmp / "pairs.pt")
            lengths = [len(g) for g in data.generated["train"]]
            return {
                "iteration": t,
                "id": file_sha256(tmp / "pairs.pt"),
                **provenance,
                "examples": len(self.splits["train"]),
                "mean_generated_tokens": sum(lengths) / len(lengths),
                "args": vars(args),
            }

        write_sealed(self.directory(t), write, keep_replaced=True)


def iteration_provenance(
    args: SPINArgs, shaping: dict[str, Any], t: int, start: int, history: list[str]
) -> dict[str, Any]:
    """What decides iteration t's data: the policy that makes it (the step it stands at, the iteration data it
    trained on before, the run's settings and data that shaped it) and the generation settings."""
    generation = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "mix_previous": args.mix_previous,
        "reuse_generated": args.reuse_generated,
        "epochs_before": [args.epochs_at(i) for i in range(t)],
        "betas_before": [args.beta_at(i) for i in range(t)],
        "lrs_before": None if args.lr is None else [args.lr_at(i, 0.0) for i in range(t)],
    }
    return {
        "made_at_step": start,
        "history": list(history),
        "settings": content_hash(shaping, generation),
        "data": list(shaping["data"]),  # on its own too: a resume inside the iteration checks it
    }


def provenance_mismatch(meta: dict[str, Any], provenance: dict[str, Any]) -> str | None:
    if meta.get("made_at_step") != provenance["made_at_step"]:
        made, start = meta.get("made_at_step"), provenance["made_at_step"]
        return f"made at step {made}, this iteration starts at step {start}"
    if meta.get("history") != provenance["history"]:
        return "made by a policy that trained on other iteration data"
    if meta.get("settings") != provenance["settings"]:
        return "made under other settings (model, data, training or generation)"
    return None


# ------------------------------------------------------------------------------------------------- self-play phase
class SelfPlay:
    """The opponent's side of an iteration: it answers every prompt, and the real and generated answers are scored
    under it (the reference log-probs)."""

    def __init__(
        self,
        fabric: Any,
        policy: PolicyLogprobs,
        tokenizer: Any,
        args: SPINArgs,
        splits: dict[str, SFTData],
        max_length: int,
        batch_size: int,
        seed: int,
    ) -> None:
        self.fabric, self.policy, self.tokenizer, self.args = fabric, policy, tokenizer, args
        self.splits, self.max_length, self.batch_size, self.seed = splits, max_length, batch_size, seed

    def keys(self, iteration: int, split: str, n: int) -> list[int]:
        return [zlib.crc32(f"{self.seed}:{iteration}:{split}:{i}".encode()) for i in range(n)]

    def make(self, t: int, previous: list[list[int]] | None) -> IterationData:
        """Iteration t's data, from the policy as it stands (the opponent); ``previous``: last iteration's training
        answers to rescore (mix_previous)."""
        if t == 0 and self.args.reuse_generated:
            # The rows' own generated answers (the SPIN authors' iteration data), checked at load to be complete.
            generated = {name: split.generated for name, split in self.splits.items()}
            self.fabric.print("iteration 0: training on the data's own generated answers (spin.reuse_generated)")
        else:
            generated = self.sample(t)
        scores = self.score(t, generated, previous)
        data, offset = IterationData(generated, {}, {}), 0
        for name in generated:  # score() lays out the scores in this order
            n = len(generated[name])
            data.ref_real[name] = scores[offset : offset + n]
            data.ref_generated[name] = scores[offset + n : offset + 2 * n]
            offset += 2 * n
        if previous is not None:
            data.previous, data.ref_previous = previous, scores[offset : offset + len(previous)]
        return data

    def sample(self, t: int) -> dict[str, list[list[int]]]:
        # The opponent decodes in the training forward's compute precision (autocast under the mixed precisions, its
        # weights in the autocast dtype): fast, and any sampler is a valid opponent. The reference log-probs come
        # from the policy itself, the opponent at this point, so they are exactly what its training forward gives.
        device = self.fabric.device.type
        with self.fabric.autocast():
            compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        opponent = opponent_model(self.fabric, self.policy, compute_dtype)  # outside autocast: LoRA merges in fp32
        ends = end_token_ids(opponent, self.tokenizer)
        with self.fabric.autocast():
            generated = {
                name: rollout(
                    self.fabric,
                    opponent,
                    split.prompts,
                    self.keys(t, name, len(split)),
                    eos_id=ends,
                    pad_id=self.tokenizer.pad_token_id,
                    max_new_tokens=self.args.max_new_tokens,
                    max_length=self.max_length,  # what training keeps of an answer: decode no further
                    temperature=self.args.temperature,
                    top_p=self.args.top_p,
                    batch_size=self.args.rollout_batch_size,
                    desc=f"iteration {t}: generate {name}",
                )
                for name, split in self.splits.items()
            }
        del opponent
        self.policy.train()
        self.report_answers(t, generated["train"], ends)
        return generated

    def report_answers(self, t: int, generated: list[list[int]], ends: list[int]) -> None:
        """How the opponent's answers compare with the real ones. Answers cut at ``max_new_tokens`` carry no end token
        while every real answer does: when many are cut, ending is what tells real from generated, and SPIN may learn
        to stop ever earlier; answers that are empty (the opponent ended at once) show that it did."""
        n, split = len(generated), self.splits["train"]
        # Answers without an end token stopped where prompt and answer fill data.max_length (so is a real answer that
        # long: training sees both cut) or else at spin.max_new_tokens.
        pairs = zip(split.prompts, generated, strict=True)
        unended = [(len(p), len(g)) for p, g in pairs if not g or g[-1] not in ends]
        full = sum(length >= self.max_length - prompt for prompt, length in unended)
        cut = sum(self.args.max_new_tokens <= length < self.max_length - prompt for prompt, length in unended)
        empty = sum(1 for g in generated if not g or (len(g) == 1 and g[0] in ends))
        hint = " (no end token, unlike every real answer: raise spin.max_new_tokens)" if cut > n / 4 else ""
        self.fabric.print(
            f"iteration {t}: the opponent's answers average {sum(map(len, generated)) / n:.1f} tokens, the real ones "
            f"{sum(map(len, split.answers)) / len(split):.1f}; {cut} of {n} were cut at spin.max_new_tokens{hint}, "
            f"{empty} are empty, {full} filled data.max_length"
        )
        if empty > n / 4:
            why = (
                "the model ends at once before any training: check that the chat template and the end tokens suit "
                "it (an instruction model needs conversational data)"
                if t == 0
                else "the last iteration overshot; lower train.lr (or spin.lr) or spin.epochs_per_iteration"
            )
            if t > 0 and cut > n / 4:
                why += ", and raise spin.max_new_tokens (cut answers teach it to stop)"
            log.warning(
                "iteration %d: %d of %d generated answers are empty (the opponent ends at once): %s", t, empty, n, why
            )

    def score(self, t: int, generated: dict[str, list[list[int]]], previous: list[list[int]] | None) -> torch.Tensor:
        """Reference log-probs under the policy as it stands (the opponent): per split, its real answers, then its
        generated ones; then last iteration's training answers (mix_previous)."""
        sequences = []
        for name, split in self.splits.items():
            sequences += [split.real(i) for i in range(len(split))]
            sequences += [self.sequence(split, i, generated[name][i]) for i in range(len(split))]
        if previous is not None:
            sequences += [self.sequence(self.splits["train"], i, g) for i, g in enumerate(previous)]
        return score_sequences(
            self.fabric,
            self.policy,
            sequences,
            pad_id=self.tokenizer.pad_token_id,
            batch_size=self.batch_size,
            desc=f"iteration {t}: score",
        )

    def sequence(self, split: SFTData, i: int, generated: list[int]) -> Sequence:
        prompt = split.prompts[i]
        answer = fit_length(prompt, generated, self.max_length) or []
        if not answer:  # an empty generation is still an answer: the opponent chose EOS right away
            answer = [self.tokenizer.eos_token_id]
        return prompt + answer, len(prompt)

    def pairs(self, data: IterationData, name: str) -> Pairs:
        """The (real, generated) training or validation pairs of an iteration; the training pairs also hold last
        iteration's answers against the same real ones (mix_previous)."""
        split = self.splits[name]
        real = [split.real(i) for i in range(len(split))]
        generated = [self.sequence(split, i, g) for i, g in enumerate(data.generated[name])]
        pairs = Pairs(real, generated, data.ref_real[name], data.ref_generated[name])
        if name == "train" and data.previous is not None:
            previous = [self.sequence(split, i, g) for i, g in enumerate(data.previous)]
            pairs = Pairs(
                real + real,
                generated + previous,
                torch.cat([pairs.ref_real, pairs.ref_real]),
                torch.cat([pairs.ref_generated, data.ref_previous]),
            )
        return pairs


# ---------------------------------------------------------------------------------------------------- algorithm
class SPIN:
    """The SPIN step for the shared loop: real and generated answers in one forward, then the logistic loss."""

    metric_spec = MetricSpec(
        means={
            "loss": "_examples",
            "rewards/real": "count/pairs",
            "rewards/generated": "count/pairs",
            "rewards/accuracy": "count/pairs",
            "logps/real": "count/pairs",
            "logps/generated": "count/pairs",
            "nll": "_answer_tokens",
        },
        sums=("count/pairs", "tokens"),
        weights=("_examples", "_answer_tokens"),
    )

    def __init__(self, fabric: Any, policy: PolicyLogprobs, pad_id: int) -> None:
        self.fabric, self.policy, self.pad_id = fabric, policy, pad_id
        self.beta = 0.0
        self.train: Pairs | None = None
        self.val: Pairs | None = None

    def set_iteration(self, beta: float, train: Pairs, val: Pairs | None) -> None:
        self.beta, self.train, self.val = beta, train, val

    def prepare_step(self, micro_batches: list[list[int]]) -> None:
        return None

    def loss(self, pairs: Pairs, indices: list[int], normalizer: float) -> tuple[torch.Tensor, dict]:
        sequences = [pairs.real[i] for i in indices] + [pairs.generated[i] for i in indices]
        batch = self.fabric.to_device(pad_sequences(sequences, self.pad_id))
        token_logps = self.policy(batch["input_ids"], batch["attention_mask"], batch["targets"])
        real, generated = token_logps[: len(indices)], token_logps[len(indices) :]
        device = token_logps.device
        loss, metrics = spin_loss(
            real,
            generated,
            pairs.ref_real[indices].to(device),
            pairs.ref_generated[indices].to(device),
            beta=self.beta,
            normalizer=normalizer,
        )
        answer_tokens = (batch["targets"][: len(indices)] != -100).sum().float()
        metrics = dict(metrics)
        del metrics["rewards/margins"]  # derived from the reduced means in finalize(), not summed over batches
        metrics["loss"] = loss.detach() * normalizer / len(indices)  # per-pair mean, weighted by _examples
        metrics["_examples"] = torch.tensor(float(len(indices)))
        metrics["nll"] = -real.detach().sum() / answer_tokens.clamp(min=1)
        metrics["_answer_tokens"] = answer_tokens
        metrics["tokens"] = batch["attention_mask"].sum().float()
        return loss, metrics

    def micro_step(self, indices: list[int], context: None, normalizer: float) -> tuple[torch.Tensor, dict]:
        return self.loss(self.train, indices, normalizer)

    def eval_lengths(self) -> list[int]:
        """Held-out prompts: the ground truth's NLL per token, the pair metrics with the opponent's answers."""
        return self.val.lengths if self.val is not None else []

    def prepare_eval(self, shares: list[list[int]]) -> None:
        return None

    def eval_batch(self, indices: list[int], context: None) -> dict[str, torch.Tensor]:
        return self.loss(self.val, indices, float(len(indices)))[1]

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        metrics["rewards/margins"] = metrics["rewards/real"] - metrics["rewards/generated"]
        return metrics


def iteration_phases(args: SPINArgs, num_examples: int, train: TrainArgs) -> list[Phase]:
    """The optimizer steps of each iteration (mixing doubles the pairs after the first) and its peak learning
    rate. ``train.max_steps``, when set, is each iteration's step count in place of its epochs, as ``max_steps``
    replaces the epochs of each iteration's run in the SPIN authors' recipe (Hugging Face's Trainer)."""
    phases, start = [], 0
    for t in range(args.iterations):
        pairs = num_examples * (2 if args.mix_previous and t > 0 else 1)
        steps = train.steps_over(pairs, epochs=args.epochs_at(t))
        phases.append(Phase(start, start + steps, args.lr_at(t, train.lr)))
        start += steps
    return phases


# ---------------------------------------------------------------------------------------------------------- entry
def setup(
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(train_path="fabric-align/sft-demo", max_length=160),
    train: TrainArgs = TrainArgs(
        global_batch_size=16, micro_batch_size=8, lr=2e-3, warmup_steps=2, eval_interval=4, save_interval=4
    ),
    spin: SPINArgs = SPINArgs(epochs_per_iteration=2, max_new_tokens=48, rollout_batch_size=32),
    logger: LoggerArgs = LoggerArgs(),
    out_dir: Path = Path("out/spin"),
    seed: int = 42,
    devices: int | str = 1,
    num_nodes: int = 1,
    precision: str | None = None,
    strategy: Literal["auto", "fsdp", "ddp"] = "auto",
    resume: Literal["auto"] | Path | None = None,
) -> None:
    """Self-play fine-tuning (SPIN) of a causal LM from SFT data.

    The defaults run two iterations on the embedded tiny model and the SFT demo data; recipes in ``recipes/`` hold
    settings for real models.

    Args:
        model: Which model, LoRA/QLoRA, activation checkpointing.
        data: SFT data (``messages``, ``prompt``/``completion``, NeMo ``conversations`` or ``real``/``generated``
            rows).
        train: Batch sizes, optimizer, schedule (restarted each iteration), intervals. ``max_steps``, when set,
            is each iteration's number of optimizer steps; otherwise ``spin.epochs_per_iteration`` sets it.
            ``epochs`` is not used (a value other than 1 is refused).
        spin: Iterations, beta and learning rate per iteration, generation.
        logger: Metric logging (W&B, CSV).
        out_dir: Checkpoints, ``iter-{t}/`` generations and scores, the export (``final/``), logs.
        seed: Seed for initialization, data order and sampling.
        devices: Devices (processes) per node.
        num_nodes: Number of nodes.
        precision: ``32-true``, ``bf16-true``, ``bf16-mixed`` or ``16-mixed`` (default: bf16-mixed on GPUs with
            bf16, else 32-true).
        strategy: ``fsdp`` (FSDP2, one unit per decoder layer), ``ddp`` or ``auto``.
        resume: ``auto`` continues from the newest complete checkpoint in out_dir; or a checkpoint directory.
    """
    configure_logging()
    if train.epochs != 1:  # refused rather than ignored: SPIN's length is set per iteration
        raise ConfigError(
            f"train.epochs={train.epochs} is not used by SPIN: set spin.epochs_per_iteration (passes over each "
            "iteration's pairs) or train.max_steps (optimizer steps per iteration)"
        )
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
        method={"spin": spin},
    )
    renderer = ChatRenderer(job.tokenizer)
    options = {"answer_turn": spin.answer_turn, "with_generated": spin.reuse_generated}
    train_data = load_split(data.train_path, data.train_split, renderer, data.max_length, **options)
    val_path, val_data = validation_source(data), None
    if val_path:
        val_data = load_split(val_path, data.val_split, renderer, data.max_length, **options)
    require_batches(len(train_data), train_data.source, train)
    if job.resume_path is not None:
        check_resumed_iteration(job, spin, train_data, val_data)
    main(job.launch.make_fabric(), job, spin, train_data, val_data)


SCHEDULE_SETTINGS = "spin.iterations, spin.epochs_per_iteration, spin.mix_previous, train.max_steps"


def check_resumed_iteration(job: Job, spin: SPINArgs, train_data: SFTData, val_data: SFTData | None) -> None:
    """Before any model loads, what a checkpoint needs of this run's iterations:

    - the iterations it went through end where this run's do, and it is not past their end: a change of schedule
      or data that moves them would continue another plan, or export a model this configuration never trained;
    - inside an iteration, that iteration's stored data, which cannot be made again (its opponent is gone): intact,
      the same, and of this run's SFT data (``main`` then loads it as checked here);
    - at an iteration's end, that iteration's answers only when the next iteration rescores them (mix_previous):
      the checkpoint is the next opponent, so it also resumes into an out_dir without them."""
    meta = job.resume_meta
    step, trained_on = meta.get("step", 0), list(meta.get("iterations", []))
    phases = iteration_phases(spin, len(train_data), job.train)
    ends = [phase.end for phase in phases]
    check_resume_within(job, ends[-1], SCHEDULE_SETTINGS)
    saved_ends = meta.get("iteration_ends")  # checkpoints of older versions did not record them
    # The iteration the checkpoint is in may end elsewhere: later, or at the checkpoint's step (which ends it there),
    # as KTO's train.max_steps may change mid-run. The changed flag is said in a warning.
    if saved_ends is not None and [e for e in saved_ends if e < step] != [e for e in ends if e < step]:
        raise ConfigError(
            f"resume={job.resume_path}: before its step {step} the checkpoint's run ended iterations at steps "
            f"{[e for e in saved_ends if e < step]}, this run would at {[e for e in ends if e < step]} (changed: "
            f"{SCHEDULE_SETTINGS}, train.global_batch_size or the training data); resume with the settings it was "
            "saved with, or start a new run"
        )
    data = [split.fingerprint() for split in (train_data, val_data) if split is not None]
    store = IterationStore(job.out_dir, job.tokenizer, {})
    for t, phase in enumerate(phases):
        if step > phase.start and len(trained_on) <= t:
            raise TrainingError(
                f"{job.resume_path}: its meta.json does not record the iteration data it trained on (an older "
                "version's checkpoint); resume from a checkpoint at an iteration's start"
            )
        if phase.start < step < phase.end:
            why = (
                f"the checkpoint being resumed is inside iteration {t}, whose opponent is gone, so it cannot be made "
                f"again: resume from a checkpoint at or before step {phase.start} (the iteration's start)"
            )
            store.check_required(t, trained_on[t], data, why)
        elif step == phase.end and spin.mix_previous and t + 1 < len(phases):
            why = (
                f"with spin.mix_previous iteration {t + 1} rescores iteration {t}'s answers, which cannot be made "
                "again: resume in the checkpoint's own out_dir"
            )
            store.check_required(t, trained_on[t], data, why)


def main(fabric: Any, job: Job, spin: SPINArgs, train_data: SFTData, val_data: SFTData | None) -> None:
    logger = open_out_dir(fabric, job)
    policy, optimizer = build_policy(fabric, job)
    phases = iteration_phases(spin, len(train_data), job.train)
    run = open_run(fabric, job, logger, policy, optimizer, method="spin", state={"iteration": 0})
    shaping = {
        "settings": shaping_settings(job.config, exclude=("spin",)),
        "data": [split.fingerprint() for split in (train_data, val_data) if split is not None],
    }
    splits = {"train": train_data} | ({"val": val_data} if val_data is not None else {})
    store = IterationStore(job.out_dir, job.tokenizer, splits, end_token_ids(policy.model, job.tokenizer))
    batch_size = job.train.eval_micro_batch_size
    self_play = SelfPlay(fabric, policy, job.tokenizer, spin, splits, job.data.max_length, batch_size, job.seed)
    recipe = SPIN(fabric, policy, job.tokenizer.pad_token_id)
    # The iteration data the resumed checkpoint trained on, by id: its own iterations are reused only as they were.
    trained_on: list[str] = list(run.resumed_meta.get("iterations", []))
    history: list[str] = []  # ids of the iteration data this run's policy has trained on, in order
    run.meta["iteration_ends"] = [phase.end for phase in phases]
    for t, phase in enumerate(phases):
        start, end = phase.start, phase.end
        inside = run.state["step"] > start  # resumed from a checkpoint after this iteration's start (checked in setup)
        if run.state["step"] == end and inside:
            # Resumed exactly at its end: only its end-of-iteration validation is left (skipped below when logged),
            # on the iteration's stored data, which a checkpoint resumed into another out_dir does not have there.
            problem = store.problem_with(t, trained_on[t], shaping["data"]) if fabric.is_global_zero else None
            problem = fabric.broadcast(problem, src=0)
            if problem is not None:
                fabric.print(f"iteration {t}: not validated again at its end ({store.directory(t)}: {problem})")
                history.append(trained_on[t])
                run.meta["iterations"] = list(history)  # for the last checkpoint, when no iteration is left
                continue
        if run.state["step"] > end:
            history.append(trained_on[t])
            run.meta["iterations"] = list(history)
            continue  # finished before the checkpoint we resumed from
        if run.state["step"] == start and t > 0:
            # Each iteration is a fresh fine-tuning run from the new opponent (as in the SPIN authors' recipe).
            optimizer.state.clear()
        if inside:
            data_t = store.load(t)  # as check_resumed_iteration verified it before launch
            fabric.print(f"iteration {t}: reusing {store.directory(t)}")
        else:
            provenance = iteration_provenance(spin, shaping, t, start, history)
            data_t = store.reusable(t, provenance, quiet=not fabric.is_global_zero)
            if data_t is None:
                previous = store.previous_answers(t) if spin.mix_previous and t > 0 else None
                made = self_play.make(t, previous)
                if fabric.is_global_zero:
                    store.save(t, made, provenance, spin)
                fabric.barrier()
                data_t = store.load(t)  # what was stored, on every rank
            else:
                fabric.print(f"iteration {t}: reusing {store.directory(t)}")
        history.append(data_t.id)
        run.meta["iterations"] = list(history)
        pairs = self_play.pairs(data_t, "train")
        val_pairs = self_play.pairs(data_t, "val") if val_data is not None else None
        beta = spin.beta_at(t)
        recipe.set_iteration(beta, pairs, val_pairs)
        run.state["iteration"] = t
        lengths = [len(g) for g in data_t.generated["train"]]
        mean_length = sum(lengths) / len(lengths)
        if run.state["step"] == start:
            metrics = {"generation/mean_length": mean_length, "iteration": t, "beta": beta}
            if run.logged_before_resume("generation/mean_length", start):
                # Logged by the run this one resumes, after its checkpoint: this run's data or beta may differ.
                run.logger.replace(metrics, step=start)
            else:
                run.logger.log(metrics, step=start)
                log_samples(run, job.tokenizer, train_data, data_t, t, spin.num_logged_samples, start)
        plan = StepPlan(len(pairs), job.train.global_batch_size, job.seed + 1000 * t, pairs.lengths)
        per_step = {"train/iteration": t, "train/beta": beta, "train/generation/mean_length": mean_length}
        fit(run, recipe, plan, phase, extra_metrics=lambda m=per_step: m)
        log_validation(run, recipe, run.state["step"])  # each iteration's end, on its own validation pairs
    finish(run, recipe)


def log_samples(run: Run, tokenizer: Any, train: SFTData, data: IterationData, t: int, n: int, step: int) -> None:
    rows = [
        [
            t,
            tokenizer.decode(train.prompts[i], skip_special_tokens=True),
            tokenizer.decode(train.answers[i], skip_special_tokens=True),
            tokenizer.decode(data.generated["train"][i], skip_special_tokens=True),
        ]
        for i in range(min(n, len(train)))
    ]
    run.logger.log_table(f"generations/iter-{t}", ["iteration", "prompt", "real", "generated"], rows, step=step)


def cli(args: list[str] | None = None) -> None:
    run_program(setup, args)


if __name__ == "__main__":
    cli()
