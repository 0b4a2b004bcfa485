"""Against a real MLflow tracking server (`mlflow server`, started here on a loopback port):
the pipeline logs through it (`tracking.uri` in the spec, or MLFLOW_TRACKING_URI), its artifacts go
through the server's proxy, and everything reads back over MLflow's REST API."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, alignflow
from test_report import TOY, toy_spec, write_spec

HTTP_TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str | None = None, timeout: float = 120):
    """`mlflow server` on 127.0.0.1:<free port> over a sqlite store, artifacts proxied to
    root/art; yields its URL; always stopped (its whole process group) on the way out."""
    port = free_port()
    backend = backend or f"sqlite:///{root / 'db.sqlite'}"
    log = open(root / f"mlflow-server-{port}.log", "w")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {proc.returncode}:\n{(root / log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.time() > deadline:
                raise AssertionError(f"mlflow server not healthy after {timeout}s:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call to MLflow's REST API: GET with query parameters, or POST with a JSON body."""
    full = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        full += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        return json.loads(response.read() or b"{}")


def cli(*args, home: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI with exactly this environment on top of ours (conftest's alignflow() drops
    MLFLOW_TRACKING_URI, which these tests set on purpose)."""
    full = {**os.environ, "ALIGNFLOW_HOME": str(home), "PYTHONPATH": str(REPO / "tests" / "plugins"), **env}
    full.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO, env=full,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"alignflow {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr[-4000:]}"
    return out


def check_over_rest(url: str, experiment: str, artifacts: Path) -> dict:
    """Everything the run recorded, read back with plain HTTP: stage tags and metrics, and the
    parent run's summary table and plots (stored by the server's artifact proxy)."""
    exp = rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:"), exp["artifact_location"]
    runs = rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    metrics = [{m["key"]: m["value"] for m in r["data"].get("metrics", [])} for r in runs]
    parents = [i for i, t in enumerate(tags) if "mlflow.parentRunId" not in t]
    assert len(parents) == 1, tags
    parent = runs[parents[0]]["info"]["run_id"]
    stages = {f"{t['alignflow.stage']}@{t['alignflow.round']}": (t, m) for t, m in zip(tags, metrics)
              if t.get("mlflow.parentRunId") == parent}
    assert set(stages) == {"start@0", "reward_accuracy_0@0", "improve@1", "evaluate@1"}
    assert {t["alignflow.cache"] for t, _ in stages.values()} == {"miss"}
    assert all(len(t["alignflow.key"]) >= 16 and t["alignflow.uri"].endswith(t["alignflow.key"]) for t, _ in stages.values())
    assert stages["evaluate@1"][1]["win_rate"] == pytest.approx(0.55)
    assert stages["reward_accuracy_0@0"][1]["dporm_acc_prompt_shift_ci_high"] == pytest.approx(0.72)

    listed = rest(url, "artifacts/list", run_id=parent)
    assert {f["path"] for f in listed["files"]} >= {"summary.json", "spec.yaml", "plots"}
    plots = rest(url, "artifacts/list", run_id=parent, path="plots")
    sizes = {f["path"]: int(f["file_size"]) for f in plots["files"]}
    assert set(sizes) == {"plots/win_rate.png", "plots/reward_accuracy.png"} and min(sizes.values()) > 5000
    query = urllib.parse.urlencode({"path": "summary.json", "run_uuid": parent})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=HTTP_TIMEOUT) as response:
        table = json.loads(response.read())
    assert table["columns"][:3] == ["stage", "round", "cache"] and len(table["data"]) == 4
    # The server stored them under --artifacts-destination: nothing went to a client-side path.
    assert list(artifacts.rglob("plots/reward_accuracy.png")), "artifacts not stored by the server"
    return {"parent": parent, "experiment_id": exp["experiment_id"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root) as url:
        yield {"url": url, "root": root}


def test_pipeline_logs_to_a_tracking_server_named_in_the_spec(server, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec("server-spec", rounds=1, seeds=1, tracking_uri=server["url"]))
    home = tmp_path / "home"
    out = alignflow("run", spec, home=home, env=TOY, check=True, timeout=300)
    assert server["url"] in out.stderr
    check_over_rest(server["url"], "server-spec", server["root"] / "art")
    assert not (home / "mlflow.db").exists() and not (home / "mlflow-artifacts").exists(), "nothing local"


def test_pipeline_logs_to_MLFLOW_TRACKING_URI_and_compare_reads_it(server, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec("server-env", rounds=1, seeds=1))
    home, env = tmp_path / "home", {**TOY, "MLFLOW_TRACKING_URI": server["url"]}
    cli("run", spec, home=home, env=env)
    found = check_over_rest(server["url"], "server-env", server["root"] / "art")
    assert not (home / "mlflow.db").exists()
    out = cli("compare", "server-env", home=home, env=env, timeout=120)
    assert f"server-env: run {found['parent']}" in out.stdout and "0.550 [0.500, 0.600]" in out.stdout
