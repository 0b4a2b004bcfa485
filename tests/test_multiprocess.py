"""Training in several processes (tasks/train/launch.py, tasks/train/loop.py): `accelerate launch`
with 2 CPU processes (DDP over gloo) against one process at the same global batch; metrics streamed
to the parent while it runs; an interrupted launch resumes from its checkpoint; clear errors.

Tolerance, 1 vs 2 processes: the two compute the same global batches and the same global means,
so they differ only by float32 rounding (the sum of the two halves' gradients in another order,
each half padded to its own width): measured, at most ~1e-6 on the loss and ~3e-7 on a weight
over these runs. A real difference (a wrong batch, an unweighted mean of unequal halves, the
schedule stepped once per process, each process taking the whole batch) moves the loss by 1e-3 or
more within a few steps: the loss changes by ~1e-2 per step here. Hence 1e-4.
"""
from __future__ import annotations

import contextlib
import os
import sys

import psutil
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tasks import load_stage_kinds
from tasks.base import BadInput, Progress, StageContext
from tasks.train import launch
from tasks.train.loop import latest_checkpoint

TOLERANCE = 1e-4


class Stop(Exception):
    pass


def context(out, params: dict, inputs: dict, log: list, checkpoints=None, on_step=None, bars: list | None = None):
    """A StageContext whose log_metrics records (step, metrics) and calls on_step(step)."""
    def log_metrics(metrics, step):
        log.append((step, dict(metrics)))
        if on_step is not None:
            on_step(step)

    @contextlib.contextmanager
    def progress(description, total=None):
        if bars is not None:
            bars.append(description)
        yield Progress()

    kind = load_stage_kinds()[params["kind"]]
    out.mkdir(parents=True)
    return kind, StageContext(out=out, inputs=inputs, params=kind.params.model_validate(params), seed=0,
                              log_metrics=log_metrics, progress=progress, checkpoints=checkpoints)


def run(out, params: dict, inputs: dict, **kwargs):
    log: list = []
    kind, ctx = context(out, params, inputs, log, **kwargs)
    return kind.run(ctx), log


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_same_curve(log_one: list, log_two: list) -> None:
    assert [step for step, _ in log_two] == [step for step, _ in log_one]  # every step, once, in order
    for (step, one), (_, two) in zip(log_one, log_two):
        assert one.keys() == two.keys()
        for name in one:
            assert two[name] == pytest.approx(one[name], abs=TOLERANCE), f"step {step}: {name}"


def assert_same_weights(one, two) -> None:
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=TOLERANCE, rtol=0, msg=name)


