"""End to end through the real CLI, Prefect and MLflow, on the demo's graph at tiny sizes.

The tests in this module share one store and run in order: a cold run, then runs that must reuse it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, alignflow, small_demo, stage_runs

EXPERIMENT = "demo-small"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    home, spec = root / "home", small_demo(root, rounds=2, name=EXPERIMENT)
    started = time.time()
    cold = alignflow("run", spec, home=home, check=True)
    return {"home": home, "spec": spec, "cold": cold, "cold_seconds": time.time() - started}


def plan_rows(demo, *args) -> list[dict]:
    out = alignflow("plan", demo["spec"], "--json", *args, home=demo["home"], check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def statuses(runs) -> dict[str, str]:
    return {f"{r.data.tags['alignflow.stage']}@{r.data.tags['alignflow.round']}": r.data.tags["alignflow.cache"]
            for r in runs}


def test_cold_run_records_every_stage(demo):
    runs = stage_runs(demo["home"], EXPERIMENT)
    rows = plan_rows(demo)
    assert len(runs) == len(rows) == 8 + 2 * 5
    assert set(statuses(runs).values()) == {"miss"}
    assert all(r["status"] == "fresh" for r in rows)
    evaluate = [r for r in runs if r.data.tags["alignflow.stage"] == "evaluate"]
    for run in evaluate:
        low, rate, high = (run.data.metrics[k] for k in ("win_rate_ci_low", "win_rate", "win_rate_ci_high"))
        assert 0 <= low <= rate <= high <= 1
    dpo = next(r for r in runs if r.data.tags["alignflow.stage"] == "dpo")
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert name in dpo.data.metrics, name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo['home'] / 'mlflow.db'}")
    history = client.get_metric_history(dpo.info.run_id, "loss")
    assert len(history) >= 2, "training metrics over steps"
    manifest = json.loads((Path(dpo.data.tags["alignflow.uri"]) / "manifest.json").read_text())
    for name in ("loss", "rewards/accuracies"):  # MLflow's latest value is the stage's final summary
        assert dpo.data.metrics[name] == pytest.approx(manifest["metrics"][name])
    parent = client.get_run(dpo.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["alignflow.flow_run_id"] and parent.data.tags["alignflow.spec_hash"]
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def prefect_task_runs(home: Path, flow_run_id: str) -> dict[str, str]:
    """Task run name -> state name of one flow run, read from the Prefect database the run's
    temporary server kept under the home (read directly: no server needed to look)."""
    import contextlib
    import sqlite3

    db = home / "prefect" / "prefect.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return dict(conn.execute("SELECT name, state_name FROM task_run WHERE flow_run_id = ?", (flow_run_id,)))


def test_second_run_runs_nothing(demo):
    started = time.time()
    out = alignflow("run", demo["spec"], home=demo["home"], check=True,
                    env={"ALIGNFLOW_TIMINGS": str(demo["home"] / "timings.json")})
    warm = time.time() - started
    assert "0 ran" in out.stderr
    runs = stage_runs(demo["home"], EXPERIMENT)
    assert set(statuses(runs).values()) == {"hit"} and len(runs) == 8 + 2 * 5
    # ... and in Prefect: the run's flow run has a task run per stage, each answered from the cache.
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(f"sqlite:///{demo['home'] / 'mlflow.db'}").get_run(runs[0].data.tags["mlflow.parentRunId"])
    tasks = prefect_task_runs(demo["home"], parent.data.tags["alignflow.flow_run_id"])
    assert len(tasks) == len(runs) and set(tasks.values()) == {"Cached"}, tasks
    assert warm < demo["cold_seconds"], (warm, demo["cold_seconds"])
    phases = json.loads((demo["home"] / "timings.json").read_text())
    assert phases["stages"] == len(runs) and phases["flow"] < phases["total"]
    print(f"cold {demo['cold_seconds']:.1f}s, warm {warm:.1f}s; phases {phases}")


def test_plan_explains_what_changed(demo):
    rows = plan_rows(demo, "--set", "stages.evaluate.seed=7")
    stale = {(r["stage"], r["round"]) for r in rows if r["status"] != "fresh"}
    assert stale == {("evaluate", 1), ("evaluate", 2)}
    assert all("seed: 0 -> 7" in r["reason"] for r in rows if r["status"] == "stale")
    rows = plan_rows(demo, "--set", "stages.dpo.beta=0.2")
    stale = [(r["stage"], r["round"]) for r in rows if r["status"] != "fresh"]
    assert stale[0] == ("dpo", 1) and all(r["status"] == "stale" for r in rows if r["round"] >= 2)
    assert ("pairs", 1) not in stale and ("generate", 1) not in stale
    dpo1 = next(r for r in rows if (r["stage"], r["round"]) == ("dpo", 1))
    assert "beta: 0.1 -> 0.2" in dpo1["reason"]


def test_changed_seed_reruns_only_those_stages(demo):
    alignflow("run", demo["spec"], "--set", "stages.evaluate.seed=7", home=demo["home"], check=True)
    cache = statuses(stage_runs(demo["home"], EXPERIMENT))
    assert {k for k, v in cache.items() if v == "miss"} == {"evaluate@1", "evaluate@2"}


def test_deleted_and_truncated_artifacts_are_recomputed(demo):
    import shutil

    rows = {(r["stage"], r["round"]): r for r in plan_rows(demo)}
    store = demo["home"] / "store"
    shutil.rmtree(store / "score" / rows["score", 1]["key"])
    pairs_data = store / "pairs" / rows["pairs", 2]["key"] / "data.parquet"
    with open(pairs_data, "r+b") as f:
        f.truncate(pairs_data.stat().st_size // 2)
    after = {(r["stage"], r["round"]): r for r in plan_rows(demo)}
    assert after["score", 1]["status"] == "missing" and "deleted" in after["score", 1]["reason"]
    assert after["pairs", 2]["status"] == "missing" and "damaged" in after["pairs", 2]["reason"]
    alignflow("run", demo["spec"], home=demo["home"], check=True)
    cache = statuses(stage_runs(demo["home"], EXPERIMENT))
    assert {k for k, v in cache.items() if v == "miss"} == {"score@1", "pairs@2"}
    assert all(r["status"] == "fresh" for r in plan_rows(demo))


def test_force_recomputes_stage_and_downstream(demo):
    alignflow("run", demo["spec"], "--force", "dpo", home=demo["home"], check=True)
    cache = statuses(stage_runs(demo["home"], EXPERIMENT))
    assert {k for k, v in cache.items() if v == "miss"} == {
        "dpo@1", "evaluate@1", "generate@2", "score@2", "pairs@2", "dpo@2", "evaluate@2"}


def test_sigkill_mid_stage_then_resume(demo):
    # Change SFT so it and everything after it must run, kill the run while SFT is training.
    args = ["run", demo["spec"], "--set", "stages.sft.epochs=30"]
    env = {**os.environ, "ALIGNFLOW_HOME": str(demo["home"])}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sft_dir = demo["home"] / "store" / "sft"
    deadline = time.time() + 120
    while time.time() < deadline and not list(sft_dir.glob(".tmp-*")):
        time.sleep(0.2)
    assert list(sft_dir.glob(".tmp-*")), "the SFT stage never started"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = {(r["stage"], r["round"]): r["status"] for r in plan_rows(demo, "--set", "stages.sft.epochs=30")}
    assert rows["sft", 0] == "stale" and rows["base", 0] == "fresh"
    out = alignflow(*args, home=demo["home"], check=True, timeout=600)
    assert "done" in out.stderr
    cache = statuses(stage_runs(demo["home"], EXPERIMENT))
    assert cache["base@0"] == cache["sft_data@0"] == cache["reward_model@0"] == "hit"
    assert cache["sft@0"] == "miss"
    assert not list(sft_dir.glob(".tmp-*")), "the killed run's partial folder was swept"


def test_failing_stage_exits_1_and_keeps_finished_work(tmp_path):
    spec = tmp_path / "fail.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "fail-test",
        "datasets": {"prompts": {"kind": "synthetic", "task": "demo", "split": "prompts", "size": 8}},
        "stages": {"boom": {"kind": "toy_fail", "data": "prompts"}},
    }))
    home = tmp_path / "home"
    out = alignflow("run", spec, home=home, env={"ALIGNFLOW_PLUGINS": "toy_stages"})
    assert out.returncode == 1, out.stderr
    assert "stage 'boom'" in out.stderr and "failing on purpose" in out.stderr
    assert "Traceback" in out.stderr  # a failure in code gets its traceback, to debug it
    rows = [json.loads(l) for l in alignflow("plan", spec, "--json", home=home, env={"ALIGNFLOW_PLUGINS": "toy_stages"},
                                             check=True).stdout.splitlines()]
    assert {r["stage"]: r["status"] for r in rows} == {"prompts": "fresh", "boom": "missing"}
    status = {r.data.tags["alignflow.stage"]: r.info.status for r in stage_runs(home, "fail-test")}
    assert status == {"prompts": "FINISHED", "boom": "FAILED"}


def test_malformed_dataset_exits_2_naming_file_and_line(tmp_path):
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d"}\n')
    spec = tmp_path / "data.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "bad-data",
        "datasets": {"prefs": {"kind": "jsonl", "path": "prefs.jsonl"}},  # relative to the spec
        "stages": {"boom": {"kind": "toy_fail", "data": "prefs"}},
    }))
    home = tmp_path / "home"
    out = alignflow("run", spec, home=home, env={"ALIGNFLOW_PLUGINS": "toy_stages"})
    assert out.returncode == 2, out.stderr
    assert f"{tmp_path / 'prefs.jsonl'}: line 2: a value for 'chosen'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not [p for p in (home / "store").rglob("*") if p.parent.name == "jsonl"], "no half-written table"


def test_two_runs_needing_one_key_compute_it_once(tmp_path):
    counter = tmp_path / "executions.txt"
    spec = tmp_path / "slow.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "lock-test",
        "datasets": {"prompts": {"kind": "synthetic", "task": "demo", "split": "prompts", "size": 8}},
        "stages": {"slow": {"kind": "toy_slow_count", "data": "prompts", "seconds": 4, "counter": str(counter)}},
    }))
    home = tmp_path / "home"
    build = alignflow("run", spec, home=home, env={"ALIGNFLOW_PLUGINS": "toy_stages"}, check=True)  # the dataset first
    assert build.returncode == 0
    counter.unlink()
    spec.write_text(spec.read_text().replace("seconds: 4", "seconds: 5"))  # a new key for `slow`
    env = {**os.environ, "ALIGNFLOW_HOME": str(home), "ALIGNFLOW_PLUGINS": "toy_stages",
           "PYTHONPATH": str(REPO / "tests" / "plugins")}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert len(counter.read_text().splitlines()) == 1, "the slow stage ran more than once"
