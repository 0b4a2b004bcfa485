"""Homes that move: a copied home, and a store shared by two homes, reuse every artifact."""
from __future__ import annotations

import shutil

import yaml

from conftest import alignflow

PLUGINS = {"ALIGNFLOW_PLUGINS": "hostile_stages"}


def test_copied_home_and_shared_store_run_all_hits(tmp_path):
    spec = tmp_path / "moving.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "moving",
        "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 2},
                   "b": {"kind": "toy_steps", "data": "prompts", "steps": 3}},
    }))
    first = alignflow("run", spec, home=tmp_path / "home1", env=PLUGINS, check=True)
    assert "3 ran, 0 cached" in first.stderr + first.stdout
    shutil.copytree(tmp_path / "home1", tmp_path / "home2", symlinks=True)  # as `cp -a`
    copied = alignflow("run", spec, home=tmp_path / "home2", env=PLUGINS, check=True)
    out = copied.stderr + copied.stdout
    assert "0 ran, 3 cached" in out and "outside of the base path" not in out
    assert str(tmp_path / "home2" / "store") in out
    shared = alignflow("run", spec, "--set", f"store={tmp_path / 'home1' / 'store'}", home=tmp_path / "home3",
                       env=PLUGINS, check=True)
    assert "0 ran, 3 cached" in shared.stderr + shared.stdout
    again = alignflow("run", spec, home=tmp_path / "home1", env=PLUGINS, check=True)  # after home3 used its store
    assert "0 ran, 3 cached" in again.stderr + again.stdout
