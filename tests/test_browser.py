"""MLflow's UI, in a real (headless) Chromium driven by selenium: the compare-runs page of two
reward-accuracy stage runs shows the EXRM and DPORM metrics. The screenshot is kept as a test
artifact: $ALIGNFLOW_TEST_ARTIFACTS (default test-artifacts/ at the repository root).

Needs Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`; .ci/run
installs them); without them the test fails, saying so."""
from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

from conftest import REPO
from test_mlflow_server import mlflow_server
from test_report import accuracies

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAGE_TIMEOUT = 90
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1200")


# Scroll the metrics table (a virtualised grid: its names clip, a nearby viewport scrolls) half a
# box down, back to the top at its end; with `true`: to its top, and the page to show it.
SCROLL_METRICS = """
const scrolls = e => e.scrollHeight > e.clientHeight + 2 && /(auto|scroll)/.test(getComputedStyle(e).overflowY);
const link = [...document.querySelectorAll('a')].find(a => /_acc_/.test(a.textContent));
if (!link) return;
let box = null;
for (let up = link.parentElement; up && up.tagName !== 'MAIN' && !box; up = up.parentElement)
  box = [...up.querySelectorAll('*')].find(scrolls) || null;
if (!box) return;
if (arguments[0]) {
  box.scrollTop = 0;
  box.scrollIntoView({block: 'center'});
  return;
}
box.scrollIntoView({block: 'center'});
box.scrollTop = box.scrollTop + box.clientHeight >= box.scrollHeight - 2 ? 0 : box.scrollTop + box.clientHeight / 2;
"""


def artifacts_dir() -> Path:
    path = Path(os.environ.get("ALIGNFLOW_TEST_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def two_seeds(db: Path) -> tuple[str, list[str]]:
    """A store holding two pipeline runs, each with a reward-accuracy stage run (seeds 0 and 1),
    logged through alignflow's Tracker with the tags and metric names the flow uses."""
    from flows.tracking import Tracker

    tracker = Tracker(f"sqlite:///{db}", "browser-exrm-vs-dporm")
    stages = []
    for seed in (0, 1):
        parent = tracker.start_run("browser-exrm-vs-dporm", {"alignflow.spec_hash": "test", "alignflow.flow_run_id": "test"})
        stage = tracker.start_run(f"reward_accuracy seed {seed}", {
            "alignflow.stage": "reward_accuracy", "alignflow.round": "0", "alignflow.key": f"{seed}" * 64,
            "alignflow.kind": "reward_accuracy"}, parent=parent)
        tracker.log(stage, metrics=accuracies(0.8 - 0.04 * seed), params={"seed": seed},
                    tags={"alignflow.cache": "miss"})
        tracker.end(stage)
        tracker.end(parent)
        stages.append(stage)
    return tracker.experiment_id, stages


def chrome(profile: Path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install -y chromium chromium-driver "
                    "(.ci/run does it)", pytrace=False)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium: no usage statistics (no network here)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    driver.set_script_timeout(30)
    return driver


@pytest.mark.timeout(300)
def test_compare_runs_page_shows_exrm_and_dporm_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    experiment_id, runs = two_seeds(tmp_path / "mlflow.db")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wanted = [f"{reward}_acc_{set_}" for reward in ("exrm", "dporm") for set_ in ("id", "prompt_shift", "response_shift")]
    with mlflow_server(tmp_path, backend=f"sqlite:///{tmp_path / 'mlflow.db'}") as url:
        driver = chrome(tmp_path / "chromium-profile")
        try:
            query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([experiment_id])})
            driver.get(f"{url}/#/compare-runs?{query}")

            seen: set[str] = set()

            def table_shows_every_name(d) -> bool:
                """The metrics table is virtualised (only the rows in its scroll box exist), so
                scroll through it, collecting the metric names displayed as its rows' links."""
                for name in wanted:
                    if any(a.is_displayed() for a in d.find_elements("xpath", f"//a[normalize-space(text())='{name}']")):
                        seen.add(name)
                if seen == set(wanted):
                    return True
                d.execute_script(SCROLL_METRICS)
                return False

            try:
                # The page re-renders as it loads: an element found may go stale before it is read.
                WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.5,
                              ignored_exceptions=(StaleElementReferenceException,)).until(table_shows_every_name)
                driver.execute_script(SCROLL_METRICS, True)  # the screenshot: the metrics table from its top
            finally:
                driver.save_screenshot(str(artifacts_dir() / "mlflow-compare-runs.png"))
            text = driver.find_element("tag name", "body").text
            assert all(name in driver.page_source for name in wanted)
            assert "0.8" in text and "0.76" in text, "both runs' values"  # exrm_acc_id of seed 0 and 1
        finally:
            driver.quit()
    assert (artifacts_dir() / "mlflow-compare-runs.png").stat().st_size > 10_000
