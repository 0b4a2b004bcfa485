"""The run report: the summary table and plots on the parent run, and `alignflow compare`.

Pure functions first (no MLflow), then end to end through the CLI on a toy pipeline
(tests/plugins/toy_stages.py: `toy_policy` improves by round, `toy_metrics` returns given metrics)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import REPO, alignflow
from flows import report

PNG = b"\x89PNG\r\n\x1a\n"
TOY = {"ALIGNFLOW_PLUGINS": "toy_stages"}


def accuracies(base: float, spread: float = 0.05) -> dict[str, float]:
    """exrm_/dporm_ accuracies on every set, with their intervals (EXRM a little better)."""
    out = {}
    for r, reward in enumerate(report.REWARDS):
        for s, set_ in enumerate(report.SETS):
            acc = base - 0.08 * s - 0.05 * r
            out |= {f"{reward}_acc_{set_}": acc, f"{reward}_acc_{set_}_ci_low": acc - spread,
                    f"{reward}_acc_{set_}_ci_high": acc + spread}
    return out


def row(stage, round_=0, cache="miss", **metrics):
    return {"stage": stage, "round": round_, "key": "k" * 64, "cache": cache, "seconds": 0.1, "metrics": metrics}


ROWS = [
    row("sft", loss=1.5),
    row("dpo", 1, loss=0.6),
    row("evaluate", 1, win_rate=0.55, win_rate_ci_low=0.5, win_rate_ci_high=0.6),
    row("dpo", 2, cache="hit", loss=0.5),
    row("evaluate", 2, cache="hit", win_rate=0.6, win_rate_ci_low=0.55, win_rate_ci_high=0.65),
    row("reward_accuracy", 0, **accuracies(0.8)),
    row("reward_accuracy_seed1", 0, **accuracies(0.75)),
]


# ---------------------------------------------------------------- pure functions
def test_summary_table_has_one_row_per_execution_and_every_metric():
    table = report.summary_table(ROWS)
    assert list(table)[:5] == ["stage", "round", "cache", "loss", "win_rate"]
    assert all(len(values) == len(ROWS) for values in table.values())
    assert table["stage"] == [r["stage"] for r in ROWS] and table["round"] == [0, 1, 1, 2, 2, 0, 0]
    assert table["cache"] == ["miss", "miss", "miss", "hit", "hit", "miss", "miss"]
    assert table["loss"][:2] == [1.5, 0.6] and table["loss"][2] is None
    assert table["exrm_acc_id"][5] == pytest.approx(0.8) and table["exrm_acc_id"][0] is None
    assert report.table_rows(table)[2]["win_rate"] == 0.55


def test_terminal_view_folds_intervals_and_filters_columns():
    table = report.summary_table(ROWS)
    shown = report.display_columns(table)
    assert "win_rate_ci_low" not in shown and shown["win_rate"][2] == "0.550 [0.500, 0.600]"
    assert shown["loss"][:3] == ["1.500", "0.600", ""] and shown["round"][3] == "2"
    # three decimals for every metric; counts as integers; the tiny and the large in 4 digits
    assert [report.format_value(v) for v in (1000.0, 0.01196, 3.2, 0.0004321, 123456.7)] == [
        "1000", "0.012", "3.200", "0.0004321", "1.235e+05"]
    picked = report.select_columns(table, ["win*", "dporm_acc_id"])
    assert list(picked) == ["stage", "round", "cache", "win_rate", "win_rate_ci_low", "win_rate_ci_high",
                            "dporm_acc_id", "dporm_acc_id_ci_low", "dporm_acc_id_ci_high"]


def test_plot_data():
    assert report.win_rate_series(ROWS) == {"evaluate": [(1, 0.55, 0.5, 0.6), (2, 0.6, 0.55, 0.65)]}
    points = report.reward_accuracy_points(ROWS)
    assert [p["label"] for p in points] == ["reward_accuracy", "reward_accuracy_seed1"]
    assert points[0]["values"]["dporm_response_shift"] == pytest.approx((0.59, 0.54, 0.64))
    assert report.win_rate_series(ROWS[:2]) == {} and report.reward_accuracy_points(ROWS[:5]) == []


def test_plots_only_for_metrics_present_and_cached_by_content(tmp_path):
    assert report.plots(ROWS[:2], tmp_path) == {}
    made = report.plots(ROWS, tmp_path)
    assert set(made) == {"win_rate", "reward_accuracy"}
    for name, path in made.items():
        assert path.name == f"{name}.png" and path.read_bytes().startswith(PNG) and path.stat().st_size > 5000

    def boom(data, out):
        raise AssertionError("drawn again")

    data = report.win_rate_series(ROWS)
    assert report.plot("win_rate", data, boom, tmp_path) == made["win_rate"]  # same numbers: the cached PNG
    other = report.win_rate_series(ROWS[:3])
    with pytest.raises(AssertionError, match="drawn again"):
        report.plot("win_rate", other, boom, tmp_path)
    assert not list(tmp_path.rglob(".win_rate-*")), "a failed drawing leaves no partial file"


def test_a_failing_report_is_a_warning_not_a_failed_run(capsys):
    class Broken:
        def log_table(self, *args):
            raise OSError("disk full")

    report.log_report(Broken(), "run", ROWS)
    assert "disk full" in capsys.readouterr().err


def test_warm_report_never_imports_matplotlib(tmp_path):
    """Nothing to plot, or plots already drawn: the report costs no matplotlib import."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from flows.tracking import Tracker
        from flows.report import log_report
        rows = {ROWS!r}
        tracker = Tracker("sqlite:///{tmp_path}/mlflow.db", "warm")
        cache = Path("{tmp_path}/cache")
        log_report(tracker, tracker.start_run("a", {{}}), rows[:2], cache)
        assert "matplotlib" not in sys.modules, "nothing to plot"
        if sys.argv[1] == "draw":
            log_report(tracker, tracker.start_run("b", {{}}), rows, cache)
            assert "matplotlib" in sys.modules
        else:
            log_report(tracker, tracker.start_run("c", {{}}), rows, cache)
            assert "matplotlib" not in sys.modules, "the plots were cached"
        print("ok")
    """)
    env = {**os.environ, "ALIGNFLOW_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for mode in ("draw", "cached"):
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------- end to end
def toy_spec(name: str, rounds: int = 2, seeds: int = 2, tracking_uri: str | None = None) -> dict:
    """Policy quality grows by 0.1 a round (so does the win rate); `seeds` reward-accuracy stages."""
    spec = {
        "name": name,
        "stages": {
            "start": {"kind": "toy_policy"},
            "improve": {"kind": "toy_policy", "previous": "policy", "gain": 0.1},
            "evaluate": {"kind": "toy_metrics", "policy": "improve",
                         "metrics": {"win_rate": 0.45, "win_rate_ci_low": 0.4, "win_rate_ci_high": 0.5},
                         "shift": ["win_rate", "win_rate_ci_low", "win_rate_ci_high"]},
            **{f"reward_accuracy_{s}": {"kind": "toy_metrics", "seed": s, "metrics": accuracies(0.8 - 0.03 * s)}
               for s in range(seeds)},
        },
        "rounds": {"count": rounds, "repeat": ["improve", "evaluate"],
                   "policy": {"start": "start", "next": "improve"}},
    }
    if tracking_uri:
        spec["tracking"] = {"uri": tracking_uri}
    return spec


def write_spec(path, spec: dict):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ORDER = [("start", 0), ("reward_accuracy_0", 0), ("reward_accuracy_1", 0), ("improve", 1), ("evaluate", 1),
         ("improve", 2), ("evaluate", 2)]  # the flow's order: the spec's, round by round


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    home, spec = root / "home", write_spec(root / "toy.yaml", toy_spec("report-toy"))
    cold = alignflow("run", spec, home=home, env=TOY, check=True, timeout=300)
    warm = alignflow("run", spec, home=home, env=TOY, check=True, timeout=300)
    assert "0 ran" in warm.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("report-toy")
    parents = client.search_runs([exp.experiment_id], filter_string=report.PARENT_FILTER,
                                 order_by=["attribute.start_time ASC"])
    assert len(parents) == 2
    return {"home": home, "spec": spec, "client": client, "parents": parents, "cold": cold, "warm": warm}


def test_parent_run_has_summary_table_and_plots(toy_run):
    client = toy_run["client"]
    for parent in toy_run["parents"]:
        run_id = parent.info.run_id
        top = {a.path for a in client.list_artifacts(run_id)}
        assert {"summary.json", "spec.yaml", "plots"} <= top
        assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/win_rate.png",
                                                                              "plots/reward_accuracy.png"}
        assert {"path": "summary.json", "type": "table"} in json.loads(parent.data.tags["mlflow.loggedArtifacts"])
        table = report.read_summary(client, parent)
        assert list(zip(table["stage"], table["round"])) == ORDER
        rows = {(r["stage"], r["round"]): r for r in report.table_rows(table)}
        assert rows["evaluate", 1]["win_rate"] == pytest.approx(0.55)
        assert rows["evaluate", 2]["win_rate"] == pytest.approx(0.65)
        assert rows["reward_accuracy_1", 0]["exrm_acc_id"] == pytest.approx(0.77)
        assert rows["improve", 1]["exrm_acc_id"] is None
    cold, warm = (report.read_summary(client, p)["cache"] for p in toy_run["parents"])
    assert set(cold) == {"miss"} and set(warm) == {"hit"}
    # The same numbers on the warm run: the plots are the cached PNGs, byte for byte.
    pngs = [client.download_artifacts(p.info.run_id, "plots/win_rate.png", str(toy_run["home"] / f"dl{i}"))
            for i, p in enumerate(toy_run["parents"])]
    assert open(pngs[0], "rb").read() == open(pngs[1], "rb").read()
    assert open(pngs[0], "rb").read().startswith(PNG)


def test_compare_prints_the_latest_run(toy_run):
    out = alignflow("compare", "report-toy", home=toy_run["home"], check=True, timeout=120)
    latest = toy_run["parents"][-1].info.run_id
    assert f"report-toy: run {latest}" in out.stdout
    lines = out.stdout.splitlines()
    evaluate = [l for l in lines if "evaluate" in l]
    assert len(evaluate) == 2 and all("hit" in l for l in evaluate)
    assert "0.550 [0.500, 0.600]" in evaluate[0] and "0.650 [0.600, 0.700]" in evaluate[1]
    assert "exrm_acc_id" not in out.stdout and "EXRM vs DPORM" in out.stdout, "accuracies: in the EXRM vs DPORM table"
    wide = alignflow("compare", "report-toy", "--all", home=toy_run["home"], check=True, timeout=120)
    assert "exrm_acc_id" in wide.stdout and "dporm_acc_id" in wide.stdout


def test_compare_options(toy_run):
    home = toy_run["home"]
    first = toy_run["parents"][0].info.run_id
    out = alignflow("compare", "--run", first, "-m", "win_rate", home=home, check=True, timeout=120)
    assert f"run {first}" in out.stdout and "miss" in out.stdout and "exrm" not in out.stdout
    assert "improve" not in out.stdout, "--metric shows only the stages that have one"
    spec = alignflow("compare", toy_run["spec"], "-m", "exrm_acc_id", home=home, env=TOY, check=True, timeout=120)
    assert f"run {toy_run['parents'][-1].info.run_id}" in spec.stdout and "reward_accuracy_1" in spec.stdout
    default = alignflow("compare", home=home, check=True, timeout=120)
    assert f"report-toy: run {toy_run['parents'][-1].info.run_id}" in default.stdout


def test_compare_unknown_experiment_or_run_exits_2(toy_run, tmp_path):
    out = alignflow("compare", "report-tyo", home=toy_run["home"], timeout=120)
    assert out.returncode == 2 and "no experiment named 'report-tyo'" in out.stderr
    assert "did you mean 'report-toy'" in out.stderr and "Traceback" not in out.stderr
    out = alignflow("compare", "--run", "0" * 32, home=toy_run["home"], timeout=120)
    assert out.returncode == 2 and "no run" in out.stderr
    empty = alignflow("compare", home=tmp_path / "nothing", timeout=120)
    assert empty.returncode == 2 and "nothing has run here yet" in empty.stderr
    assert not (tmp_path / "nothing").exists(), "compare creates no store"


def test_compare_defaults_to_the_most_recent_run_in_the_store(toy_run, monkeypatch):
    """Without an experiment: the experiment of the newest parent run, here one logged just now."""
    from flows.tracking import Tracker

    monkeypatch.setenv("ALIGNFLOW_HOME", str(toy_run["home"]))

    tracker = Tracker(f"sqlite:///{toy_run['home'] / 'mlflow.db'}", "another")
    parent = tracker.start_run("another", {"alignflow.spec_hash": "x", "alignflow.flow_run_id": "y"})
    stage = tracker.start_run("only", {"alignflow.stage": "only", "alignflow.round": "0",
                                       "alignflow.cache": "miss", "mlflow.parentRunId": parent})
    tracker.log(stage, metrics={"win_rate": 0.7})
    tracker.end(stage)
    tracker.end(parent)  # no summary.json: the table is rebuilt from its stage runs
    out = alignflow("compare", home=toy_run["home"], check=True, timeout=120)
    assert f"another: run {parent}" in out.stdout and "only" in out.stdout and "0.7" in out.stdout
