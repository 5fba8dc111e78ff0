"""Run a W&B sweep file offline: no W&B server, no account, the same search algorithms.

    python -m fabric_align.sweep recipes/sweeps/kto-beta-tiny.yaml --count 3 [--out-dir DIR] [-- --train.max_steps=8]

Each run's parameters come from W&B's own sweep engine (the ``sweeps`` package: grid, random or bayes, whichever the
file's ``method`` says). The run is the file's ``command`` with the macros expanded as the W&B agent expands them
(``${env}``, ``${interpreter}``, ``${program}``, ``${args}`` and the other ``${args_*}`` forms, ``${envvar:NAME}``),
with ``WANDB_RUN_ID`` set to the run's name, and with these appended: ``--out_dir=DIR/run-NNN`` (each run its own
directory), ``--logger.backend=csv`` (``--wandb``: ``both``, with W&B offline), then whatever follows ``--``. When
the run ends, the sweep metric's last value in ``DIR/run-NNN/logs/metrics.csv`` goes back to the search, as the W&B
server does with a run's summary. At the end a table of runs and the best run are printed, and ``DIR/sweep.json``
records them. Each run's output is in ``DIR/run-NNN.log``.

Differences from ``wandb agent``: runs happen one after another in the working directory ``--cwd``;
``${interpreter}`` is this Python (``sys.executable``, whose directory also leads ``PATH`` so that ``fabric`` is the
one installed beside it) where the agent writes ``python``; ``${envvar:NAME}`` reads the run's environment (the agent
reads its own, before it sets ``WANDB_RUN_ID``); ``early_terminate`` is ignored (every run goes to its end).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from fabric_align.rendezvous import free_port

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
SERVER_ONLY_KEYS = ("run_cap",)  # W&B's server reads these; the sweeps package's schema (0.2) does not know them
ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


# ------------------------------------------------------------------------------------------------- the agent's side
def plain(value: Any) -> Any:
    """A sweep value as the agent receives it from the server (JSON): numpy scalars become Python numbers."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value.item() if hasattr(value, "item") else value


def agent_macros(params: dict[str, Any]) -> dict[str, list[str]]:
    """The ``${args*}`` expansions of the W&B agent for one run's parameters: each value is formatted with ``str``
    (``--kto.beta=0.1``, ``--spin.beta=[0.1, 0.2]``, ``--flag=True``)."""
    args, no_equals, no_hyphens, no_booleans, hydra_append, hydra_override = [], [], [], [], [], []
    for name, value in params.items():
        flag = f"{name}={value}"
        args.append(f"--{flag}")
        no_hyphens.append(flag)
        no_equals += [f"--{name}", str(value)]
        hydra_append.append(f"+{flag}")
        hydra_override.append(f"++{flag}")
        if isinstance(value, bool):
            if value:
                no_booleans.append(f"--{name}")
        else:
            no_booleans.append(f"--{flag}")
    return {
        "args": args,
        "args_no_equals": no_equals,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_json": [json.dumps(params)],
        "args_append_hydra": hydra_append,
        "args_override_hydra": hydra_override,
    }


def expand_command(
    command: Sequence[Any] | None,
    params: dict[str, Any],
    *,
    program: str | None,
    interpreter: str,
    args_json_file: Path,
    environ: dict[str, str],
) -> list[str]:
    """The argv the W&B agent would run: ``${envvar:NAME}`` is replaced inside any item; an item that is a whole
    ``${macro}`` becomes the macro's list (unknown macros vanish, as with the agent); other items stay as they are."""
    macros = agent_macros(params)
    macros.update(
        interpreter=[interpreter],
        program=[program] if program else [],
        args_json_file=[str(args_json_file)],
        env=[] if os.name == "nt" else ["/usr/bin/env"],
    )
    argv: list[str] = []
    for item in command or DEFAULT_COMMAND:
        item = ENVVAR_MACRO.sub(lambda m: environ.get(m.group(1), m.group(1)), str(item))
        if item.startswith("${") and item.endswith("}"):
            argv += macros.get(item[2:-1]) or []
        else:
            argv.append(item)
    return argv


def with_free_port(item: str) -> str:
    """``fabric run`` with a free rendezvous port unless one is given: its default (29400) may be taken by another
    program or another sweep on the machine, and torchrun binds it even for one process."""
    if "fabric run" not in item or re.search(r"--main[-_]port", item):
        return item
    return item.replace("fabric run", f"fabric run --main-port={free_port()}", 1)


