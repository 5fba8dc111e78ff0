"""The real KTO trainer on the tiny model: the default run, learning a rule, the export, the metrics."""

from __future__ import annotations

import json
import logging
import random
import string
from pathlib import Path

import pytest
import torch

from fabric_align import kto, trainer
from fabric_align.args import KTOArgs, ModelArgs
from fabric_align.data import EMBEDDED_DATA, pad_sequences
from fabric_align.modeling import PolicyLogprobs, load_model, load_tokenizer

from conftest import FAST, column, read_metrics, run_cli, write_jsonl

DOCUMENTED_METRICS = [
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "count/chosen",
    "count/rejected",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default exactly as `python fabric_align/kto.py` runs it (CSV logging only)."""
    out = tmp_path_factory.mktemp("default") / "out"
    run_cli(kto.setup, ["--logger.backend=csv", f"--out_dir={out}"])
    return out


def test_default_run_trains_and_its_margin_grows(default_run: Path) -> None:
    rows = read_metrics(default_run)
    val_margins = column(rows, "val/rewards/margins")
    assert abs(val_margins[0]) < 1e-3  # policy == reference before the first step
    assert val_margins[-1] > 1.0 and val_margins[-1] > val_margins[0]
    train_margins = column(rows, "train/rewards/margins")
    assert sum(train_margins[-10:]) / 10 > sum(train_margins[:5]) / 5 + 1.0
    losses = column(rows, "train/loss")
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:3]) / 3
    for name in DOCUMENTED_METRICS:
        assert column(rows, f"train/{name}") and column(rows, f"val/{name}"), name
    for name in ("lr", "grad_norm", "tokens_per_sec", "step", "epoch"):
        assert column(rows, f"train/{name}"), name
    assert column(rows, "train/step") == list(range(1, 65))
    assert column(rows, "train/epoch")[-1] == 4
    # Validation before step s is after the steps before it: their epoch (16 steps each), 0 before the first.
    assert column(rows, "val/step") == [0, 10, 20, 30, 40, 50, 60, 64]
    assert column(rows, "val/epoch") == [0, 1, 2, 2, 3, 4, 4, 4]
    assert min(column(rows, "train/tokens_per_sec")) > 0
    lrs = column(rows, "train/lr")
    assert lrs[0] < lrs[5] and lrs[-1] < lrs[10]  # warmup, then cosine decay
    # z0 is clamped at zero and is what the loss used.
    assert min(column(rows, "train/kl")) >= 0


def test_default_run_writes_checkpoints_and_export(default_run: Path) -> None:
    for step in (25, 50, 64):
        assert (default_run / f"step-{step:06d}" / "meta.json").is_file()
    assert not list(default_run.glob(".tmp-*"))
    final = default_run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    # The weights are as readable as the rest (safetensors writes through private 0600 temporary files).
    assert {f.stat().st_mode & 0o777 for f in final.iterdir()} == {(final / "config.json").stat().st_mode & 0o777}
    (cache,) = (default_run / "cache").glob("kto-reference-*")
    assert (cache / "logps.pt").is_file() and (cache / "meta.json").is_file()


def sequence_logps_hf(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independent path: the model's own logits, log_softmax, gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["targets"]
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != -100)).sum(-1)


def test_export_loads_with_transformers_and_gives_the_trained_logps(default_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(ModelArgs())
    data = kto.load_split("fabric-align/kto-demo-val", "test", kto.ChatRenderer(tokenizer), 256, 0, train=False)
    batch = pad_sequences(data.sequences[:6], tokenizer.pad_token_id)

    exported = AutoModelForCausalLM.from_pretrained(default_run / "final").eval()
    # The trained weights as the trainer holds them: the last checkpoint, through our log-prob path.
    state = torch.load(default_run / "step-000064" / "state", weights_only=True)
    policy = PolicyLogprobs(load_model(ModelArgs(), dtype=torch.float32, seed=0)).eval()
    policy.load_state_dict(state["model"])
    initial = load_model(ModelArgs(), dtype=torch.float32, seed=42).eval()
    with torch.no_grad():
        from_export = sequence_logps_hf(exported, batch)
        from_trainer = policy(batch["input_ids"], batch["attention_mask"], batch["targets"]).sum(-1).double()
        from_init = sequence_logps_hf(initial, batch)
    torch.testing.assert_close(from_export, from_trainer, rtol=1e-5, atol=1e-3)
    assert (from_export - from_init).abs().max() > 1.0  # it is the trained model, not the initialization


def case_rows(rng: random.Random, n: int) -> list[dict]:
    """The rule: a lowercase answer is desirable, the same answer shouted in uppercase is not."""
    rows = []
    for _ in range(n):
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))) for _ in range(3)]
        answer = " ".join(rng.sample(words, 3))
        desirable = rng.random() < 0.5
        rows.append(
            {
                "prompt": f"Say {' '.join(words)}:",
                "completion": answer if desirable else answer.upper(),
                "label": desirable,
            }
        )
    return rows


def test_learns_a_rule_on_held_out_data(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", case_rows(random.Random(0), 128))
    val = write_jsonl(tmp_path / "val.jsonl", case_rows(random.Random(1), 48))  # unseen words
    out = tmp_path / "out"
    run_cli(
        kto.setup,
        [
            *FAST,
            f"--data.train_path={train}",
            f"--data.val_path={val}",
            f"--out_dir={out}",
            "--train.global_batch_size=16",
            "--train.micro_batch_size=8",
            "--train.lr=3e-3",
            "--train.max_steps=40",
            "--train.eval_interval=10",
            "--train.save_interval=null",
        ],
    )
    margins = column(read_metrics(out), "val/rewards/margins")
    assert len(margins) == 5
    assert margins[-1] > 0.5 and margins[-1] > margins[0] + 0.5


def test_apo_zero_unpaired_trains_without_kl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No KL term: z0 is 0, and the reference pass skips the KL pairs (half of it), which nothing reads."""
    scored = []
    real_score = kto.score_sequences

    def counting_score(fabric: object, policy: object, sequences: list, **kwargs: object) -> torch.Tensor:
        scored.append(len(sequences))
        return real_score(fabric, policy, sequences, **kwargs)

    monkeypatch.setattr(kto, "score_sequences", counting_score)
    out = tmp_path / "out"
    run_cli(
        kto.setup,
        [
            *FAST,
            f"--out_dir={out}",
            "--kto.loss_type=apo_zero_unpaired",
            "--train.max_steps=12",
            "--train.lr=3e-3",
            "--train.eval_interval=6",
            "--train.save_interval=null",
        ],
    )
    rows = read_metrics(out)
    # No z0 is measured: no kl metric at all (a 0 would read as a measurement).
    assert not column(rows, "train/kl") and not column(rows, "val/kl") and column(rows, "train/rewards/chosen")
    margins = column(rows, "val/rewards/margins")
    assert margins[-1] > margins[0] + 0.5
    train_rows = len(EMBEDDED_DATA["fabric-align/kto-demo"].read_text().splitlines())
    val_rows = len(EMBEDDED_DATA["fabric-align/kto-demo-val"].read_text().splitlines())
    assert scored == [train_rows + val_rows]  # one log-prob per example, none for KL pairs


def test_lm_head_is_never_run_on_hidden_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every log-prob goes through fused_linear_logprob: the lm_head module itself (N x V logits) never runs."""
    calls = {"lm_head": 0, "fused": 0}
    real_load = trainer.load_model

    def load_with_hook(*args: object, **kwargs: object) -> torch.nn.Module:
        model = real_load(*args, **kwargs)
        model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__("lm_head", 1))
        return model

    import fabric_align.modeling as modeling

    real_fused = modeling.fused_linear_logprob

    def counting_fused(*args: object, **kwargs: object) -> torch.Tensor:
        calls["fused"] += 1
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(trainer, "load_model", load_with_hook)
    monkeypatch.setattr(modeling, "fused_linear_logprob", counting_fused)
    run_cli(kto.setup, [*FAST, f"--out_dir={tmp_path / 'out'}", "--train.max_steps=2", "--train.save_interval=null"])
    assert calls["lm_head"] == 0
    assert calls["fused"] > 10  # reference pass, KL passes, training and validation


def test_weight_ratio_warning_suggests_weights(caplog: pytest.LogCaptureFixture) -> None:
    data = kto.KTOData("x", [], [], torch.tensor([True] * 30 + [False] * 10))
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        kto.warn_weight_ratio(data, KTOArgs())
    assert "= 3.000 is outside [1, 4/3]" in caplog.text
    assert "--kto.desirable_weight=0.389" in caplog.text  # 10/30 * 7/6
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        kto.warn_weight_ratio(data, KTOArgs(desirable_weight=0.4))
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("desirable", "undesirable", "undesirable_weight", "expected"),
    [
        (12, 4, 1.0, 4 / 9),  # many desirable: the weight that puts the ratio at the band's top, 4/3
        (4, 12, 1.0, 3.0),  # many undesirable: the ratio at the band's bottom, 1
        (9, 8, 1.0, 1.0),  # already inside the band: 1.0 stays
        (5, 10, 0.5, 1.0),  # lambda_U n_U = 5 = n_D: ratio 1 with 1.0
    ],
)
def test_desirable_weight_auto_lands_in_the_recommended_band(
    desirable: int, undesirable: int, undesirable_weight: float, expected: float, caplog: pytest.LogCaptureFixture
) -> None:
    data = kto.KTOData("x", [], [], torch.tensor([True] * desirable + [False] * undesirable))
    args = KTOArgs(desirable_weight="auto", undesirable_weight=undesirable_weight)
    with caplog.at_level(logging.INFO, logger="fabric_align"):
        chosen = kto.resolve_weights(data, args)
    assert chosen.desirable_weight == pytest.approx(expected)
    ratio = chosen.desirable_weight * desirable / (undesirable_weight * undesirable)
    assert 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9
    assert f"kto.desirable_weight=auto: {expected:.4g}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        kto.warn_weight_ratio(data, chosen)
    assert caplog.text == ""


def test_desirable_weight_auto_is_the_value_the_run_uses(tmp_path: Path) -> None:
    """With 12 desirable and 4 undesirable rows, auto gives 4/9; the run's config (meta.json) records that number."""
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 4 != 0} for i in range(16)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    run_cli(
        kto.setup,
        [
            *FAST,
            f"--data.train_path={train}",
            "--kto.desirable_weight=auto",
            "--train.max_steps=1",
            "--train.save_interval=1",
            f"--out_dir={out}",
        ],
    )
    meta = json.loads((out / "step-000001" / "meta.json").read_text())
    assert meta["config"]["kto"]["desirable_weight"] == pytest.approx(4 / 9)


