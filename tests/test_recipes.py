"""Recipes and sweeps: every recipe is a complete configuration its entry script reads back unchanged, with a header
saying how to run it; the real-model recipes are consistent (batch sizes divide, FSDP2 with torch AdamW, QLoRA with
LoRA); the tiny recipes train; every sweep parameter, passed as the W&B agent passes it, parses; and the offline sweep
runner drives W&B's search algorithms end to end. (tests/test_cli.py parses recipes/kto*.yaml and checks that
recipes/kto-tiny.yaml is the KTO default.)"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

from fabric_align import kto, spin, sweep
from fabric_align.args import KTOArgs, SPINArgs, TrainArgs
from fabric_align.launch import PRECISIONS

from conftest import FAST, REPO, column, read_metrics, run_cli

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
REAL_RECIPES = [r for r in RECIPES if not r.stem.endswith("-tiny")]
SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more, and on a busy machine OpenMP's spinning threads
    slow these runs down several times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def entry(name: str) -> ModuleType:
    """The entry script a recipe or sweep belongs to, by its name (kto*, spin*) or its program."""
    stem = Path(name).stem
    if stem.startswith("kto"):
        return kto
    if stem.startswith("spin"):
        return spin
    raise AssertionError(f"{name}: neither kto* nor spin*")


def printed(setup: Any, args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """The configuration ``--print_config`` prints for ``args``, parsed exactly as the command line would be."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, [*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def by_path(config: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        config = config[key]
    return config


