"""EXRM vs DPORM as a person reads it: the MLflow experiment and run names, the parent run's
headline metrics by round, the end of `alignflow run`, `alignflow compare`'s default and
EXRM vs DPORM tables, and `alignflow ui` (it answers before it prints, stops on a signal, and
refuses a port in use). The pipeline is a toy one (tests/plugins/toy_stages.py): no ML."""
from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest

from conftest import REPO, alignflow
from flows import report
from flows.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, changed_settings, pipeline_run_name, run_name
from test_report import TOY, accuracies, row, toy_spec, write_spec


def only(reward: str, metrics: dict) -> dict:
    """One reward's accuracies as its reward_accuracy run logs them: acc_id, acc_id_ci_low, ..."""
    return {k.removeprefix(f"{reward}_"): v for k, v in metrics.items() if k.startswith(reward)}


# Two seeds, each a pair of stages (EXRM's accuracies, DPORM's), as pipelines/exrm_vs_dporm_smollm2.yaml.
SEEDS = [(0.8, 0.78), (0.74, 0.66)]  # (EXRM's base accuracy, DPORM's)
SPLIT_ROWS = [{**row(f"{reward}_acc_s{s}", **only(reward, accuracies(base))), "reward": reward}
              for s, bases in enumerate(SEEDS) for reward, base in zip(report.REWARDS, bases)]


def t_interval(values: list[float]) -> tuple[float, float]:
    """The reference: mean +- t(0.975, n-1) * sd / sqrt(n), with a hard-coded quantile for n = 2."""
    assert len(values) == 2
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = 12.706204736174698 * sd / 2 ** 0.5
    return mean - half, mean + half


def test_run_names_read_as_a_person_would():
    assert run_name("dpo", 2) == "dpo · round 2" and run_name("sft", 0) == "sft"
    assert run_name("exrm_acc_s1", 0, reward="exrm", seed=1) == "EXRM · seed 1"
    headline = report.headline_by_round([row("evaluate", r, win_rate=w) for r, w in ((1, 0.5), (2, 0.61), (3, 0.7))])
    assert pipeline_run_name("demo") == "demo"
    assert (pipeline_run_name("demo", changed=changed_settings(["stages.dpo.beta=0.2"], 3), headline=headline)
            == "demo · dpo.beta=0.2 · rounds=3 · win_rate 0.500 → 0.610 → 0.700")
    assert pipeline_run_name("demo", headline=headline, cached=True).endswith("0.700 · all cached")
    paired = pipeline_run_name("exrm", headline=report.headline_by_round(SPLIT_ROWS))
    assert paired == "exrm · DPORM − EXRM in distribution -0.100, prompt shift -0.100, response shift -0.100"


def test_headline_by_round_averages_a_rounds_seeds():
    rows = [row("evaluate", 1, win_rate=0.5, win_rate_ci_low=0.4, loss=1.0), row("evaluate", 2, win_rate=0.7),
            row("other_eval", 2, win_rate=0.6), *SPLIT_ROWS]
    headline = report.headline_by_round(rows)
    assert list(headline) == [0, 1, 2] and headline[1] == {"win_rate": 0.5}  # no high end: no interval
    assert headline[2]["win_rate"] == pytest.approx(0.65)
    assert (headline[2]["win_rate_ci_low"], headline[2]["win_rate_ci_high"]) == pytest.approx(
        (max(0, t_interval([0.7, 0.6])[0]), min(1, t_interval([0.7, 0.6])[1])))
    assert headline[0]["exrm_acc_id"] == pytest.approx(0.77) and headline[0]["dporm_acc_id"] == pytest.approx(0.67)
    # DPORM - EXRM paired by seed: 0.78-0.05-0.8 and 0.66-0.05-0.74; its interval is over those two
    assert headline[0]["diff_acc_id"] == pytest.approx(-0.1)
    low, high = t_interval([0.78 - 0.05 - 0.8, 0.66 - 0.05 - 0.74])
    assert (headline[0]["diff_acc_id_ci_low"], headline[0]["diff_acc_id_ci_high"]) == pytest.approx((low, high))
    assert [k for k in headline[0] if not k.endswith(("_ci_low", "_ci_high"))][:4] == [
        "exrm_acc_id", "dporm_acc_id", "diff_acc_id", "exrm_acc_prompt_shift"]