def test_two_processes_follow_the_one_process_loss_curve(tiny_demo_model, demo_table, tmp_path):
    """SFT: its loss is a mean over response tokens, and the two halves of a batch hold different
    numbers of them. 145 examples in batches of 16: one batch of 1, where a process has no example."""
    params = {"kind": "sft", "model": "m", "data": "d", "epochs": 1.5, "lr": 1e-2, "batch_size": 16}
    inputs = {"model": tiny_demo_model, "data": demo_table("sft", 145)}
    one, one_metrics = run(tmp_path / "one", params, inputs)
    two, two_metrics = run(tmp_path / "two", {**params, "processes": 2}, inputs)
    assert len(one_metrics) == 15  # 10 steps an epoch, 1.5 epochs: a second epoch in another order
    assert_same_curve(one_metrics, two_metrics)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert two == pytest.approx(one, abs=TOLERANCE)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_an_interrupted_launch_resumes_from_its_checkpoint(tiny_demo_model, demo_table, tmp_path):
    """DPO with LoRA (its reference: the adapter disabled, through DDP's wrapper) on pairs in the
    shared-prompt layout. The first launch is stopped once a checkpoint exists, from the metrics
    callback: so metrics arrive while it trains. The second resumes: the first steps' metrics
    replayed, then the rest; its curve and weights are those of one uninterrupted process."""
    params = {"kind": "dpo", "policy": "p", "pairs": "x", "epochs": 2, "lr": 1e-2, "batch_size": 16,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "checkpoint_every": 4}
    inputs = {"policy": tiny_demo_model, "pairs": demo_table("preferences", 90)}  # 6 steps an epoch
    _, one = run(tmp_path / "one", params, inputs)
    assert len(one) == 12

    checkpoints = tmp_path / "checkpoints"
    family: set = set()

    def stop_after_a_checkpoint(step):
        family.update(psutil.Process().children(recursive=True))  # the launch's processes
        if latest_checkpoint(checkpoints) is not None:
            raise Stop(step)

    with pytest.raises(Stop) as stopped:
        run(tmp_path / "first", {**params, "processes": 2}, inputs, checkpoints=checkpoints, on_step=stop_after_a_checkpoint)
    assert stopped.value.args[0] < 12 and not (tmp_path / "first" / "model.safetensors").exists()
    assert not [p for p in family if alive(p)]  # the launch was stopped, its workers too
    resume_from = int(latest_checkpoint(checkpoints).name.split("-")[1])
    assert resume_from in (4, 8)

    bars: list = []
    metrics, two = run(tmp_path / "second", {**params, "processes": 2}, inputs, checkpoints=checkpoints, bars=bars)
    assert f"training (resumed after step {resume_from})" in bars
    assert_same_curve(one, two)  # steps 1..resume_from replayed from the checkpoint, then the rest
    assert_same_weights(tmp_path / "one", tmp_path / "second")
    assert metrics["loss"] == pytest.approx(sum(m["loss"] for s, m in one if s > 6) / 6, abs=TOLERANCE)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_one_process_resumes_exactly(group_by_length, tiny_demo_model, demo_table, tmp_path):
    """Stopped mid-epoch and resumed: bit for bit the uninterrupted run, dropout (LoRA's) included:
    the same batch order and the RNG states as they were."""
    params = {"kind": "dpo", "policy": "p", "pairs": "x", "epochs": 2.5, "lr": 1e-2, "batch_size": 16,
              "lora": {"r": 4, "dropout": 0.1}, "checkpoint_every": 3, "group_by_length": group_by_length}
    inputs = {"policy": tiny_demo_model, "pairs": demo_table("preferences", 70)}  # 5 steps an epoch, 13 in all
    whole, whole_log = run(tmp_path / "whole", params, inputs)

    def stop(step):
        if step == 8:
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path / "first", params, inputs, checkpoints=tmp_path / "ck", on_step=stop)
    assert latest_checkpoint(tmp_path / "ck").name == "step-6"  # taken at epoch 2's second batch
    resumed, resumed_log = run(tmp_path / "second", params, inputs, checkpoints=tmp_path / "ck")
    assert resumed == whole and resumed_log == whole_log
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "second" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_impossible_options_are_refused(tmp_path, monkeypatch):
    base = {"kind": "sft", "model": "m", "data": "d"}
    sft = load_stage_kinds()["sft"].params
    with pytest.raises(ValidationError, match=r"batch_size \(10\) is the global batch.*multiple of processes \(4\)"):
        sft.model_validate({**base, "batch_size": 10, "processes": 4})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        sft.model_validate({**base, "processes": 0})
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 4\n")
    with pytest.raises(ValidationError, match="says num_processes 4 but processes is 2"):
        sft.model_validate({**base, "processes": 2, "accelerate_config": str(config)})
    config.write_text("distributed_type: FSDP\nnum_machines: 2\n")
    with pytest.raises(ValidationError, match="num_machines 2: a stage trains on one machine"):
        sft.model_validate({**base, "processes": 2, "accelerate_config": str(config)})
    config.write_text("distributed_type: FSDP\nmain_process_port: 29999\n")
    params = sft.model_validate({**base, "processes": 2, "accelerate_config": "fsdp.yaml"}, context={"base_dir": str(tmp_path)})
    assert params.accelerate_config == str(config) and params.source_files() == [config]  # its content is in the key
    assert {"processes", "checkpoint_every"} <= type(params).not_in_key  # how it runs, not what it computes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="has no GPU"):
        launch.launch_command(2, str(config), tmp_path / "job.json")
    command, env = launch.launch_command(2, None, tmp_path / "job.json")
    assert env["ACCELERATE_USE_CPU"] == "true" and "--multi_gpu" in command and command[-3:] == ["--module", "tasks.train.launch", str(tmp_path / "job.json")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="processes: 4, but this machine has 2 GPUs"):
        launch.launch_command(4, None, tmp_path / "job.json")
    command, env = launch.launch_command(2, str(config), tmp_path / "job.json")
    assert "--config_file" in command and "--multi_gpu" not in command and "--main_process_port" not in command
    assert env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")  # NCCL on the GPUs


FAKE_LAUNCH = """
import json, sys
job = json.load(open(sys.argv[1]))
with open(job["events"], "a") as f:
    f.write(json.dumps({"event": "metrics", "step": 1, "metrics": {"loss": 2.5}}) + "\\n")
    if sys.argv[2] == "bad_input":
        f.write(json.dumps({"event": "error", "rank": 1, "type": "BadInput", "message": "m",
                            "file": "data.parquet", "field": "response", "expected": "a column"}) + "\\n")
sys.stderr.write("worker 1 exploded\\n")
sys.exit(3)
"""


@pytest.mark.parametrize("failure", ["crash", "bad_input"])
def test_a_failed_launch_fails_the_stage_with_its_cause(failure, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "launch_command",
                        lambda processes, config, job: ([sys.executable, "-c", FAKE_LAUNCH, str(job), failure], None))
    log: list = []
    kind, ctx = context(tmp_path / "out", {"kind": "sft", "model": "m", "data": "d", "processes": 2}, {}, log)
    if failure == "bad_input":  # the user's data, as from one process (exit code 2)
        with pytest.raises(BadInput, match="data.parquet: response: a column"):
            kind.run(ctx)
    else:
        with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*worker 1 exploded"):
            kind.run(ctx)
    assert log == [(1, {"loss": 2.5})]  # what came before the failure was forwarded
