"""Stopping a run: Ctrl-C in a terminal (SIGINT to the whole process group), SIGTERM to the main
process (what `timeout` and schedulers send), a second Ctrl-C, and the Prefect server lost under
the run. The computing stage is cancelled at its next step and commits nothing, finished stages
are kept, MLflow says KILLED and Prefect Cancelled, one line says so, and nothing is left running."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from conftest import REPO, TINY_MODEL

PLUGINS = {"ALIGNFLOW_PLUGINS": "hostile_stages"}
STOP_S = 10  # the promise: a signal stops the run within this


def start(spec: Path, home: Path, env: dict | None = None) -> subprocess.Popen:
    """The real CLI in a session of its own, as a terminal runs it (its own process group)."""
    full_env = {**os.environ, "ALIGNFLOW_HOME": str(home), "PYTHONPATH": str(REPO / "tests" / "plugins"),
                **(env or {})}
    full_env.pop("PREFECT_API_URL", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec)], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stop_and_wait(proc: subprocess.Popen, send) -> tuple[int, str, float, list]:
    """Send the signal(s); return exit code, output, seconds to exit, and what it left running."""
    family = psutil.Process(proc.pid).children(recursive=True)
    sent = time.time()
    send()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with_group = [p for p in family if p.is_running()]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.time() - sent
    _, alive = psutil.wait_procs(with_group, timeout=10)
    return proc.returncode, out + err, seconds, alive


def prefect_flow_states(home: Path) -> list[str]:
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run")]


def mlflow_statuses(home: Path, experiment: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.data.tags.get("alignflow.stage", "parent"): r.info.status for r in runs}


def committed(home: Path, kind: str) -> list[Path]:
    return [p for p in (home / "store" / kind).glob("*") if (p / "manifest.json").is_file()]


def test_ctrl_c_to_the_group_stops_a_real_training(tmp_path):
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "ctrl-c",
        "models": {"base": TINY_MODEL},
        "datasets": {"sft_data": {"kind": "synthetic", "split": "sft", "size": 64}},
        "stages": {"sft": {"kind": "sft", "model": "base", "data": "sft_data", "max_steps": 100000,
                           "batch_size": 2}},
    }))
    home = tmp_path / "home"
    proc = start(spec, home)
    wait_for(lambda: any((home / "store" / "sft").glob(".tmp-*")), proc, "the training started")
    time.sleep(2)  # steps under way
    code, out, seconds, alive = stop_and_wait(proc, lambda: os.killpg(proc.pid, signal.SIGINT))

    assert code == 130, out[-3000:]
    assert seconds < STOP_S + 5, f"took {seconds:.1f}s to stop"  # 10 s promised; a busy machine's margin
    assert not alive, f"left running: {[p.cmdline()[:4] for p in alive]}"
    assert "Traceback" not in out and "EventsWorker" not in out and "ConnectError" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "SIGINT" in line]
    assert len(lines) == 1 and "stopped sft (nothing of it committed)" in lines[0] and "sft_data" in lines[0], out
    assert not committed(home, "sft"), "a cancelled stage commits nothing"
    assert committed(home, "synthetic"), "finished stages are kept"
    assert mlflow_statuses(home, "ctrl-c") == {"parent": "KILLED", "base": "FINISHED", "sft_data": "FINISHED", "sft": "KILLED"}
    assert prefect_flow_states(home) == ["CANCELLED"]


def toy_spec(tmp_path: Path, seconds: float, steps: int) -> tuple[Path, Path]:
    counter = tmp_path / "started.txt"
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "toy",
        "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 1, "seconds": 0},
                   "b": {"kind": "toy_steps", "data": "prompts", "steps": steps, "seconds": seconds,
                         "counter": str(counter), "after": "a"}},  # b computes after a, whichever thread wakes first
    }))
    return spec, counter


def test_sigterm_to_the_main_process_stops_the_run(tmp_path):
    spec, counter = toy_spec(tmp_path, seconds=0.1, steps=3000)
    home = tmp_path / "home"
    proc = start(spec, home, PLUGINS)
    wait_for(counter.exists, proc, "stage b started")
    code, out, seconds, alive = stop_and_wait(proc, lambda: os.kill(proc.pid, signal.SIGTERM))
    assert code == 143, out[-3000:]
    assert seconds < STOP_S + 5, f"took {seconds:.1f}s to stop"
    assert not alive and "Traceback" not in out, out[-3000:]
    assert "stopped by SIGTERM: stopped b (nothing of it committed); kept 2 finished stages: prompts, a" in out, out
    assert len(committed(home, "toy_steps")) == 1  # a, not b
    assert mlflow_statuses(home, "toy") == {"parent": "KILLED", "prompts": "FINISHED", "a": "FINISHED", "b": "KILLED"}
    assert prefect_flow_states(home) == ["CANCELLED"]


def test_a_stage_that_does_not_reach_a_step_is_abandoned_and_a_second_ctrl_c_stops_at_once(tmp_path):
    spec, counter = toy_spec(tmp_path, seconds=600, steps=2)  # one step lasts ten minutes
    home = tmp_path / "home"
    proc = start(spec, home, PLUGINS)
    wait_for(counter.exists, proc, "stage b started")
    code, out, seconds, alive = stop_and_wait(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert code == 130 and seconds < STOP_S + 5 and not alive, (code, seconds, out[-3000:])
    assert "stopped by SIGINT: stopped b (nothing of it committed)" in out, out
    assert mlflow_statuses(home, "toy")["b"] == "KILLED" and prefect_flow_states(home) == ["CANCELLED"]

    counter.unlink()
    proc = start(spec, home, PLUGINS)
    wait_for(counter.exists, proc, "stage b started again")

    def twice():
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)

    code, out, seconds, alive = stop_and_wait(proc, twice)
    assert code == 130 and seconds < 5 and not alive, (code, seconds, out[-3000:])
    assert len([line for line in out.splitlines() if "SIGINT" in line]) == 1, out
    assert not committed(home, "toy_steps") or len(committed(home, "toy_steps")) == 1  # a only, never b


def test_a_lost_prefect_server_fails_the_run_in_seconds(tmp_path):
    spec, counter = toy_spec(tmp_path, seconds=0.1, steps=3000)
    home = tmp_path / "home"
    proc = start(spec, home, PLUGINS)
    wait_for(counter.exists, proc, "stage b started")
    server = [p for p in psutil.Process(proc.pid).children() if "uvicorn" in " ".join(p.cmdline())]
    assert len(server) == 1
    code, out, seconds, alive = stop_and_wait(proc, server[0].kill)
    assert code == 1 and seconds < 30 and not alive, (code, seconds, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "Prefect server" in line and "error:" in line]
    assert len(lines) == 1 and "exited with code -9 under the run: stopped b (nothing of it committed)" in lines[0], out
    assert len(committed(home, "toy_steps")) <= 1  # never b
    assert mlflow_statuses(home, "toy")["b"] == "KILLED"