def test_reward_comparison_pairs_seeds_by_stage_name():
    found = {e["set"]: e for e in report.reward_comparison(report.summary_table(SPLIT_ROWS))}
    assert list(found) == list(report.SETS)
    shift = found["response_shift"]  # accuracies(): base - 0.16 on response shift, DPORM - 0.05 more
    exrm, dporm = [0.8 - 0.16, 0.74 - 0.16], [0.78 - 0.21, 0.66 - 0.21]
    assert shift["n"] == 2
    assert shift["exrm"][0] == pytest.approx(0.61) and shift["dporm"][0] == pytest.approx(0.51)
    low, high = t_interval(dporm)
    assert shift["dporm"][1:] == pytest.approx((max(0.0, low), min(1.0, high)))
    differences = [d - e for d, e in zip(dporm, exrm)]  # paired: -0.07 and -0.13
    assert shift["difference"] == pytest.approx((-0.1, *t_interval(differences)))


def test_reward_comparison_of_one_execution_keeps_its_own_intervals():
    one = report.reward_comparison(report.summary_table([row("acc", **accuracies(0.8))]))
    assert one[0]["exrm"] == pytest.approx((0.8, 0.75, 0.85)) and one[0]["dporm"] == pytest.approx((0.75, 0.7, 0.8))
    assert one[0]["difference"] == pytest.approx((-0.05, None, None)) or one[0]["difference"][1] is None
    assert report.reward_comparison(report.summary_table([SPLIT_ROWS[0]])) == [], "EXRM alone: nothing to compare"


# ---------------------------------------------------------------- end to end, through the CLI
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exrm-report")
    spec = toy_spec("exrm-toy", rounds=2, seeds=0)
    for s, bases in enumerate(SEEDS):
        for reward, base in zip(report.REWARDS, bases):
            spec["stages"][f"{reward}_acc_s{s}"] = {"kind": "toy_metrics", "seed": s, "reward": reward,
                                                    "metrics": only(reward, accuracies(base))}
    home, path = root / "home", write_spec(root / "exrm-toy.yaml", spec)
    run = alignflow("run", path, home=home, env=TOY, check=True, timeout=300)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("exrm-toy")
    parent = client.search_runs([experiment.experiment_id], filter_string=report.PARENT_FILTER)[0]
    return {"home": home, "spec": path, "client": client, "experiment": experiment, "parent": parent, "run": run}


def test_mlflow_opens_on_model_training_with_named_runs_and_charts_by_round(toy_run):
    client, parent = toy_run["client"], toy_run["parent"]
    assert toy_run["experiment"].tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    stages = client.search_runs([toy_run["experiment"].experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = {r.info.run_name for r in stages}
    assert {"start", "improve · round 1", "evaluate · round 2", "EXRM · seed 0", "DPORM · seed 1"} <= names
    by_name = {r.info.run_name: r for r in stages}
    assert by_name["DPORM · seed 1"].data.tags["alignflow.reward"] == "dporm" and by_name["DPORM · seed 1"].data.params[
        "reward"] == "dporm"
    # Compare lines them up: the same metric names, none missing, no None params
    assert set(by_name["EXRM · seed 0"].data.metrics) == set(by_name["DPORM · seed 1"].data.metrics)
    assert "None" not in by_name["EXRM · seed 0"].data.params.values()
    win = sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "win_rate"))
    assert win == [(1, pytest.approx(0.55)), (2, pytest.approx(0.65))]  # toy_spec: 0.45 + 0.1 a round
    exrm = client.get_metric_history(parent.info.run_id, "exrm_acc_response_shift")
    assert [(m.step, m.value) for m in exrm] == [(0, pytest.approx(0.61))]  # the mean of the two seeds
    metrics = parent.data.metrics
    assert metrics["diff_acc_response_shift"] == pytest.approx(-0.1) and "diff_acc_response_shift_ci_low" in metrics
    assert (metrics["win_rate_round_1"], metrics["win_rate_round_2"]) == (pytest.approx(0.55), pytest.approx(0.65))
    assert parent.info.run_name == ("exrm-toy · win_rate 0.550 → 0.650 · DPORM − EXRM in distribution -0.100, "
                                    "prompt shift -0.100, response shift -0.100")


