"""Runs at once: on a fresh home (MLflow's database and experiment created once, under a lock),
sharing keys (each computed once, shards included), and locks a dead holder cannot keep."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter

import yaml

from conftest import REPO
from flows.locks import CrashSafeLockManager, file_lock, try_flock


def test_three_runs_on_a_fresh_home_all_succeed_and_compute_each_key_once(tmp_path):
    counter, steps = tmp_path / "shards.txt", tmp_path / "steps.txt"
    spec = tmp_path / "three.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "three-at-once",  # a new experiment name, on a home with no database yet
        "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 12}},
        "stages": {"count": {"kind": "toy_shard_count", "data": "prompts", "shards": 3, "batch_size": 4,
                             "seconds": 1.0, "counter": str(counter)},
                   "after": {"kind": "toy_steps", "data": "count", "steps": 3, "counter": str(steps)}},
    }))
    env = {**os.environ, "ALIGNFLOW_HOME": str(tmp_path / "home"), "ALIGNFLOW_PLUGINS": "hostile_stages",
           "PYTHONPATH": str(REPO / "tests" / "plugins")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [r[1][-3000:] for r in results]
    shard_rows = Counter(line.split(" ", 1)[1] for line in counter.read_text().splitlines())
    assert shard_rows == {"(0, 4)": 1, "(4, 8)": 1, "(8, 12)": 1}, shard_rows
    assert len(steps.read_text().splitlines()) == 1


def test_a_dead_holders_lock_is_free_and_a_live_one_is_never_removed(tmp_path):
    code = ("import sys; from pathlib import Path; from flows.locks import CrashSafeLockManager; "
            f"m = CrashSafeLockManager(Path({str(tmp_path)!r})); m.acquire_lock('key', 'a'); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    manager = CrashSafeLockManager(tmp_path)
    for _ in range(3):  # cleanup of a live lock: the old manager's check-then-delete did it
        assert manager.is_locked("key")
        assert not manager.acquire_lock("key", "b", acquire_timeout=0.2)
    holder.kill()  # SIGKILL: no release
    holder.wait()
    assert manager.acquire_lock("key", "b", acquire_timeout=2)
    assert manager.is_lock_holder("key", "b") and not manager.is_lock_holder("key", "a")
    manager.release_lock("key", "b")
    assert not manager.is_locked("key")


def test_file_lock_excludes_threads_and_survives_racing_removal(tmp_path):
    path, inside, overlaps = tmp_path / "k.lock", [], []

    def worker():
        for _ in range(30):
            with file_lock(path):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and not path.exists()
    fd = try_flock(path)
    assert fd is not None and try_flock(path) is None
    os.close(fd)