def read_metric(path: Path, name: str) -> float | None:
    """The last logged value of ``name`` in a metrics.csv (None when the file or the value is missing)."""
    if not path.is_file():
        return None
    value = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(name) not in (None, ""):
                value = float(row[name])
    return value if value is None or math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------- the sweep
@dataclass
class Trial:
    name: str
    params: dict[str, Any]
    out_dir: str
    command: list[str]
    returncode: int | None
    metric: float | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.metric is not None


def load_sweep(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "parameters" not in config or "method" not in config:
        raise SystemExit(f"{path}: not a W&B sweep file (needs 'method' and 'parameters')")
    if "metric" not in config or "name" not in config["metric"]:
        raise SystemExit(f"{path}: needs 'metric: {{name: ..., goal: ...}}' to compare runs offline")
    sweeps = _import_sweeps()
    try:  # W&B's own schema, checked before any run starts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sweeps.SweepConfig({k: v for k, v in config.items() if k not in SERVER_ONLY_KEYS})
    except Exception as err:  # jsonschema's ValidationError, with the sweep engine's explanation on its lines
        reason = "; ".join(line.strip() for line in str(getattr(err, "message", err)).splitlines() if line.strip())
        raise SystemExit(f"{path}: not a valid W&B sweep: {reason}") from None
    return config


def _import_sweeps() -> Any:
    try:
        with warnings.catch_warnings():  # sweeps 0.2 declares pydantic v1-style models
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError as err:
        raise SystemExit(
            "the offline sweep runner needs W&B's sweep engine: pip install 'fabric-align[sweep]'"
        ) from err
    return sweeps


def run_sweep(
    config: dict[str, Any],
    *,
    count: int | None,
    sweep_dir: Path,
    cwd: Path,
    extra_args: Sequence[str] = (),
    wandb: bool = False,
    timeout: float | None = None,
    log: Any = print,
) -> list[Trial]:
    """Ask the search for a run, run it, report its metric back; ``count`` times (grid: until exhausted)."""
    sweeps = _import_sweeps()
    metric = config["metric"]["name"]
    if config["method"] != "grid" and count is None:
        count = config.get("run_cap")
        if count is None:
            raise SystemExit(f"method {config['method']!r} never runs out of suggestions: pass --count")
    if config.get("run_cap") is not None and count is not None:
        count = min(count, int(config["run_cap"]))
    if "early_terminate" in config:
        log("note: early_terminate is ignored offline; every run goes to its end")
    engine_config = {k: v for k, v in config.items() if k not in SERVER_ONLY_KEYS}
    if sweep_dir.is_dir() and any(sweep_dir.glob("run-*")):
        raise SystemExit(f"{sweep_dir} already holds a sweep's runs: choose another --out-dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SWEEP")}
    base_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base_env.get("PATH", "")])
    base_env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    runs: list[Any] = []
    trials: list[Trial] = []
    index = 0
    while count is None or index < count:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suggestion = sweeps.next_run(engine_config, runs, validate=True)
        if suggestion is None:  # a grid with every point done
            break
        params = {name: plain(spec["value"]) for name, spec in suggestion.config.items()}
        name = f"run-{index:03d}"
        out_dir = sweep_dir / name
        env = dict(base_env, WANDB_RUN_ID=name)
        args_json_file = sweep_dir / f"{name}.args.json"
        args_json_file.write_text(json.dumps(params))
        argv = expand_command(
            config.get("command"),
            params,
            program=config.get("program"),
            interpreter=sys.executable,
            args_json_file=args_json_file,
            environ=env,
        )
        argv = [with_free_port(item) for item in argv]
        argv += [f"--out_dir={out_dir}", f"--logger.backend={'both' if wandb else 'csv'}", *extra_args]
        log(f"[{name}] {' '.join(f'{k}={v}' for k, v in params.items())}")
        start = time.perf_counter()
        log_file = sweep_dir / f"{name}.log"
        with log_file.open("w") as out:
            out.write(" ".join(argv) + "\n\n")
            out.flush()
            returncode = run_command(argv, cwd=cwd, env=env, out=out, timeout=timeout)
        value = read_metric(out_dir / "logs" / "metrics.csv", metric)
        trial = Trial(name, params, str(out_dir), argv, returncode, value, time.perf_counter() - start)
        trials.append(trial)
        if trial.ok:
            suggestion.state = sweeps.RunState.finished
            suggestion.summary_metrics = {metric: value}
            suggestion.history = [{metric: value}]
            log(f"[{name}] {metric} = {value:.6g} ({trial.seconds:.0f} s)")
        else:
            suggestion.state = sweeps.RunState.failed
            why = "timed out" if returncode is None else f"exit code {returncode}"
            if returncode == 0:
                why = f"no {metric} in {out_dir / 'logs' / 'metrics.csv'}"
            lines = log_file.read_text(errors="replace").splitlines()
            # The trainer's own one-line error, not the launcher's report that follows it (fabric run's banner).
            errors = [line for line in lines if re.match(r"(\[rank \d+\] )?error: ", line)]
            if errors:
                log(f"[{name}] failed ({why}): {errors[0]} (all of its output: {log_file})")
            else:
                tail = "\n".join(f"    {line}" for line in lines[-15:])
                log(f"[{name}] failed ({why}); end of {log_file}:\n{tail}")
        suggestion.name = name
        runs.append(suggestion)
        index += 1
    return trials


