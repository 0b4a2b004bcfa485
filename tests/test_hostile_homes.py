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


def test_a_moved_home_takes_its_mlflow_artifacts_along(tmp_path):
    from mlflow.tracking import MlflowClient

    spec = tmp_path / "moving.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "moving",
        "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 2}},
    }))
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    alignflow("run", spec, home=a, env=PLUGINS, check=True)
    before = sorted(p.relative_to(a) for p in (a / "mlflow-artifacts").rglob("*"))
    shutil.copytree(a, b, symlinks=True)  # cp -a A B
    alignflow("run", spec, home=b, env=PLUGINS, check=True)
    assert sorted(p.relative_to(a) for p in (a / "mlflow-artifacts").rglob("*")) == before, "B wrote into A"
    shutil.move(b, c)  # mv B C; then only reading it (compare) re-points it
    alignflow("compare", spec, home=c, env=PLUGINS, check=True)
    assert not b.exists()
    client = MlflowClient(f"sqlite:///{c / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("moving")
    assert experiment.artifact_location == (c / "mlflow-artifacts" / "moving").as_uri()
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    for run in parents:  # the one from before the copy too: its artifacts are where C holds them
        assert run.info.artifact_uri.startswith((c / "mlflow-artifacts").as_uri() + "/")
        assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"spec.yaml", "summary.json"}