def test_custom_training_data_is_not_validated_on_the_demo_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(16)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="fabric_align"):
        run_cli(kto.setup, [*FAST, f"--data.train_path={train}", "--train.max_steps=2", f"--out_dir={out}"])
    assert "no validation (no data.val_path given for this training data)" in caplog.text
    assert not [key for key in read_metrics(out)[0] if key.startswith("val/")]
    assert column(read_metrics(out), "train/loss")


def test_activation_checkpointing_and_bf16(tmp_path: Path) -> None:
    """Recomputing activations changes nothing but memory: selective checkpointing (the default) gives the same
    metrics bit for bit as keeping everything, whole-layer recomputation the same to round-off; bf16-true trains
    and exports bf16 weights."""
    args = [*FAST, "--train.max_steps=3", "--train.save_interval=null", "--train.eval_interval=3"]
    for mode in ("false", "selective", "true"):
        run_cli(kto.setup, [*args, f"--model.activation_checkpointing={mode}", f"--out_dir={tmp_path / mode}"])
    kept, selective, whole = (read_metrics(tmp_path / mode) for mode in ("false", "selective", "true"))
    numbers = [key for key in kept[0] if key != "train/tokens_per_sec" and not key.startswith("time")]
    assert [[row[key] for key in numbers] for row in selective] == [[row[key] for key in numbers] for row in kept]
    assert column(kept, "train/loss") == pytest.approx(column(whole, "train/loss"), rel=1e-6, abs=1e-7)
    run_cli(kto.setup, [*args, "--precision=bf16-true", f"--out_dir={tmp_path / 'bf16'}"])
    from conftest import load_safetensors

    weights = load_safetensors(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert column(read_metrics(tmp_path / "bf16"), "train/loss")[-1] < 0.5


def test_keeping_the_softmax_changes_speed_not_results(tmp_path: Path) -> None:
    """model.keep_softmax_mib: the lm_head's backward reuses the forward's softmax instead of recomputing the
    logits; the run's numbers and weights are the recomputing run's to round-off."""
    args = [*FAST, "--train.max_steps=3", "--train.save_interval=null", "--train.eval_interval=3"]
    run_cli(kto.setup, [*args, f"--out_dir={tmp_path / 'recompute'}"])
    run_cli(kto.setup, [*args, "--model.keep_softmax_mib=1", f"--out_dir={tmp_path / 'kept'}"])
    rows_a, rows_b = read_metrics(tmp_path / "recompute"), read_metrics(tmp_path / "kept")
    for key in ("train/loss", "train/kl", "train/rewards/margins", "val/loss"):
        a, b = column(rows_a, key), column(rows_b, key)
        assert len(a) == len(b) > 0, key
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6, msg=key)
    from conftest import load_safetensors

    a, b = (load_safetensors(tmp_path / run / "final" / "model.safetensors") for run in ("recompute", "kept"))
    assert a.keys() == b.keys()
    for key in a:  # Adam's normalized steps carry the gradients' round-off further than the metrics show
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    assert not all(torch.equal(a[key], b[key]) for key in a)  # the other path ran: round-off, not bit-identity


def test_eval_batch_size_changes_batching_not_results(tmp_path: Path) -> None:
    """The no-grad passes (reference log-probs, validation) batch by train.eval_batch_size; only float noise from
    other padding widths may differ."""
    args = [*FAST, "--train.max_steps=2", "--train.eval_interval=2", "--train.save_interval=null"]
    run_cli(kto.setup, [*args, f"--out_dir={tmp_path / 'a'}"])
    run_cli(kto.setup, [*args, "--train.eval_batch_size=3", f"--out_dir={tmp_path / 'b'}"])
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("val/loss", "val/rewards/margins", "val/logps/chosen", "train/loss", "train/kl"):
        a, b = column(rows_a, key), column(rows_b, key)
        assert len(a) == len(b) > 0, key
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4, msg=key)
