"""A run whose main process alone is SIGKILLed (the OOM killer's way) leaves no process behind,
and the next run ends its MLflow runs as KILLED instead of RUNNING forever."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import yaml

from conftest import REPO, alignflow


def test_sigkill_of_the_main_pid_leaves_nothing_behind(tmp_path):
    counter = tmp_path / "started.txt"
    spec = tmp_path / "crash.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "crash",
        "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 600, "seconds": 0.1,
                         "counter": str(counter)}},
    }))
    home = tmp_path / "home"
    env = {**os.environ, "ALIGNFLOW_HOME": str(home), "ALIGNFLOW_PLUGINS": "hostile_stages",
           "PYTHONPATH": str(REPO / "tests" / "plugins")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not counter.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert counter.exists(), "the stage never started"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "expected the temporary Prefect server"
        os.kill(proc.pid, signal.SIGKILL)  # the main pid only, not its group
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[p.cmdline()[:3] for p in alive]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    alignflow("run", spec, "--set", "stages.a.steps=1", home=home, env={"ALIGNFLOW_PLUGINS": "hostile_stages"},
              check=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crash").experiment_id
    runs = client.search_runs([experiment])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = {r.data.tags.get("alignflow.stage", "parent") for r in runs if r.info.status == "KILLED"}
    assert {"parent", "a"} <= killed, killed
