"""The small pure pieces of the loop, each against numbers worked out by hand: the learning-rate schedule, the metric
reduction, the launch settings."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from fabric_align.args import TrainArgs
from fabric_align.errors import ConfigError
from fabric_align.launch import CLUSTER_VARIABLES, resolve_launch
from fabric_align.metrics import ONE, MetricSpec, reduce_metrics
from fabric_align.optim import lr_at


# -------------------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_min_lr() -> None:
    args = TrainArgs(lr=1.0, min_lr=0.1, warmup_steps=3)
    assert [lr_at(s, args, 13) for s in range(3)] == [0.25, 0.5, 0.75]  # (s + 1) / (warmup + 1)
    assert lr_at(3, args, 13) == 1.0  # the peak right after warmup
    assert lr_at(8, args, 13) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi / 2) = 0
    assert lr_at(13, args, 13) == pytest.approx(0.1) and lr_at(20, args, 13) == pytest.approx(0.1)


def test_linear_constant_ratio_and_peak() -> None:
    linear = TrainArgs(lr=1.0, min_lr=0.0, schedule="linear", warmup_steps=99, warmup_ratio=0.2)
    # warmup_ratio replaces warmup_steps: ceil(0.2 x 12) = 3 steps, then a straight line to 0 at step 12.
    assert [lr_at(s, linear, 12) for s in (0, 2, 3, 6, 12)] == pytest.approx([0.25, 0.75, 1.0, 2 / 3, 0.0])
    assert lr_at(3, linear, 12, peak=0.5) == 0.5 and lr_at(6, linear, 12, peak=0.5) == pytest.approx(1 / 3)
    constant = TrainArgs(lr=2.0, schedule="constant", warmup_steps=1)
    assert [lr_at(s, constant, 10) for s in (0, 1, 9, 50)] == [1.0, 2.0, 2.0, 2.0]


# --------------------------------------------------------------------------------------------------- metrics
class OneRank:
    world_size, global_rank, device = 1, 0, torch.device("cpu")

    @staticmethod
    def all_reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        return tensor


SPEC = MetricSpec(means={"loss": "_examples", "kl": ONE, "reward": "count"}, sums=("count",), weights=("_examples",))


def part(loss: float, examples: float, kl: float, reward: float, count: float) -> dict[str, torch.Tensor]:
    values = {"loss": loss, "_examples": examples, "kl": kl, "reward": reward, "count": count}
    return {k: torch.tensor(v) for k, v in values.items()}


def test_means_are_weighted_sums_add_and_weights_stay_hidden() -> None:
    metrics = reduce_metrics(OneRank(), [part(1.0, 3, 0.2, 0.5, 2), part(2.0, 1, 0.4, -1.0, 0)], SPEC)  # type: ignore[arg-type]
    assert metrics == pytest.approx({"loss": (3 + 2) / 4, "kl": 0.3, "reward": 0.5, "count": 2.0})


def test_a_mean_over_nothing_is_omitted() -> None:
    metrics = reduce_metrics(OneRank(), [part(1.0, 2, 0.0, 0.0, 0)], SPEC)  # type: ignore[arg-type]
    assert "reward" not in metrics and metrics["count"] == 0


def test_undeclared_or_missing_metrics_are_errors() -> None:
    extra = part(1.0, 1, 0.0, 0.0, 1) | {"surprise": torch.tensor(1.0)}
    with pytest.raises(KeyError, match=r"undeclared \['surprise'\]"):
        reduce_metrics(OneRank(), [extra], SPEC)  # type: ignore[arg-type]
    missing = {k: v for k, v in part(1.0, 1, 0.0, 0.0, 1).items() if k != "kl"}
    with pytest.raises(KeyError, match=r"missing \['kl'\]"):
        reduce_metrics(OneRank(), [missing], SPEC)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neither a sum nor a weight"):
        MetricSpec(means={"loss": "_examples"})
    with pytest.raises(ValueError, match="must start with '_'"):
        MetricSpec(means={"loss": "examples"}, weights=("examples",))


# ---------------------------------------------------------------------------------------------------- launch
def test_launch_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LT_CLI_USED", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # as on a node of a cluster
    launch = resolve_launch("0,1,2", 2, "bf16-mixed", "fsdp")
    assert (launch.devices, launch.num_nodes, launch.world_size) == (3, 2, 6)
    assert launch.param_dtype == torch.float32  # mixed precision keeps fp32 masters
    kwargs = launch.fabric_kwargs()
    assert kwargs["devices"] == 3 and kwargs["precision"] == "bf16-mixed"
    assert type(kwargs["strategy"]).__name__ == "ModelParallelStrategy"
    assert resolve_launch(2, 1, "bf16-true", "ddp").param_dtype == torch.bfloat16
    for devices, message in ((0, "devices=0"), ("abc", "devices='abc'"), ("0,x", "devices='0,x'")):
        with pytest.raises(ConfigError, match=message):
            resolve_launch(devices, 1, None, "auto")
    with pytest.raises(ConfigError, match="precision='fp8'"):
        resolve_launch(1, 1, "fp8", "auto")
    with pytest.raises(ConfigError, match="num_nodes=0"):
        resolve_launch(1, 0, None, "auto")
    # Several nodes with nothing that makes a cluster: refused, rather than waiting for nodes that never come.
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        ConfigError, match="num_nodes=2 with no cluster around this process .* `fabric run --num-nodes 2"
    ):
        resolve_launch(1, 2, None, "auto")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert resolve_launch(1, 2, None, "auto").world_size == 2
    # A CPU has no fp16 autocast: 16-mixed runs, and is recorded, as bf16-mixed (what Fabric would run).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_launch(1, 1, "16-mixed", "auto").precision == "bf16-mixed"


def test_launch_under_fabric_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fabric run` decides devices, nodes and precision through LT_*; its --strategy fsdp means FSDP2 here; Fabric is
    then given its defaults, so its conflict check passes."""
    for name, value in {
        "LT_CLI_USED": "1",
        "LT_DEVICES": "4",
        "LT_NUM_NODES": "2",
        "LT_PRECISION": "bf16-mixed",
        "LT_STRATEGY": "fsdp",
        "LT_ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(name, value)
    launch = resolve_launch(1, 1, "32-true", "auto")
    assert (launch.world_size, launch.precision, launch.strategy) == (8, "bf16-mixed", "fsdp")
    assert launch.accelerator == "cpu"
    kwargs = launch.fabric_kwargs()
    assert (kwargs["devices"], kwargs["num_nodes"], kwargs["precision"]) == ("auto", 1, None)
    assert "LT_STRATEGY" not in os.environ  # taken, so Fabric does not pick its FSDP1 strategy
    # `fabric run` without --precision: the script's own (a recipe's) precision holds, not Fabric's 32-true.
    monkeypatch.delenv("LT_PRECISION")
    launch = resolve_launch(1, 1, "bf16-mixed", "auto")
    assert launch.fabric_kwargs()["precision"] == launch.precision == "bf16-mixed"


def test_kto_kl_is_not_pulled_to_zero_by_padding_parts() -> None:
    """A validation micro-batch of padding only (an uneven share over ranks) contributes nothing to z0's mean."""
    from fabric_align import kto

    real = {
        k: torch.tensor(v)
        for k, v in {
            "loss": 0.5,
            "_examples": 4.0,
            "kl": 0.3,
            "rewards/chosen": 0.1,
            "logps/chosen": -3.0,
            "rewards/rejected": -0.1,
            "logps/rejected": -4.0,
            "count/chosen": 2.0,
            "count/rejected": 2.0,
            "tokens": 40.0,
        }.items()
    }
    padding = {k: torch.zeros(()) for k in real}
    metrics = reduce_metrics(OneRank(), [real, padding], kto.KTO.metric_spec)  # type: ignore[arg-type]
    assert metrics["kl"] == pytest.approx(0.3) and metrics["loss"] == pytest.approx(0.5)


def test_the_os_error_behind_a_sharded_save() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    from fabric_align.checkpoints import os_error_in

    full = OSError(28, "No space left on device", "/out/.tmp-step-000006/state/__0_0.distcp")
    wrapped = CheckpointException("save failed", {1: (full, None)})
    assert os_error_in(wrapped) is full and os_error_in(full) is full
    assert os_error_in(CheckpointException("other", {0: (ValueError("x"), None)})) is None


def test_each_sweep_run_gets_a_free_rendezvous_port() -> None:
    from fabric_align.sweep import with_free_port

    item = with_free_port("fabric run fabric_align/kto.py --config=recipes/kto-tiny.yaml")
    port = int(item.split("--main-port=")[1].split()[0])
    assert item.startswith("fabric run --main-port=") and 0 < port < 65536
    assert with_free_port("fabric run --main-port=1234 x.py") == "fabric run --main-port=1234 x.py"
    assert with_free_port("python x.py") == "python x.py"


def test_rendezvous_ports_lie_outside_the_ephemeral_range_and_skip_taken_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port from bind(0) can go to another process's outgoing connection before rank 0 listens on it (a CI run
    failed with EADDRINUSE that way); ports below the kernel's ephemeral range are never handed out."""
    import random
    import socket

    from fabric_align import rendezvous

    low, high = rendezvous.ephemeral_range()
    ports = {rendezvous.free_port() for _ in range(20)}
    assert all(not low <= port <= high and rendezvous.is_free(port) for port in ports) and len(ports) > 1
    # Two processes seeded alike (each run seeds Python's random) still draw different ports.
    drawn = []
    for _ in range(2):
        random.seed(42)
        drawn.append([rendezvous.free_port() for _ in range(3)])
    assert drawn[0] != drawn[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert not rendezvous.is_free(busy)
        monkeypatch.setattr(rendezvous, "LOW", busy)
        monkeypatch.setattr(rendezvous, "HIGH", busy)
        monkeypatch.setattr(rendezvous, "ephemeral_range", lambda: (1, 2))
        assert rendezvous.free_port() != busy  # the only candidate is taken: the OS picks one


@pytest.mark.parametrize(("cluster", "devices", "strategy"), [(False, 2, "ddp"), (False, 1, "fsdp"), (True, 2, "ddp")])
def test_the_rendezvous_port_is_set_only_where_fabric_starts_the_processes(
    cluster: bool, devices: int, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python kto.py --devices 2`: Fabric starts the ranks, which inherit the port picked here; one FSDP rank sets up
    a process group as well. Under `srun` each rank is its own process and must keep SLURM's port, the same for all
    (a port each picked alone would differ)."""
    from lightning.fabric import Fabric

    from fabric_align.launch import resolve_launch

    for name in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so that what make_fabric sets is undone afterwards
        monkeypatch.delenv(name)
    if cluster:
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_ID": "1234"}
        slurm |= {"SLURM_JOB_NAME": "train", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}
        for name, value in slurm.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("SLURM_NODELIST", "node1")
    monkeypatch.setattr(Fabric, "launch", lambda self, *a, **k: None)
    fabric = resolve_launch(devices, 1, "32-true", strategy).make_fabric()
    if cluster:
        assert "MASTER_PORT" not in os.environ and fabric.strategy.cluster_environment.main_port == 15000 + 1234
    else:
        assert int(os.environ["MASTER_PORT"]) == fabric.strategy.cluster_environment.main_port < 32768


def test_lora_target_modules_as_names_or_a_pattern() -> None:
    """A string of plain names means those names (peft would full-match "q_proj" against whole module paths and find
    nothing); "all-linear" and regular expressions keep peft's meaning, checked against the model's modules."""
    from fabric_align.args import LoRAArgs, ModelArgs
    from fabric_align.modeling import check_model_structure, load_config

    names = LoRAArgs(target_modules="q_proj, v_proj")
    names.check()
    assert names.target_modules == ["q_proj", "v_proj"]
    for kept in ("all-linear", r".*\.(q|v)_proj"):
        lora = LoRAArgs(target_modules=kept)
        lora.check()
        assert lora.target_modules == kept
        model = ModelArgs(lora=lora)
        check_model_structure(model, load_config(model))  # matches modules: no error
    with pytest.raises(ConfigError, match="must not include the lm_head"):
        LoRAArgs(target_modules="lm_head").check()


def test_resume_names_input_files_that_changed(caplog: pytest.LogCaptureFixture) -> None:
    from fabric_align.trainer import warn_changed_inputs

    seen = {"data": {"train.jsonl": [100, 7]}, "model": "m"}
    with caplog.at_level(logging.WARNING, logger="fabric_align"):
        warn_changed_inputs(seen, {"data": {"train.jsonl": [100, 7]}, "model": "m"})
        assert caplog.text == ""
        warn_changed_inputs(seen, {"data": {"train.jsonl": [40, 9]}, "model": "m"})
    assert "changed since the checkpoint was written: train.jsonl (size or time)" in caplog.text


def test_kto_kl_pass_groups_pairs_by_length_and_keeps_padding_apart() -> None:
    """The KL pass regroups a rank's pairs by length (the same number of forwards of the same sizes); padding entries
    (-1, which run pair 0 and count for nothing) go last, together, and do not widen a group of short pairs."""
    import types

    from fabric_align.data import shard_by_length
    from fabric_align.kto import KTO, KTOData

    forwards: list[tuple[list[int], int]] = []

    def logps(self: object, sequences: list, indices: list[int]) -> tuple[torch.Tensor, None]:
        forwards.append((indices, max(len(sequences[i][0]) for i in indices)))
        return torch.ones(len(indices), 1), None

    recipe = types.SimpleNamespace(fabric=types.SimpleNamespace(device="cpu"))
    recipe._logps = types.MethodType(logps, recipe)
    kl = [([1] * 90, 1)] + [([1] * 10, 1)] * 4 + [([1] * 5, 1)]  # pair 0 is long, the last pair short
    data = KTOData("stub", kl, kl, torch.ones(len(kl), dtype=torch.bool), ref_kl_logps=torch.zeros(len(kl)))
    lengths = [len(ids) for ids, _ in kl]
    total = torch.zeros(2, dtype=torch.float64)
    for rank in range(2):
        forwards.clear()
        shares = shard_by_length(lengths, rank, 2, 2)
        total += KTO.kl_sum(recipe, data, shares)  # type: ignore[arg-type]
        assert [len(indices) for indices, _ in forwards] == [len(share) for share in shares]
        if any(-1 in share for share in shares):
            assert sorted(width for _, width in forwards) == [10, 90]  # short pairs together, padding apart
    assert total.tolist() == [6.0, 6.0]  # every pair once (r = 1 each), padding counts for nothing


def test_the_reference_cache_key_sees_weights_replaced_under_the_old_time(tmp_path: Path) -> None:
    """Weights swapped for others of the same size, the modification time set back (`cp -p`, `touch -r`, tar): the
    resume warning's fingerprint (sizes, times) cannot tell, the reference cache's key must."""
    from fabric_align.args import ModelArgs
    from fabric_align.modeling import model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    (model / "config.json").write_text("{}")
    args = ModelArgs(name_or_path=str(model))
    before = (model_fingerprint(args, 0), model_fingerprint(args, 0, exact=True))
    times = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert model_fingerprint(args, 0) == before[0]
    assert model_fingerprint(args, 0, exact=True) != before[1]


def test_a_cut_list_of_names_says_how_many_it_leaves_out() -> None:
    from fabric_align.trainer import some_of

    assert (
        some_of(["final", "step-000002", "step-000004", "step-000006"]) == "final, step-000002, step-000004 and 1 more"
    )
    assert some_of(["final"]) == "final"
