"""MLflow's UI as a person opens it, in a real (headless) Chromium driven by selenium: each page
`alignflow ui` prints shows the numbers that person came for, in the window, without scrolling:

- the runs list: the pipeline runs, told apart by name, with the win rate of each round as columns;
- the latest run's charts: the win rate by round, each round's value written on its chart;
- EXRM against DPORM: the latest run's reward runs, `EXRM · seed 0` beside `DPORM · seed 0`, with
  their accuracy on each set.

The store is written through the functions the flow logs with (flows/tracking.py, flows/report.py;
tests/test_exrm_report.py runs them through `alignflow run`), then `alignflow ui` serves it. A
screenshot of each page is kept: $ALIGNFLOW_TEST_ARTIFACTS (default test-artifacts/).

Needs Debian's chromium and chromedriver: `make test` and .ci/run install them where they can
(root, or sudo, and apt). Without them these tests skip, saying why; in CI (`CI` set) they fail."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from flows import report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAGE_TIMEOUT = 90
WINDOW = (1600, 1000)  # a laptop's browser window; what shows in it is what a person sees unscrolled
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}")

# The texts among `arguments[0]` that an element shows as its own text, whole: inside the window,
# not cut by an ellipsis, nor by a box around it that clips (a table cell, a scrolled grid).
VISIBLE_TEXTS = """
const wanted = new Set(arguments[0]), seen = new Set();
const inside = (r, box) => r.top >= box.top - 1 && r.left >= box.left - 1 && r.bottom <= box.bottom + 1 && r.right <= box.right + 1;
for (const el of document.querySelectorAll('body *')) {
  const own = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
  if (!wanted.has(own)) continue;
  const r = el.getBoundingClientRect();
  if (!(r.width > 0 && r.height > 0 && inside(r, {top: 0, left: 0, bottom: innerHeight, right: innerWidth}))) continue;
  if (el instanceof HTMLElement && el.scrollWidth > el.clientWidth + 1) continue;  // cut short: text-overflow
  let clipped = false;
  for (let up = el.parentElement; up && up !== document.body && !clipped; up = up.parentElement)
    clipped = getComputedStyle(up).overflowX !== 'visible' && !inside(r, up.getBoundingClientRect());
  if (!clipped) seen.add(own);
}
return [...seen];
"""
# MLflow opens its assistant over a quarter of the window on a browser's first visit to a local
# server; a person closes it (and it stays closed).
CLOSE_ASSISTANT = """
const close = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
if (close) close.click();
return Boolean(close);
"""

def shown(value: float) -> str:
    """A metric as MLflow's runs table writes it: JavaScript's number to string, unrounded
    (Python's shortest repr but for whole numbers: 1.0 shows as "1")."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


DEMO_RATES = {"as written": [0.55, 0.62, 0.71], "dpo.beta=0.2": [0.58, 0.64, 0.69]}  # two runs, rounds 1-3
ACCURACY = {("exrm", 0): (0.96, 0.81, 0.98), ("dporm", 0): (0.95, 0.88, 0.94),
            ("exrm", 1): (0.97, 0.79, 0.97), ("dporm", 1): (0.93, 0.9, 0.92)}


def artifacts_dir() -> Path:
    path = Path(os.environ.get("ALIGNFLOW_TEST_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def need_chromium() -> None:
    """Skip (fail, in CI) without chromium and chromedriver, saying why."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        why = (f"{', '.join(missing)} not found: `make test` installs them where it can "
               "(apt-get install -y chromium chromium-driver, as root)")
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def chrome(profile: Path):
    need_chromium()
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


def open_and_see(driver, url: str, wanted: list[str], shot: str) -> None:
    """Open `url` and wait until every text in `wanted` shows, whole, in the window (closing
    MLflow's assistant if it opened); the screenshot either way."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    seen: set[str] = set()

    def shows_all(d) -> bool:
        d.execute_script(CLOSE_ASSISTANT)
        seen.update(d.execute_script(VISIBLE_TEXTS, wanted))
        return seen >= set(wanted)

    try:
        # The page re-renders as it loads: an element found may go stale before it is read.
        WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.5,
                      ignored_exceptions=(StaleElementReferenceException,)).until(shows_all)
    except TimeoutException:
        pytest.fail(f"not in the window after {PAGE_TIMEOUT}s: {sorted(set(wanted) - seen)} ({shot})")
    finally:
        driver.save_screenshot(str(artifacts_dir() / shot))


def record_runs(uri: str) -> None:
    """Two runs of a demo-like pipeline (3 rounds, the second with a changed beta) and one EXRM vs
    DPORM run (two seeds), logged as the flow logs them: stage runs by name and tags, the parent's
    headline, views and name."""
    from flows.tracking import PIPELINE_RUN_TAG, Tracker, pipeline_run_name, run_name

    def pipeline(experiment: str, changed: list[str], stages: list[dict]) -> None:
        tracker = Tracker(uri, experiment)
        parent = tracker.start_run(pipeline_run_name(experiment, changed=changed),
                                   {"alignflow.spec_hash": "test", "alignflow.flow_run_id": "test"})
        for stage in stages:
            labels = {"reward": stage["reward"]} if "reward" in stage else {}
            run = tracker.start_run(run_name(stage["stage"], stage["round"], seed=stage.get("seed"), **labels), {
                "alignflow.stage": stage["stage"], "alignflow.round": str(stage["round"]),
                **{f"alignflow.{k}": v for k, v in labels.items()}, PIPELINE_RUN_TAG: parent}, parent=parent)
            tracker.log(run, metrics=stage["metrics"], params={"kind": "test", **labels}, tags={"alignflow.cache": "miss"})
            tracker.end(run)
        headline = report.headline_by_round(stages)
        name = pipeline_run_name(experiment, changed=changed, headline=headline)
        tracker.log_headline(parent, headline, rewards=any("reward" in s for s in stages), name=name)
        tracker.rename(parent, name)
        tracker.end(parent)

    accuracy = [{"stage": f"{reward}_acc_s{seed}", "round": 0, "cache": "miss", "reward": reward, "seed": seed,
                 "metrics": {f"acc_{s}{end}": value + shift for s, value in zip(report.SETS, values)
                             for end, shift in (("", 0), ("_ci_low", -0.04), ("_ci_high", 0.03))}}
                for (reward, seed), values in ACCURACY.items()]
    pipeline("browser-exrm", [], accuracy)
    for changed, rates in DEMO_RATES.items():
        pipeline("browser-demo", [changed] if "=" in changed else [], [
            {"stage": "evaluate", "round": r, "cache": "miss",
             "metrics": {"win_rate": w, "win_rate_ci_low": w - 0.03, "win_rate_ci_high": w + 0.03}}
            for r, w in enumerate(rates, 1)])


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`alignflow ui` on a store holding record_runs' runs: its printed pages (the latest run's
    experiment, browser-demo), the EXRM experiment's pages, and a browser."""
    from flows.cli import ui_pages

    need_chromium()  # before the minute of set-up
    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root / 'home' / 'mlflow.db'}"
    (root / "home").mkdir()
    record_runs(uri)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:  # until the URLs are printed (once the server answers)
            lines.append(line)
            if line.startswith("Ctrl+C"):
                break
        urls = [line.split()[-1] for line in lines if "http://" in line]
        assert len(urls) == 2, "".join(lines)  # the runs list and the latest run's charts
        base = f"http://127.0.0.1:{port}/"
        exrm = [base + page for _, page in ui_pages(uri, "browser-exrm")]
        driver = chrome(root / "chromium-profile")
        try:
            yield {"list": urls[0], "charts": urls[1], "rewards": exrm[2], "driver": driver}
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.timeout(300)
def test_runs_list_shows_each_runs_win_rate_by_round(ui):
    names = ["browser-demo · win_rate 0.550 → 0.620 → 0.710",
             "browser-demo · dpo.beta=0.2 · win_rate 0.580 → 0.640 → 0.690"]
    rounds = ["win_rate_round_1", "win_rate_round_2", "win_rate_round_3"]
    values = [shown(w) for rates in DEMO_RATES.values() for w in rates]
    open_and_see(ui["driver"], ui["list"], [*names, *rounds, *values], "mlflow-runs-list.png")


@pytest.mark.timeout(300)
def test_latest_runs_charts_show_the_win_rate_of_each_round(ui):
    # its name as the page's title; each round's win rate written on its chart (two decimals)
    open_and_see(ui["driver"], ui["charts"], ["browser-demo · dpo.beta=0.2 · win_rate 0.580 → 0.640 → 0.690",
                                              "win_rate", "win_rate_round_1", "0.58", "0.64", "0.69"],
                 "mlflow-run-charts.png")


@pytest.mark.timeout(300)
def test_exrm_and_dporm_accuracies_side_by_side(ui):
    runs = [f"{reward.upper()} · seed {seed}" for reward, seed in ACCURACY]
    values = {shown(v) for accuracies in ACCURACY.values() for v in accuracies}
    open_and_see(ui["driver"], ui["rewards"], [*runs, *(f"acc_{s}" for s in report.SETS), *values],
                 "mlflow-exrm-vs-dporm.png")
