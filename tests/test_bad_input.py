"""Every bad input is rejected with file, line and field, before any model is loaded, and
nothing already in out_dir is lost."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fabric_align import kto, trainer
from fabric_align.checkpoints import seal, verify_directory
from fabric_align.data import DataError
from fabric_align.errors import ConfigError

from conftest import FAST, REPO, run_cli, write_jsonl

GOOD = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(16)]


@pytest.fixture
def guarded_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An out_dir holding an earlier run's files, and a model loader that must never be reached."""
    out = tmp_path / "out"
    (out / "step-000004").mkdir(parents=True)
    (out / "step-000004" / "state").write_text("weights")
    seal(out / "step-000004", {"step": 4})  # an intact checkpoint, as far as its manifest tells
    (out / "cache").mkdir()
    (out / "cache" / "kto-reference-x.pt").write_text("keep me")

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr(trainer, "load_model", no_model)
    return out


def assert_untouched(out: Path) -> None:
    assert verify_directory(out / "step-000004") is None
    assert (out / "step-000004" / "state").read_text() == "weights"
    assert (out / "cache" / "kto-reference-x.pt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["cache", "step-000004"]


def train_on(path: Path, out_dir: Path) -> None:
    """A KTO run on ``path`` (no validation data) into ``out_dir``, resuming whatever is there."""
    run_cli(
        kto.setup, [*FAST, f"--data.train_path={path}", "--data.val_path=null", f"--out_dir={out_dir}", "--resume=auto"]
    )


def rows_with(line: int, bad: object) -> list[object]:
    rows: list[object] = list(GOOD)
    rows[line - 1] = bad
    return rows


CASES = {
    "malformed json": (rows_with(3, '{"prompt": "x", "completion": '), 3, "<json>", "malformed JSON"),
    "missing label": (rows_with(2, {"prompt": "x", "completion": "y"}), 2, "label", "missing"),
    "missing prompt": (rows_with(5, {"completion": "y", "label": True}), 5, "prompt", "missing"),
    "mistyped prompt": (rows_with(4, {"prompt": 7, "completion": "y", "label": True}), 4, "prompt", "list of messages"),
    "mistyped completion": (
        rows_with(4, {"prompt": "x", "completion": ["y"], "label": True}),
        4,
        "completion",
        "expected a string",
    ),
    "empty completion": (rows_with(6, {"prompt": "x", "completion": "  ", "label": True}), 6, "completion", "empty"),
    "empty chat completion": (
        rows_with(
            6,
            {
                "prompt": [{"role": "user", "content": "x"}],
                "completion": [{"role": "assistant", "content": ""}],
                "label": True,
            },
        ),
        6,
        "completion",
        "empty",
    ),
    "unknown role": (
        rows_with(7, {"prompt": [{"role": "wizard", "content": "x"}], "completion": "y", "label": True}),
        7,
        "prompt[0].role",
        "unknown role",
    ),
    "label not boolean": (rows_with(8, {"prompt": "x", "completion": "y", "label": 1}), 8, "label", "true/false"),
    "label odd string": (rows_with(8, {"prompt": "x", "completion": "y", "label": "good"}), 8, "label", "true/false"),
    "nemo preference": (
        rows_with(9, {"prompt": "x", "response": "y", "preference": "maybe"}),
        9,
        "preference",
        "chosen",
    ),
    "nemo empty response": (
        rows_with(9, {"prompt": "x", "response": "", "preference": "chosen"}),
        9,
        "response",
        "empty",
    ),
    "both row forms": (
        rows_with(9, {"prompt": "x", "completion": "y", "label": True, "preference": "rejected"}),
        9,
        "preference",
        "mixes NeMo-Aligner's form",
    ),
    "row not an object": (rows_with(10, "[1, 2]"), 10, "<row>", "JSON object"),
    "label given twice": (
        rows_with(8, '{"prompt": "x", "label": true, "completion": "y", "label": false}'),
        8,
        "label",
        "given twice in one object",
    ),
    "empty conversational prompt": (
        rows_with(7, {"prompt": [], "completion": [{"role": "assistant", "content": "y"}], "label": True}),
        7,
        "prompt",
        "empty list of messages",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_training_rows(case: str, tmp_path: Path, guarded_out_dir: Path) -> None:
    rows, line, field, problem = CASES[case]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        train_on(path, guarded_out_dir)
    message = str(err.value)
    assert message.startswith(f"{path}, line {line}, field '{field}'"), message
    assert problem in message
    assert_untouched(guarded_out_dir)


def test_bad_validation_rows_named_too(tmp_path: Path, guarded_out_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    val = write_jsonl(tmp_path / "val.jsonl", GOOD[:3] + [{"prompt": "x", "completion": "y", "label": None}])
    with pytest.raises(DataError, match=re.escape(f"{val}, line 4, field 'label': is null")):
        run_cli(
            kto.setup,
            [
                *FAST,
                f"--data.train_path={train}",
                f"--data.val_path={val}",
                f"--out_dir={guarded_out_dir}",
                "--resume=auto",
            ],
        )
    assert_untouched(guarded_out_dir)


@pytest.mark.parametrize("label", [True, False])
def test_one_sided_labels(label: bool, tmp_path: Path, guarded_out_dir: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": label} for i in range(16)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    kind = "desirable" if label else "undesirable"
    expected = rf"{re.escape(str(path))}, all 16 rows, field 'label': every example is {kind}"
    with pytest.raises(DataError, match=expected):
        train_on(path, guarded_out_dir)
    assert_untouched(guarded_out_dir)


def test_json_array_and_parquet_rows_are_named(tmp_path: Path, guarded_out_dir: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD[:5] + [{"prompt": "x", "completion": "y", "label": "yes"}]))
    with pytest.raises(DataError, match=re.escape(f"{path}, row 5, field 'label'")):
        train_on(path, guarded_out_dir)
    # A key given twice, which Python's json would resolve in silence, is found in its row, nested too.
    chat = '{"prompt": [{"role": "user", "role": "assistant", "content": "x"}], "completion": "y", "label": true}'
    path.write_text("[\n" + ",\n".join([*(json.dumps(r) for r in GOOD[:3]), chat, json.dumps(GOOD[4])]) + "]")
    with pytest.raises(DataError, match=re.escape(f"{path}, row 3, field 'role': given twice in one object")):
        train_on(path, guarded_out_dir)
    assert_untouched(guarded_out_dir)


def test_missing_file(tmp_path: Path, guarded_out_dir: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        run_cli(
            kto.setup,
            [*FAST, f"--data.train_path={tmp_path / 'nope.jsonl'}", f"--out_dir={guarded_out_dir}", "--resume=auto"],
        )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kto.beta=0"], "kto.beta=0.0: must be positive"),
        (["--kto.beta=-0.5"], "kto.beta=-0.5"),
        (["--kto.desirable_weight=0"], "kto.desirable_weight=0.0"),
        (["--train.global_batch_size=10", "--train.micro_batch_size=4"], "not divisible"),
        (["--train.micro_batch_size=0"], "train.micro_batch_size=0"),
        (["--train.eval_batch_size=0"], "train.eval_batch_size=0"),
        (["--train.lr=0"], "train.lr=0.0"),
        (["--data.max_length=1"], "data.max_length=1"),
        (["--precision=8-true"], "precision='8-true'"),
        (["--train.global_batch_size=512"], "fewer than train.global_batch_size=512"),
        (["--model.name_or_path=/no/such/model"], "model.name_or_path=/no/such/model: no such directory"),
    ],
)
def test_out_of_range_flags(flags: list[str], message: str, tmp_path: Path, guarded_out_dir: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_cli(kto.setup, [*FAST, *flags, f"--out_dir={guarded_out_dir}", "--resume=auto"])
    assert_untouched(guarded_out_dir)


def test_fresh_run_refuses_an_out_dir_with_checkpoints(guarded_out_dir: Path) -> None:
    with pytest.raises(ConfigError, match="already holds step-000004"):
        run_cli(kto.setup, [*FAST, f"--out_dir={guarded_out_dir}"])
    assert_untouched(guarded_out_dir)


def test_another_directorys_checkpoint_is_not_resumed_into_a_run(tmp_path: Path, guarded_out_dir: Path) -> None:
    """Continuing run B's checkpoint in run A's out_dir would overwrite A's checkpoints, export and log."""
    other = tmp_path / "other" / "step-000002"
    other.mkdir(parents=True)
    (other / "state").write_text("weights")
    seal(other, {"step": 2})
    message = "is another directory's checkpoint, and out_dir=.* already holds step-000004"
    with pytest.raises(ConfigError, match=message):
        run_cli(kto.setup, [*FAST, f"--out_dir={guarded_out_dir}", f"--resume={other}"])
    assert_untouched(guarded_out_dir)


def test_a_checkpoint_is_resumed_only_under_the_strategy_that_saved_it(guarded_out_dir: Path) -> None:
    """An unsharded checkpoint (one state file) under FSDP2, or a sharded one (a state directory) without it: said
    before any model is loaded, not as an unreadable checkpoint after the reference pass."""
    with pytest.raises(ConfigError, match="saved unsharded, by strategy=auto or ddp; resume it with strategy=auto"):
        run_cli(kto.setup, [*FAST, f"--out_dir={guarded_out_dir}", "--resume=auto", "--strategy=fsdp"])
    assert_untouched(guarded_out_dir)
    sharded = guarded_out_dir / "step-000004"
    (sharded / "state").unlink()
    (sharded / "state").mkdir()
    (sharded / "state" / "__0_0.distcp").write_text("shard")
    seal(sharded, {"step": 4})
    with pytest.raises(ConfigError, match="saved sharded, by strategy=fsdp; resume it with strategy=fsdp"):
        run_cli(kto.setup, [*FAST, f"--out_dir={guarded_out_dir}", "--resume=auto"])


def test_resume_auto_over_a_finished_run_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "out" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds final: a finished run, with no checkpoint to continue"):
        run_cli(kto.setup, [*FAST, f"--out_dir={tmp_path / 'out'}", "--resume=auto"])


def test_unknown_flag_is_rejected_by_the_cli(guarded_out_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments: --kto.betta=0.2"):
        run_cli(kto.setup, [*FAST, "--kto.betta=0.2", f"--out_dir={guarded_out_dir}"])
    assert_untouched(guarded_out_dir)


def test_dropping_long_prompts_that_leaves_one_label_is_named(tmp_path: Path, guarded_out_dir: Path) -> None:
    """The one-label check also runs on what is left once rows whose prompt does not fit are dropped."""
    rows = [{"prompt": "q" if i % 2 else "long " * 40, "completion": f"a{i}", "label": i % 2 == 0} for i in range(16)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    expected = (
        rf"{re.escape(str(path))}, all 8 rows left after dropping 8 .*field 'label': every example is undesirable"
    )
    with pytest.raises(DataError, match=expected):
        train_on(path, guarded_out_dir)
    assert_untouched(guarded_out_dir)


def test_the_program_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    """As a program (not called in-process), bad input ends with one 'error:' line and exit status 1, no traceback."""
    path = write_jsonl(tmp_path / "train.jsonl", rows_with(3, {"prompt": "x", "completion": "y", "label": 1}))
    command = [sys.executable, str(REPO / "fabric_align" / "kto.py"), f"--data.train_path={path}"]
    result = subprocess.run(command + [f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: {path}, line 3, field 'label': expected true/false" in result.stderr
    assert not (tmp_path / "out").exists()