# --------------------------------------------------------------------------------------------------------- recipes
def test_every_method_has_tiny_and_real_recipes() -> None:
    names = {r.stem for r in RECIPES}
    for method in ("kto", "spin"):
        assert f"{method}-tiny" in names
        for model in ("qwen2.5-0.5b", "llama3.1-8b"):
            for variant in ("full", "lora", "qlora"):
                assert f"{method}-{model}-{variant}" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_is_the_printed_config_with_a_header(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The file is exactly what --print_config prints for it: nothing missing, nothing the parser would change."""
    config = printed(entry(recipe.name).setup, [f"--config={recipe}"], capsys)
    assert yaml.safe_load(recipe.read_text()) == config
    assert config["out_dir"] == f"out/{recipe.stem}"
    text = header(recipe)
    assert "fabric run" in text and f"--config recipes/{recipe.name}" in text
    if recipe in REAL_RECIPES:
        memory = "peak memory" if "Hardware: CPU" in text else "peak GPU memory"
        assert "Hardware:" in text and memory in text and "estimate" in text
        assert f"--devices {config['devices']} " in text


def test_spin_tiny_recipe_reproduces_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    default = printed(spin.setup, [], capsys)
    recipe = printed(spin.setup, [f"--config={REPO / 'recipes' / 'spin-tiny.yaml'}"], capsys)
    default.pop("out_dir"), recipe.pop("out_dir")
    assert recipe == default


@pytest.mark.parametrize("recipe", REAL_RECIPES, ids=lambda p: p.name)
def test_real_recipe_settings_are_consistent(recipe: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    model, train = config["model"], config["train"]
    world = config["devices"] * config["num_nodes"]
    args = TrainArgs(**{**train, "betas": tuple(train["betas"])})
    args.check()  # every value in range
    args.accumulation_steps(world)  # raises when the batch sizes do not divide
    group = {"kto": KTOArgs, "spin": SPINArgs}[recipe.stem.split("-")[0]](**config[recipe.stem.split("-")[0]])
    group.check()  # per-iteration lists match the iterations, values in range
    if hasattr(group, "check_with"):
        group.check_with(args)
    variant = recipe.stem.rsplit("-", 1)[1]
    assert variant in ("full", "lora", "qlora", "paper")
    assert (model["lora"] is None) == (variant in ("full", "paper"))
    assert (model["quantize"] == "4bit") == (variant == "qlora")
    if variant == "qlora":
        assert not model["lora"]["merge_on_export"]  # a 4-bit base cannot be merged
        assert train["optimizer"].startswith("paged_")  # paged optimizer state rides out memory spikes
    if config["strategy"] == "fsdp":
        assert train["optimizer"] in ("adamw", "rmsprop")  # bitsandbytes optimizers refuse FSDP2's DTensors
    # Full fine-tuning of a 7-8B model needs its state sharded over 8 GPUs, with activation checkpointing.
    big_full = model["lora"] is None and any(size in recipe.stem for size in ("7b", "8b"))
    assert (world == 8) == big_full and (config["strategy"] == "fsdp") == big_full
    assert model["activation_checkpointing"] is True or not big_full
    on_cpu = "Hardware: CPU" in header(recipe)
    assert config["precision"] in PRECISIONS and (config["precision"] == "32-true") == on_cpu
    assert config["data"]["val_path"] not in (None, "auto")  # real data validates on its own held-out split
    if variant == "paper":
        spin_args = config["spin"]
        assert spin_args["reuse_generated"] and spin_args["answer_turn"] == "first" and spin_args["mix_previous"]
        assert train["optimizer"] == "rmsprop" and train["schedule"] == "linear" and train["weight_decay"] == 0
        assert train["global_batch_size"] == 64 and spin_args["temperature"] == 1.0


@pytest.mark.parametrize(
    ("recipe", "overrides", "metric", "better"),
    [
        ("kto-tiny.yaml", ["--train.max_steps=4", "--train.eval_interval=4"], "val/rewards/margins", max),
        (
            "spin-tiny.yaml",
            ["--spin.iterations=1", "--spin.epochs_per_iteration=1", "--spin.max_new_tokens=8", "--spin.beta=[0.1]"],
            "val/nll",
            min,
        ),
    ],
)
def test_tiny_recipe_trains(recipe: str, overrides: list[str], metric: str, better: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = REPO / "recipes" / recipe
    run_cli(
        entry(recipe).setup, [f"--config={path}", *FAST, "--train.save_interval=null", *overrides, f"--out_dir={out}"]
    )
    values = column(read_metrics(out), metric)
    assert len(values) >= 2  # before the first step and at the end
    assert better(values[0], values[-1]) == values[-1] != values[0]  # the validation metric moved the right way
    assert (out / "final" / "model.safetensors").is_file()


def test_paper_recipe_runs_one_short_iteration_on_the_tiny_model(tmp_path: Path) -> None:
    """recipes/spin-zephyr-7b-paper.yaml as it is, but for the model, the data (a local file in the authors' row form,
    since the hub is out of reach), the hardware and the length: one iteration on its released generations."""
    rows = []
    for i in range(16):
        user = {"role": "user", "content": f"question {i}?"}
        rows.append(
            {
                "real": [user, {"role": "assistant", "content": f"answer {i}."}],
                "generated": [user, {"role": "assistant", "content": f"guess {i}"}],
            }
        )
    data = tmp_path / "spin_iter0.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run_cli(
        spin.setup,
        [
            f"--config={REPO / 'recipes' / 'spin-zephyr-7b-paper.yaml'}",
            *FAST,
            "--model.name_or_path=fabric-align/tiny-llama",
            "--model.activation_checkpointing=false",
            f"--data.train_path={data}",
            "--data.val_path=null",
            "--devices=1",
            "--strategy=auto",
            "--precision=32-true",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=4",
            "--train.eval_batch_size=8",
            "--train.save_interval=null",
            "--spin.iterations=1",
            "--spin.lr=[5e-7]",
            "--spin.beta=0.1",
            "--spin.epochs_per_iteration=1",
            f"--out_dir={out}",
        ],
    )
    generated = [
        json.loads(line)["generated"] for line in (out / "iter-0" / "generations.jsonl").read_text().splitlines()
    ]
    assert generated == [f"guess {i}" for i in range(16)]
    rows = read_metrics(out)
    assert column(rows, "train/step") == [1, 2]
    assert max(column(rows, "train/lr")) <= 5e-7
    assert (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------- sweeps
def sweep_target(config: dict) -> tuple[ModuleType, Path]:
    """The entry script (``program``) and the recipe (``--config`` in ``command``) a sweep file runs."""
    words = [w for item in config["command"] for w in shlex.split(str(item).removeprefix("-S "))]
    configs = [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
    configs += [words[i + 1] for i, w in enumerate(words) if w == "--config"]
    assert len(configs) == 1, words
    assert config["program"] in words and (REPO / config["program"]).is_file()
    return entry(config["program"]), REPO / configs[0]


def agent_values(spec: dict) -> list[Any]:
    """Values the agent can pass for a parameter: each listed value, or the bounds of a distribution."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "min" in spec and "max" in spec:
        return [spec["min"], spec["max"]]
    if "mu" in spec:
        return [spec["mu"]]
    raise AssertionError(f"unhandled parameter spec {spec}")


SWEEP_CASES = [
    (path, name, value)
    for path in SWEEPS
    for name, spec in yaml.safe_load(path.read_text())["parameters"].items()
    for value in agent_values(spec)
]


def test_every_sweep_file_is_valid() -> None:
    sweeps = sweep._import_sweeps()
    names = {p.stem for p in SWEEPS}
    assert {"kto-beta-tiny", "spin-beta-tiny"} <= names
    for path in SWEEPS:
        config = yaml.safe_load(path.read_text())
        sweeps.SweepConfig({k: v for k, v in config.items() if k not in sweep.SERVER_ONLY_KEYS})  # W&B's schema
        assert config["metric"]["name"] in ("val/logps/chosen", "val/nll")  # beta-independent (see the files)
        assert "${args}" in config["command"] and config["command"][0] == "${env}"
        assert "${WANDB_RUN_ID}" in config["command"][1]  # each agent run its own out_dir
        module, recipe = sweep_target(config)
        assert recipe.is_file() and entry(path.name) is module


@pytest.mark.parametrize(
    ("path", "name", "value"), SWEEP_CASES, ids=lambda x: x.name if isinstance(x, Path) else str(x)
)
def test_sweep_parameter_parses_as_the_agent_passes_it(
    path: Path, name: str, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(path.read_text())
    module, recipe = sweep_target(config)
    fixed = {k: s["value"] for k, s in config["parameters"].items() if "value" in s}
    flags = sweep.agent_macros({**fixed, name: value})["args"]  # the agent's ${args}: --kto.beta=0.1
    parsed = printed(module.setup, [f"--config={recipe}", *flags], capsys)
    expected = yaml.safe_load(str(value)) if isinstance(value, str) else value
    assert by_path(parsed, name) == expected
    if module is spin and isinstance(parsed["spin"]["beta"], list):
        assert len(parsed["spin"]["beta"]) == parsed["spin"]["iterations"]


def test_agent_macros_match_the_wandb_agent() -> None:
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    params = {"kto.beta": 0.1, "spin.beta": "[0.1,0.2]", "on": True, "off": False, "n": 3, "xs": [0.1, 0.2]}
    theirs = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    ours = sweep.agent_macros(params)
    for key, value in ours.items():
        assert theirs[key] == value, key


STUB = """
import csv, json, math, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
out = args["out_dir"]
os.makedirs(os.path.join(out, "logs"))
params = json.load(open(sys.argv[1]))
assert float(args["x"]) == params["x"] and os.environ["WANDB_RUN_ID"] == os.path.basename(out)
assert args["logger.backend"] == "csv" and os.environ["WANDB_MODE"] == "offline" and args["tag"] == "extra"
if params["x"] > 0.95:
    print("error: x=0.99 is too large")  # the trainer's one line, then a launcher's report of the failed process
    print("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:")
    print("stub.py FAILED")
    sys.exit(3)
with open(os.path.join(out, "logs", "metrics.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerows([["step", "score", "other"], [0, -99, 1], [5, "", 2], [10, -(params["x"] - 0.3) ** 2, ""]])
"""


@pytest.mark.parametrize("method", ["grid", "bayes"])
def test_runner_feeds_each_runs_last_metric_back(method: str, tmp_path: Path) -> None:
    """With a stub program: macros expanded as the agent does, per-run out_dir and env, the last value of the
    metric read back, a failed run recorded as failed, and the best run picked by the goal."""
    (tmp_path / "stub.py").write_text(STUB)
    x = {"values": [0.1, 0.3, 0.99]} if method == "grid" else {"distribution": "uniform", "min": 0.0, "max": 0.5}
    config = {
        "method": method,
        "program": "stub.py",
        "metric": {"name": "score", "goal": "maximize"},
        "parameters": {"x": x},
        "command": ["${env}", "${interpreter}", "${program}", "${args_json_file}", "${args}"],
    }
    said: list[str] = []
    trials = sweep.run_sweep(
        config, count=3, sweep_dir=tmp_path / "sweep", cwd=tmp_path, extra_args=["--tag=extra"], log=said.append
    )
    assert [t.name for t in trials] == ["run-000", "run-001", "run-002"]
    if method == "grid":  # a failed run's own error line is shown, not the launcher's banner after it
        log_file = tmp_path / "sweep" / "run-002.log"
        assert f"[run-002] failed (exit code 3): error: x=0.99 is too large (all of its output: {log_file})" in said
    for t in trials:
        assert t.command[0] == "/usr/bin/env" and t.command[1] == sys.executable
        if t.params["x"] > 0.95:
            assert not t.ok and t.returncode == 3 and t.metric is None
        else:
            assert t.ok and t.metric == pytest.approx(-((t.params["x"] - 0.3) ** 2))
    if method == "grid":
        assert [t.params["x"] for t in trials] == [0.1, 0.3, 0.99]
    best = sweep.best_trial(trials, "maximize")
    assert best.metric == max(t.metric for t in trials if t.ok)


def test_sweep_paths_are_the_callers_and_bad_parameters_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relative --out-dir is the caller's directory, wherever --cwd runs the commands; a parameter spec W&B's
    schema refuses stops the sweep in one line before any run."""
    work, caller = tmp_path / "work", tmp_path / "caller"
    work.mkdir()
    caller.mkdir()
    (work / "stub.py").write_text(STUB)
    config = {
        "method": "grid",
        "program": "stub.py",
        "metric": {"name": "score", "goal": "maximize"},
        "parameters": {"x": {"values": [0.1, 0.3]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args_json_file}", "${args}"],
    }
    (caller / "s.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(caller)
    assert sweep.main(["s.yaml", "--out-dir=rel", f"--cwd={work}", "--", "--tag=extra"]) == 0
    summary = json.loads((caller / "rel" / "sweep.json").read_text())
    assert [r["ok"] for r in summary["runs"]] == [True, True] and not (work / "rel").exists()
    config["parameters"] = {"x": {"valuez": [0.1]}}
    (caller / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        SystemExit, match=r"^bad.yaml: not a valid W&B sweep: .* invalid hyperparameter configuration: x$"
    ):
        sweep.main(["bad.yaml", "--out-dir=bad"])
    assert not (caller / "bad").exists()


@pytest.mark.slow
def test_offline_sweep_of_the_tiny_kto_recipe(tmp_path: Path) -> None:
    """`python -m fabric_align.sweep` on the CI sweep file: three `fabric run` trainings, one per beta (shortened)."""
    out = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fabric_align.sweep",
            "recipes/sweeps/kto-beta-tiny.yaml",
            "--count=3",
            f"--out-dir={out}",
            "--",
            *FAST,
            "--train.max_steps=2",
            "--train.eval_interval=2",
            "--train.save_interval=null",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "sweep.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 3 and all(r["ok"] for r in runs)
    assert sorted(r["params"]["kto.beta"] for r in runs) == [0.05, 0.1, 0.3]
    best = max(runs, key=lambda r: r["metric"])
    assert summary["best"]["params"] == best["params"]
    assert f"best kto.beta: {best['params']['kto.beta']}" in result.stdout
    for r in runs:  # each run trained in its own directory, through the agent-style command
        assert column(read_metrics(Path(r["out_dir"])), "val/logps/chosen")[-1] == pytest.approx(r["metric"])
        assert (Path(r["out_dir"]) / "final" / "model.safetensors").is_file()


def test_runner_stops_a_run_that_times_out(tmp_path: Path) -> None:
    """The run, and the processes it started (its whole process group), stop at the timeout; the run counts as
    failed."""
    (tmp_path / "slow.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('child.pid', 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    config = {
        "method": "grid",
        "program": "slow.py",
        "metric": {"name": "score", "goal": "minimize"},
        "parameters": {"x": {"value": 1}},
    }
    start = time.perf_counter()
    (trial,) = sweep.run_sweep(config, count=None, sweep_dir=tmp_path / "s", cwd=tmp_path, timeout=3, log=lambda _: 0)
    assert time.perf_counter() - start < 30
    assert trial.returncode is None and not trial.ok
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the grandchild got SIGTERM with its group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").is_file() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break  # dead, waiting for init to reap it
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} still running")
