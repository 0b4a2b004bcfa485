"""Local state that is damaged or busy: a damaged MLflow database is exit 2 naming it and how to
recover; one whose first set-up died half-way is made again; a run waiting on another's lock says
whose it is."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, alignflow
from flows import locks
from flows.tracking import DamagedDatabase, Tracker, open_local_store

PLUGINS = {"ALIGNFLOW_PLUGINS": "hostile_stages"}


def toy_spec(tmp_path):
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "toy", "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 1, "seconds": 0}}}))
    return spec


def test_a_truncated_mlflow_db_is_exit_2_naming_it_and_how_to_recover(tmp_path):
    home = tmp_path / "home"
    spec = toy_spec(tmp_path)
    alignflow("run", spec, home=home, env=PLUGINS, check=True)
    db = home / "mlflow.db"
    with sqlite3.connect(db) as connection:  # the log folded in, as after a clean exit
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    for command in (["run", spec], ["compare", spec]):
        result = alignflow(*command, home=home, env=PLUGINS)
        out = " ".join(result.stderr.split())
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"MLflow's database {db} is damaged (cut short" in out and f"mv {db} {db}.damaged" in out


def test_a_database_whose_set_up_died_half_way_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path))
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as connection:  # what a full disk left in a migration, before this was atomic
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER)")
        connection.execute("CREATE TABLE _alembic_tmp_trace_tags (key TEXT)")
    tracker = Tracker(f"sqlite:///{db}", "again")
    run = tracker.start_run("r", {})
    tracker.end(run)
    assert tracker.client.get_run(run).info.status == "FINISHED"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".mlflow.db.")) == []  # nothing beside it

    with sqlite3.connect(db) as connection:  # with runs in it, it is not ours to throw away
        connection.execute("CREATE TABLE _alembic_tmp_runs (key TEXT)")
    with pytest.raises(DamagedDatabase, match="a schema migration did not finish"):
        open_local_store(f"sqlite:///{db}")


def test_a_run_waiting_on_a_lock_says_whose_it_is(tmp_path, monkeypatch, capsys):
    lock = tmp_path / "dpo.key.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.argv = ['alignflow', 'run', 'other.yaml']; "
         "from pathlib import Path; from flows.locks import file_lock\n"
         f"with file_lock(Path({str(lock)!r})):\n    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(locks, "WAIT_NOTE_S", 0.3)
        from flows.console import console

        with console.capture() as captured:
            with pytest.raises(TimeoutError):
                with locks.file_lock(lock, timeout=1.0, what="dpo (round 1)"):
                    pass
        notes = [line for line in captured.get().splitlines() if line.startswith("waiting")]
        assert len(notes) >= 2, captured.get()
        assert notes[0].endswith(f"for dpo (round 1), held by pid {holder.pid} (alignflow run other.yaml)")
    finally:
        holder.kill()
        holder.wait()
    with locks.file_lock(lock, timeout=10):  # freed by its holder's death
        pass