def run_command(argv: list[str], *, cwd: Path, env: dict[str, str], out: Any, timeout: float | None) -> int | None:
    """Run one training command in its own process group (``fabric run`` starts a launcher and its workers), so that
    a timeout or Ctrl-C stops all of them; None when it timed out."""
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as err:  # the command itself could not start
        out.write(f"\n{err}\n")
        return 127
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return None
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    if os.name == "nt":  # no process groups to signal
        proc.kill()
        proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def best_trial(trials: Sequence[Trial], goal: str) -> Trial | None:
    done = [t for t in trials if t.ok]
    if not done:
        return None
    pick = max if goal == "maximize" else min
    return pick(done, key=lambda t: t.metric)


def format_table(trials: Sequence[Trial], metric: str) -> str:
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    header = ["run", *names, metric, "status", "time"]
    rows = [
        [
            t.name,
            *(str(t.params.get(k, "")) for k in names),
            f"{t.metric:.6g}" if t.metric is not None else "-",
            "ok" if t.ok else "failed",
            f"{t.seconds:.0f}s",
        ]
        for t in trials
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m fabric_align.sweep",
        description="Run a W&B sweep file offline with W&B's search algorithms. Arguments after `--` are appended "
        "to every run's command (e.g. -- --train.max_steps=8).",
    )
    parser.add_argument("sweep_file", type=Path, help="a W&B sweep YAML, e.g. recipes/sweeps/kto-beta-tiny.yaml")
    parser.add_argument("--count", type=int, default=None, help="runs to make (default: a grid's size, or run_cap)")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default: out/sweeps/<file name>-<time>, in the current directory"
    )
    parser.add_argument("--cwd", type=Path, default=Path.cwd(), help="directory to run the commands in")
    parser.add_argument("--wandb", action="store_true", help="also log each run to W&B, offline (default: CSV only)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take before it is stopped")
    args = parser.parse_args(argv)
    config = load_sweep(args.sweep_file)
    # Relative to this directory, once: the runs execute in --cwd, the metric and logs are read here.
    sweep_dir = args.out_dir or Path("out") / "sweeps" / f"{args.sweep_file.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = sweep_dir.absolute()
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "minimize")
    print(f"sweep {args.sweep_file} ({config['method']}, {goal} {metric}) -> {sweep_dir}", flush=True)
    trials = run_sweep(
        config,
        count=args.count,
        sweep_dir=sweep_dir,
        cwd=args.cwd,
        extra_args=extra,
        wandb=args.wandb,
        timeout=args.timeout,
        log=lambda line: print(line, flush=True),
    )
    best = best_trial(trials, goal)
    print()
    print(format_table(trials, metric))
    print()
    if best is None:
        print(f"no run produced {metric}")
    else:
        print(
            f"best: {best.name}  "
            + "  ".join(f"{k}={v}" for k, v in best.params.items())
            + f"  {metric}={best.metric:.6g}"
        )
        for key, value in best.params.items():
            if key.rsplit(".", 1)[-1] == "beta":
                print(f"best {key}: {value}")
    summary = {
        "sweep_file": str(args.sweep_file),
        "method": config["method"],
        "metric": {"name": metric, "goal": goal},
        "runs": [{k: v for k, v in asdict(t).items() if k != "command"} | {"ok": t.ok} for t in trials],
        "best": asdict(best) if best else None,
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2))
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
