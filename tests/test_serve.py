"""`alignflow serve`: scheduled runs on a real Prefect server, each adding a round and reusing the
finished ones; `rounds.fresh`: a new slice of prompts every round; and the errors a user can act on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import REPO, alignflow, small_demo, stage_runs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, env: dict, log) -> subprocess.Popen:
    # Its own process group: stopping it stops what it started (uvicorn, flow-run subprocesses).
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def served_spec(tmp_path, **rounds) -> str:
    path = small_demo(tmp_path, rounds=2, name="served")
    spec = yaml.safe_load(path.read_text())
    spec["rounds"].update(rounds)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def finished_parent_runs(home) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.status == "FINISHED"]
    return sorted(parents, key=lambda r: r.info.start_time)


def count_finished_parent_runs(home) -> int:
    """Read-only, straight from MLflow's sqlite file: an MLflow client would create the tables,
    racing the pipeline that is creating them."""
    import sqlite3

    if not (home / "mlflow.db").exists():
        return 0
    try:
        with sqlite3.connect(f"file:{home / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute(
                "SELECT count(*) FROM runs r WHERE r.status = 'FINISHED' AND NOT EXISTS "
                "(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId')"
            ).fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet, or locked for a moment
        return 0


@pytest.mark.slow  # a Prefect server's start and three scheduled runs, about a minute; .ci/run runs it
def test_serve_adds_a_round_per_scheduled_run_on_a_prefect_server(tmp_path):
    home, port = tmp_path / "home", free_port()
    env = {**os.environ, "ALIGNFLOW_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        env.pop(name, None)
    spec = served_spec(tmp_path, serve={"add": 1, "max": 2})
    processes = []
    try:
        with open(tmp_path / "server.log", "w") as server_log, open(tmp_path / "serve.log", "w") as serve_log:
            processes.append(start(["server", "--port", port, "--no-ui"], env, server_log))
            api = f"http://127.0.0.1:{port}/api"
            deadline = time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(f"{api}/health", timeout=2).close()
                    break
                except OSError:
                    assert time.time() < deadline and processes[0].poll() is None, (tmp_path / "server.log").read_text()
                    time.sleep(0.5)
            processes.append(start(["serve", spec, "--interval", "3"], {**env, "PREFECT_API_URL": api}, serve_log))
            deadline = time.time() + 600
            while count_finished_parent_runs(home) < 2:
                assert processes[1].poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
    finally:
        for process in reversed(processes):
            stop(process)

    first, second = finished_parent_runs(home)[:2]
    assert first.data.tags["alignflow.rounds"] == "1"
    assert second.data.tags["alignflow.rounds"] == "2"
    cache = {(r.data.tags["alignflow.stage"], r.data.tags["alignflow.round"]): r.data.tags["alignflow.cache"]
             for r in stage_runs(home, "served", second.info.run_id)}
    assert {c for (stage, r), c in cache.items() if r == "1"} == {"hit"}  # round 1: reused, not recomputed
    assert {c for (stage, r), c in cache.items() if r == "2"} == {"miss"}
    assert cache[("sft", "0")] == "hit"
    log = (tmp_path / "serve.log").read_text()
    assert "0 round(s) finished; this run covers 1" in log and "1 round(s) finished; this run covers 2" in log


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    result = alignflow("serve", served_spec(tmp_path), "--interval", "60", home=tmp_path / "home")
    assert result.returncode == 2
    assert "PREFECT_API_URL is not set" in result.stderr and "alignflow server" in result.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --cron EXPR and --interval SECONDS"),
    (["--interval", "5", "--cron", "0 2 * * *"], "exactly one of"),
    (["--interval", "-1"], "positive number of seconds"),
])
def test_serve_refuses_impossible_schedules(tmp_path, args, message):
    result = alignflow("serve", served_spec(tmp_path), *args, home=tmp_path / "home")
    assert result.returncode == 2 and message in result.stderr


def test_fresh_gives_each_round_its_own_prompts(tmp_path):
    """rounds.fresh: round r generates from rows (r-1)*n .. r*n-1 of the prompt table."""
    from tasks.tables import read_table

    home = tmp_path / "home"
    spec = served_spec(tmp_path, fresh={"train_prompts": 8})
    alignflow("run", spec, home=home, check=True, timeout=600)
    runs = {(r.data.tags["alignflow.stage"], r.data.tags["alignflow.round"]): r for r in stage_runs(home, "served")}
    prompts = read_table(runs[("train_prompts", "0")].data.tags["alignflow.uri"]).column("prompt").to_pylist()
    for r in (1, 2):
        generated = read_table(runs[("generate", str(r))].data.tags["alignflow.uri"])
        assert set(generated.column("prompt").to_pylist()) == set(prompts[(r - 1) * 8 : r * 8])
        assert runs[("train_prompts_slice", str(r))].data.metrics["start"] == (r - 1) * 8


@pytest.mark.parametrize("fresh, message", [
    ({"train_promts": 8}, "no dataset or stage named 'train_promts'"),
    ({"sft": 8}, "outputs a model; expected a table"),
    ({"rm_pairs": 8}, "no stage in rounds.repeat reads 'rm_pairs'"),
    ({"train_prompts": 0}, "at least 1"),
])
def test_fresh_names_a_table_the_rounds_read(tmp_path, fresh, message):
    result = alignflow("plan", served_spec(tmp_path, fresh=fresh), home=tmp_path / "home")
    assert result.returncode == 2 and message in result.stderr and "rounds.fresh" in result.stderr


def test_fresh_past_the_end_of_the_table_is_bad_input(tmp_path):
    result = alignflow("run", served_spec(tmp_path, fresh={"train_prompts": 12}), home=tmp_path / "home")
    assert result.returncode == 2
    assert "rows 13-24" in result.stderr and "the table has 16 rows" in result.stderr
