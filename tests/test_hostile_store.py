"""The store owns only what it made: a folder that is not alignflow's is refused before anything
is written, system folders and the home directory always, and the start-up sweep touches only
the names alignflow makes, in a store it marked as its own."""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import yaml

from conftest import alignflow
from flows.store import OWNER_MARK, Store

PLUGINS = {"ALIGNFLOW_PLUGINS": "hostile_stages"}


def toy_spec(tmp_path, store) -> object:
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "toy", "store": str(store),
        "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 1, "seconds": 0}},
    }))
    return spec


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path):
    folder = tmp_path / "project"
    (folder / "docs" / ".old-notes-v1").mkdir(parents=True)
    (folder / "docs" / ".old-notes-v1" / "manifest.json").write_text("{}")
    leftover = folder / "build" / f".tmp-cache-{socket.gethostname()}-4242-abcd1234"
    leftover.mkdir(parents=True)
    (leftover / "object.o").write_bytes(b"\0" * 10)
    before = snapshot(folder)
    result = alignflow("run", toy_spec(tmp_path, folder), home=tmp_path / "home", env=PLUGINS)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"store: {folder}: a folder that is not empty and is not an alignflow store" in " ".join(result.stderr.split())
    assert snapshot(folder) == before and not (tmp_path / "home").exists()


@pytest.mark.parametrize("where", ["/", "~", "/usr/share", "/tmp"])
def test_system_folders_and_the_home_directory_are_refused(tmp_path, where, monkeypatch):
    fake_home = tmp_path / "user"
    fake_home.mkdir()
    store = where.replace("~", str(fake_home))
    result = alignflow("run", toy_spec(tmp_path, store), home=tmp_path / "home", env={**PLUGINS, "HOME": str(fake_home)})
    assert result.returncode == 2, result.stderr[-3000:]
    reason = "your home directory" if where == "~" else "a system folder"
    assert f"store: {store}: refusing to use {reason} as a store" in " ".join(result.stderr.split())
    assert not any(os.path.exists(os.path.join(store, name)) for name in ("_index", "_locks", "_prefect", "synthetic"))
    assert list(fake_home.iterdir()) == []


def test_a_store_is_marked_and_its_sweep_keeps_foreign_names(tmp_path):
    store = tmp_path / "empty"
    store.mkdir()
    spec = toy_spec(tmp_path, store)
    alignflow("run", spec, home=tmp_path / "home", env=PLUGINS, check=True)
    assert (store / OWNER_MARK).is_file()
    host = socket.gethostname()
    # Names alignflow never makes, put in the store by someone: the sweep leaves them alone.
    foreign = [store / "toy_steps" / f".tmp-cache-{host}-4242-x", store / "toy_steps" / ".old-notes-v1",
               store / "docs" / f".tmp-k-{host}-4242-abcd1234"]
    for path in foreign:
        path.mkdir(parents=True)
        (path / "manifest.json").write_text("{}")
    # A dead run's build folder is alignflow's: swept.
    dead = store / "toy_steps" / f".tmp-0123456789abcdef01234567-{host}-4242-abcd1234"
    dead.mkdir()
    # An artifact folder replaced by a symlink (to a copy elsewhere): damaged, rebuilt, the copy untouched.
    artifact = next(p for p in (store / "toy_steps").iterdir() if not p.name.startswith("."))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(artifact, elsewhere)
    shutil.rmtree(artifact)
    artifact.symlink_to(elsewhere)
    copy = snapshot(elsewhere)
    again = alignflow("run", spec, home=tmp_path / "home", env=PLUGINS, check=True)
    assert "1 ran, 1 cached" in again.stderr, again.stderr
    assert all(path.is_dir() for path in foreign) and not dead.exists()
    assert not artifact.is_symlink() and (artifact / "manifest.json").is_file()
    assert snapshot(elsewhere) == copy and (artifact / "metrics.json").read_bytes() == copy["metrics.json"][1]


def test_a_store_made_before_markers_keeps_working(tmp_path):
    store = tmp_path / "old-store"
    spec = toy_spec(tmp_path, store)
    alignflow("run", spec, home=tmp_path / "home", env=PLUGINS, check=True)
    (store / OWNER_MARK).unlink()  # as an older alignflow left it
    again = alignflow("run", spec, home=tmp_path / "home", env=PLUGINS, check=True)
    assert "0 ran, 2 cached" in again.stderr and (store / OWNER_MARK).is_file()
    # With a file of someone else's among its folders, it is no longer unmistakably a store.
    (store / OWNER_MARK).unlink()
    (store / "notes.txt").write_text("mine")
    assert "not an alignflow store" in Store(store).unavailable()


def test_the_sweep_restores_a_shards_old_artifact_to_the_shard(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    with store.build("toy", "abc-shard0of2") as tmp:
        (tmp / "x").write_text("1")
        store.commit(tmp, "toy", "abc-shard0of2", {})
    aside = store.root / "toy" / ".old-abc-shard0of2-abcd1234"
    os.replace(store.path("toy", "abc-shard0of2"), aside)  # killed between commit's two renames
    monkeypatch.setattr("flows.store.time.time", lambda: 1e12)
    store.sweep(["toy"])
    assert store.check("toy", "abc-shard0of2") is None and not (store.root / "toy" / "abc").exists()
    shutil.rmtree(store.root)
