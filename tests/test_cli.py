"""The command line: jsonargparse from the typed signature, --config/--print_config, nested flags, recipes,
the module entry point run from the checkout, and the embedded assets."""

from __future__ import annotations

import filecmp
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fabric_align import kto

from conftest import REPO, run_cli


def parse(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(kto.setup, [*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_help_lists_groups_with_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(kto.setup, ["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model.name_or_path",
        "--model.lora",
        "--model.quantize",
        "--model.activation_checkpointing",
        "--data.train_path",
        "--data.val_path",
        "--data.max_length",
        "--train.global_batch_size",
        "--train.micro_batch_size",
        "--train.lr",
        "--train.optimizer",
        "--train.warmup_steps",
        "--train.max_steps",
        "--train.epochs",
        "--train.max_norm",
        "--train.eval_interval",
        "--train.save_interval",
        "--kto.beta",
        "--kto.desirable_weight",
        "--kto.undesirable_weight",
        "--kto.loss_type",
        "--logger.backend",
        "--logger.project",
        "--logger.run_name",
        "--out_dir",
        "--seed",
        "--devices",
        "--num_nodes",
        "--precision",
        "--strategy",
        "--resume",
    ):
        assert flag in text, flag
    assert "Strength of the implicit KL penalty" in text  # attribute docstrings become help


def test_nested_flags_as_a_sweep_agent_passes_them(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse(
        [
            "--kto.beta=0.3",
            "--kto.desirable_weight=1.2",
            "--train.lr=1e-4",
            "--model.lora.r=8",
            "--strategy=fsdp",
            "--resume=auto",
        ],
        capsys,
    )
    assert config["kto"]["beta"] == 0.3 and config["kto"]["desirable_weight"] == 1.2
    assert config["train"]["lr"] == 1e-4 and config["model"]["lora"]["r"] == 8
    assert config["strategy"] == "fsdp" and config["resume"] == "auto"
    # The agent writes a sweep's null as Python prints it.
    config = parse(["--train.max_steps=4", "--train.max_steps=None", "--train.warmup_ratio=None"], capsys)
    assert config["train"]["max_steps"] is None and config["train"]["warmup_ratio"] is None


def test_print_config_round_trips_through_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = parse(["--kto.beta=0.25", "--data.max_length=64"], capsys)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(first))
    assert parse([f"--config={path}"], capsys) == first
    # Later flags override the file, as sweeps rely on.
    assert parse([f"--config={path}", "--kto.beta=0.05"], capsys)["kto"]["beta"] == 0.05


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("kto*.yaml")), ids=lambda p: p.name)
def test_every_kto_recipe_parses(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = parse([f"--config={recipe}"], capsys)
    assert config["kto"]["beta"] > 0


def test_tiny_recipe_reproduces_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    default = parse([], capsys)
    recipe = parse([f"--config={REPO / 'recipes' / 'kto-tiny.yaml'}"], capsys)
    default.pop("out_dir"), recipe.pop("out_dir")
    assert recipe == default


def test_module_entry_point_from_the_repo_root() -> None:
    """`python -m fabric_align.kto` with the checkout on sys.path: the repo's kernels/ folder must not pass for
    Hugging Face's `kernels` package (which transformers depends on and imports), nor hide it."""
    result = subprocess.run(
        [sys.executable, "-m", "fabric_align.kto", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "beta: 0.1" in result.stdout
    probe = (
        "import importlib.metadata as m, fabric_align, kernels, transformers.utils as u\n"
        "from fabric_align.args import ModelArgs\n"
        "from fabric_align.modeling import load_tokenizer\n"
        "try:\n    installed = bool(m.version('kernels'))\nexcept m.PackageNotFoundError:\n    installed = False\n"
        "eos = load_tokenizer(ModelArgs()).eos_token\n"
        "print(u.is_kernels_available() == installed, hasattr(kernels, 'kto_loss'), eos)"
    )
    probe = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split()[:2] == ["True", "False"], probe.stderr[-3000:]
    assert len(probe.stdout.split()) == 3, probe.stderr[-3000:]


def test_shipped_tiny_model_and_demo_data_are_reproducible(tmp_path: Path) -> None:
    from fabric_align.assets import build_tiny, make_demo_data

    built = build_tiny.build(tmp_path / "tiny")
    shipped = build_tiny.TINY_DIR
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert filecmp.cmp(built / name, shipped / name, shallow=False), name
    assert json.loads((built / "tokenizer.json").read_text()) == json.loads((shipped / "tokenizer.json").read_text())
    rows = make_demo_data.kto_rows(make_demo_data.random.Random(0), 256)
    assert [json.loads(line) for line in (shipped.parent / "kto_demo_train.jsonl").read_text().splitlines()] == rows


def test_a_home_relative_model_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers does not expand ``~``: a path like ~/models/x would be tried as a hub id."""
    import shutil

    from fabric_align.args import ModelArgs
    from fabric_align.modeling import EMBEDDED_MODEL_DIR, load_tokenizer, resolve_model_path

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(EMBEDDED_MODEL_DIR, tmp_path / "models" / "tiny")
    assert resolve_model_path("~/models/tiny") == str(tmp_path / "models" / "tiny")
    assert load_tokenizer(ModelArgs(name_or_path="~/models/tiny")).eos_token_id is not None


def test_flags_before_config_are_said_to_be_overridden(caplog: pytest.LogCaptureFixture) -> None:
    from fabric_align.cli import warn_flags_before_config

    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        warn_flags_before_config(["--config", "a.yaml", "--kto.beta=0.3"])
        assert caplog.text == ""
        warn_flags_before_config(["--kto.beta=0.3", "--devices", "8", "--config=a.yaml"])
    assert "--kto.beta, --devices before --config: the file's values override them" in caplog.text