def test_a_finished_run_ends_with_the_headline_and_where_to_look(toy_run):
    out = toy_run["run"].stdout + toy_run["run"].stderr
    tail = out[out.index("win rate against the baseline"):]
    assert re.search(r"round 1 +0\.550 \[0\.500, 0\.600\]", tail) and re.search(r"round 2 +0\.650 \[", tail)
    assert "round 0" not in tail
    versus = tail[tail.index("EXRM vs DPORM"):]
    assert re.search(r"response shift +│ +0\.610 \[[^]]+\] +│ +0\.510 \[[^]]+\] +│ +-0\.100 \[", versus)
    assert max(map(len, versus[:versus.index("look further")].splitlines())) <= 120, "compare's table, whole"
    spec = str(toy_run["spec"])
    # as typed: `python -m flows.cli` here; the venv's program, or `make`, from a checkout (test_hints.py)
    assert f"-m flows.cli compare {spec}" in tail and f"-m flows.cli ui {spec}" in tail


def test_compare_default_fits_120_columns_and_tables_exrm_against_dporm(toy_run):
    out = alignflow("compare", toy_run["spec"], home=toy_run["home"], env=TOY, check=True, timeout=120).stdout
    assert max(map(len, out.splitlines())) <= 120
    assert "win_rate" in out and "0.550 [0.500, 0.600]" in out and "acc_id" not in out
    versus = out[out.index("EXRM vs DPORM"):]
    lines = {name: next(l for l in versus.splitlines() if name in l) for name in report.SET_LABELS.values()}
    cells = re.findall(r"[-+]?\d\.\d{3}(?: \[[^\]]+\])?", lines["response shift"])
    exrm, dporm, difference = cells
    assert exrm.startswith("0.610 [") and dporm.startswith("0.510 [") and difference.startswith("-0.100 [")
    assert "t-interval over seeds" in versus and "DPORM - EXRM" in versus
    wide = alignflow("compare", toy_run["spec"], "--all", home=toy_run["home"], env=TOY, check=True, timeout=120).stdout
    assert "acc_id" in wide and "acc_response_shift" in wide and "stages_run" not in wide
    assert re.search(r"exrm_acc_s0 .*│ exrm +│", wide) and re.search(r"dporm_acc_s1 .*│ dporm +│", wide)


# ---------------------------------------------------------------- alignflow ui
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_refuses_a_port_in_use(toy_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = alignflow("ui", "--port", port, home=toy_run["home"], timeout=60)
    assert out.returncode == 2 and f"127.0.0.1:{port} is not free" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(400)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ui_prints_the_runs_page_once_it_answers_and_stops_its_server_on_a_signal(toy_run, signum):
    import urllib.request

    port = free_port()
    env = {**os.environ, "ALIGNFLOW_HOME": str(toy_run["home"]), "PYTHONPATH": str(REPO / "tests" / "plugins"), **TOY}
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", str(toy_run["spec"]), "--port", str(port)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, seen = None, []
        for line in ui.stdout:  # blocks until the line comes (or the process ends)
            seen.append(line)
            if line.strip().startswith("http://"):
                url = line.strip()
                break
        assert url is not None, "".join(seen)[-3000:]
        runs = f"http://127.0.0.1:{port}/#/experiments/{toy_run['experiment'].experiment_id}/runs"
        assert url == f"{runs}?viewStateShareKey=alignflow-headline&workflowType=machine_learning"
        more = [ui.stdout.readline() for _ in range(3)]
        assert more[0].strip() == (f"the latest run's charts, by round: {runs}/{toy_run['parent'].info.run_id}"
                                   "/model-metrics?workflowType=machine_learning")
        assert more[1].strip() == f"its EXRM and DPORM runs side by side: {runs}?viewStateShareKey=alignflow-rewards&workflowType=machine_learning"
        assert more[2].startswith("Ctrl+C stops it.")
        assert "Security middleware" not in "".join(seen + more), "MLflow's start-up notes go to its log"
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()  # printed: it answers
        ui.send_signal(signum)
        assert ui.wait(timeout=60) == 0
    finally:
        if ui.poll() is None:
            ui.kill()
    deadline = time.time() + 20
    while time.time() < deadline:  # the server (its own process group) is gone: nothing listens
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"the MLflow server still listens on {port} after `alignflow ui` stopped")
