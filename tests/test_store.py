"""The artifact store's atomicity and integrity checks, and the crash-safe lock manager."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flows.locks import CrashSafeLockManager
from flows.store import MANIFEST, Store


def build_one(store: Store, key="k1", payload=b"x" * 1000):
    with store.build("toy", key) as tmp:
        (tmp / "data.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "meta.json").write_text("{}")
        return store.commit(tmp, "toy", key, {"metrics": {"m": 1.0}})


def test_commit_is_whole_and_checked(tmp_path):
    store = Store(tmp_path)
    manifest = build_one(store)
    assert store.check("toy", "k1") is None
    assert set(manifest["files"]) == {"data.bin", "sub/meta.json"}
    assert not list((tmp_path / "toy").glob(".tmp-*")), "no temporary folder left behind"


def test_damage_is_detected(tmp_path):
    store = Store(tmp_path)
    build_one(store)
    data = store.path("toy", "k1") / "data.bin"
    with open(data, "r+b") as f:
        f.truncate(10)
    assert "data.bin has 10 bytes" in store.check("toy", "k1")
    build_one(store)
    data.write_bytes(b"y" * 1000)  # same size, other content
    assert "does not match its hash" in store.check("toy", "k1")
    build_one(store)
    (store.path("toy", "k1") / MANIFEST).unlink()
    assert "no valid manifest" in store.check("toy", "k1")
    assert store.check("toy", "absent") == "not built"


def test_failed_build_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.build("toy", "k2") as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("stage died")
    assert not store.path("toy", "k2").exists()
    assert list((tmp_path / "toy").iterdir()) == []


def test_rebuild_replaces_atomically(tmp_path):
    store = Store(tmp_path)
    build_one(store, payload=b"a" * 10)
    build_one(store, payload=b"b" * 20)
    assert (store.path("toy", "k1") / "data.bin").read_bytes() == b"b" * 20
    assert store.check("toy", "k1") is None
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["k1"]


def test_sweep_removes_only_dead_processes_tmp(tmp_path):
    store = Store(tmp_path)
    store.claim()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    host = socket.gethostname()
    dead_tmp = tmp_path / "toy" / f".tmp-k3-{host}-{int(dead.stdout)}-abcd1234"
    live_tmp = tmp_path / "toy" / f".tmp-k4-{host}-{os.getpid()}-abcd1234"
    dead_tmp.mkdir(parents=True)
    live_tmp.mkdir()
    store.sweep(["toy"])
    assert not dead_tmp.exists() and live_tmp.exists()


def test_sweep_restores_an_artifact_a_crash_left_aside(tmp_path, monkeypatch):
    store = Store(tmp_path)
    build_one(store)
    aside = tmp_path / "toy" / ".old-k1-abcd1234"
    os.replace(store.path("toy", "k1"), aside)  # as if killed between commit's two renames
    store.sweep(["toy"])
    assert aside.exists(), "a fresh one may belong to a commit in progress"
    later = time.time() + 120
    monkeypatch.setattr("flows.store.time.time", lambda: later)
    store.sweep(["toy"])
    assert store.check("toy", "k1") is None and not aside.exists()


def test_lock_of_a_dead_process_is_free(tmp_path):
    manager = CrashSafeLockManager(tmp_path)
    # A process takes the lock and dies holding it (as under SIGKILL).
    code = ("import sys; sys.path.insert(0, %r); from flows.locks import CrashSafeLockManager; "
            "from pathlib import Path; CrashSafeLockManager(Path(%r)).acquire_lock('key', 'other')" % (os.getcwd(), str(tmp_path)))
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "key.lock").exists()
    assert not manager.is_locked("key")
    assert manager.acquire_lock("key", "me", acquire_timeout=1)
    assert manager.is_lock_holder("key", "me")
    manager.release_lock("key", "me")
    assert not (tmp_path / "key.lock").exists()


def test_lock_of_a_live_holder_blocks(tmp_path):
    holder = CrashSafeLockManager(tmp_path)
    other = CrashSafeLockManager(tmp_path)
    assert holder.acquire_lock("key", "first")
    assert other.is_locked("key")
    assert not other.acquire_lock("key", "second", acquire_timeout=0.3)
    holder.release_lock("key", "first")
    assert other.acquire_lock("key", "second", acquire_timeout=1)


def test_index_records_last_recipe(tmp_path):
    store = Store(tmp_path)
    store.record_recipe("demo", "dpo@1", "abc", {"config": {"beta": 0.1}})
    assert store.last_recipe("demo", "dpo@1") == {"key": "abc", "recipe": {"config": {"beta": 0.1}}}
    assert store.last_recipe("demo", "dpo@2") is None
    json.loads((tmp_path / "_index" / "demo" / "dpo@1.json").read_text())
