"""runner: ray: the stages run on a local Ray instance of 2 workers (prefect-ray), generation and
scoring mapped over prompt shards, and the result is the single-process result, table for table."""
from __future__ import annotations

import pytest
import yaml

from conftest import REPO, alignflow, stage_runs

pytest.importorskip("prefect_ray")


def tables(home, name: str) -> dict:
    from tasks.tables import read_table

    return {r.data.tags["alignflow.stage"]: read_table(r.data.tags["alignflow.uri"])
            for r in stage_runs(home, name) if r.data.tags["alignflow.stage"] in ("generate", "score")}


SPEC = {
    "name": "sharded", "seed": 0,
    "models": {"base": {"kind": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
    "datasets": {"rm_pairs": {"kind": "synthetic", "split": "preferences", "size": 200},
                 "prompts": {"kind": "synthetic", "split": "prompts", "size": 16}},
    "stages": {
        "reward_model": {"kind": "reward_model", "model": "base", "data": "rm_pairs", "epochs": 1, "lr": 1e-3},
        # 16 prompts in batches of 4; 128 candidates scored in batches of 16
        "generate": {"kind": "generate", "policy": "base", "prompts": "prompts", "n": 8, "max_new_tokens": 8,
                     "batch_size": 4},
        "score": {"kind": "score", "candidates": "generate", "reward_model": "reward_model", "batch_size": 16},
    },
}


@pytest.mark.slow  # a Ray instance's start-up is most of its minute or two; .ci/run runs it
def test_sharded_generation_and_scoring_on_ray_equal_the_single_process_run(tmp_path):
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    alignflow("run", path, home=tmp_path / "local", check=True, timeout=900)

    spec = {**SPEC, "runner": {"kind": "ray", "num_cpus": 2}}
    spec["stages"]["generate"] = {**SPEC["stages"]["generate"], "shards": 2}  # 2 batches each
    spec["stages"]["score"] = {**SPEC["stages"]["score"], "shards": 3}  # 48, 48 and 32 candidates
    path.write_text(yaml.safe_dump(spec))
    alignflow("run", path, home=tmp_path / "ray", check=True, timeout=900)

    local, on_ray = tables(tmp_path / "local", "sharded"), tables(tmp_path / "ray", "sharded")
    assert set(local) == set(on_ray) == {"generate", "score"}
    for stage in local:
        assert on_ray[stage].equals(local[stage]), stage
    runs = {r.data.tags["alignflow.stage"]: r for r in stage_runs(tmp_path / "ray", "sharded")}
    assert runs["generate"].data.metrics["shards"] == 2 and runs["score"].data.metrics["shards"] == 3
    local_runs = {r.data.tags["alignflow.stage"]: r for r in stage_runs(tmp_path / "local", "sharded")}
    for stage in ("generate", "score"):  # the merged table's metrics are the unsharded run's
        for name, value in local_runs[stage].data.metrics.items():
            assert runs[stage].data.metrics[name] == pytest.approx(value), (stage, name)
    # The shards are artifacts of their own (a failed run keeps the finished ones).
    key = runs["generate"].data.tags["alignflow.key"]
    assert sorted(p.name for p in (tmp_path / "ray" / "store" / "generate").glob(f"{key}-shard*")) == [
        f"{key}-shard0of2", f"{key}-shard1of2"]

    # shards is not in the key: the sharded artifacts are the local run's, key for key.
    assert {r.data.tags["alignflow.key"] for r in stage_runs(tmp_path / "local", "sharded")} == {
        r.data.tags["alignflow.key"] for r in runs.values()}


@pytest.mark.slow  # a Ray instance's start-up is most of its minute or two; .ci/run runs it
def test_a_sweeps_variants_run_at_once_on_ray(tmp_path):
    """Two variants, each a stage that finishes only if the other runs at the same time: on a Ray
    instance of 2 workers both finish, in one flow run; on the local runner, which computes one
    stage at a time, the first gives up waiting."""
    import os

    folder = tmp_path / "met"
    spec = {"name": "sweep-ray", "runner": {"kind": "ray", "num_cpus": 2},
            "sweep": {"stages.meet.name": ["a", "b"]},
            "stages": {"meet": {"kind": "toy_rendezvous", "name": "a", "others": ["a", "b"], "folder": str(folder)}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    # Ray's workers import the stage kinds: this checkout's, and the toy plugin
    env = {"ALIGNFLOW_PLUGINS": "toy_stages", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "plugins")])}
    out = alignflow("run", path, home=tmp_path / "ray", env=env, check=True, timeout=900)
    assert "2 ran, 0 cached" in out.stderr
    assert {p.name for p in folder.iterdir()} == {"a", "b"}
    pids = {p.read_text() for p in folder.iterdir()}
    assert len(pids) == 2, "two Ray workers"

    for p in folder.iterdir():
        p.unlink()
    spec["runner"] = {"kind": "local"}
    spec["stages"]["meet"]["timeout"] = 3.0
    path.write_text(yaml.safe_dump(spec))
    local = alignflow("run", path, home=tmp_path / "local", env=env, timeout=900)
    assert local.returncode == 1 and "1 of 2 variants failed" in local.stderr, local.stderr[-3000:]


def test_shard_ranges_start_on_batch_boundaries():
    from flows.pipeline import shard_ranges

    assert shard_ranges(16, 2, 4) == [(0, 8), (8, 16)]
    assert shard_ranges(128, 3, 16) == [(0, 48), (48, 96), (96, 128)]
    assert shard_ranges(10, 4, 4) == [(0, 4), (4, 8), (8, 10)]  # fewer shards than asked: no empty ones
    assert shard_ranges(5, 2, 1) == [(0, 3), (3, 5)]
