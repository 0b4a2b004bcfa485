"""`alignflow ui`'s MLflow server dies with its owner (SIGKILL of the main process alone, as the
OOM killer does), and two `ui` started at the same moment on one port: the one that loses the
port says so and exits 2, instead of printing the other's URL as its own."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from flows.tracking import Tracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_uis_at_once_one_loses_the_port_and_the_winners_server_dies_with_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    Tracker(f"sqlite:///{home / 'mlflow.db'}", "ui-race")  # a store to show (not one both would create)
    port = free_port()
    env = {**os.environ, "ALIGNFLOW_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "flows.cli", "ui", "--port", str(port)]
    uis = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True) for _ in range(2)]
    try:
        outputs = {}
        deadline = time.time() + 400
        while len(outputs) < 2 and time.time() < deadline:
            for ui in uis:
                if ui.pid not in outputs and ui.poll() is not None:
                    outputs[ui.pid] = (ui.returncode, ui.stdout.read())
            if len(outputs) == 1:
                break
            time.sleep(0.5)
        assert len(outputs) == 1, "exactly one of them ends on its own"
        (loser_code, loser_out), = outputs.values()
        assert loser_code == 2 and f"127.0.0.1:{port} is taken by pid" in loser_out, loser_out[-3000:]
        assert "http://" not in loser_out and "Traceback" not in loser_out
        winner = next(ui for ui in uis if ui.pid not in outputs)
        for line in winner.stdout:  # it answers: its URL, its own server's
            if line.strip().startswith("http://"):
                break
        family = psutil.Process(winner.pid).children(recursive=True)
        assert family
        os.kill(winner.pid, signal.SIGKILL)  # the main process alone
        winner.wait()
        _, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, f"left behind: {[p.cmdline()[:4] for p in alive]}"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "nothing listens on the port any more"
    finally:
        for ui in uis:
            if ui.poll() is None:
                os.killpg(ui.pid, signal.SIGKILL)
