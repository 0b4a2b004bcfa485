"""A temporary local Prefect server for one `alignflow run`, started as early as possible.

This is what Prefect's own ephemeral mode does (a uvicorn subprocess serving
`prefect.server.api.server:create_app`, stopped at exit), with one difference that matters for a
fully cached run: we start it before importing prefect and mlflow, so its ~4 s boot overlaps our
own start-up instead of following it, and without importing prefect.server into this process.
Users with their own server set PREFECT_API_URL and none is started.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows import timings
from flows.locks import release_flock, try_flock

READY_MARK = ".alignflow-ready"  # this Prefect home's database exists: servers may start at once


# The server process watches its owner: when the owner dies, however (SIGKILL of its pid alone,
# the OOM killer), the server is re-parented and stops itself, rather than listen forever.
# A thread polling the parent pid works on every POSIX system, unlike Linux's PR_SET_PDEATHSIG.
_WATCHED_UVICORN = """
import os, signal, sys, threading, time
owner = int(sys.argv.pop(1))
def watch():
    while os.getppid() == owner:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(5)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
from uvicorn.main import main
sys.argv[0] = "uvicorn"
main()
"""


class LocalPrefectServer:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._first_start: tuple[Path, int] | None = None

    def start(self) -> None:
        # Servers starting at once on a new Prefect home would each create its database: the
        # first start in a home happens alone, under a lock held until the server answers.
        home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
        if not (home / READY_MARK).exists():
            lock = home / ".alignflow-start.lock"
            home.mkdir(parents=True, exist_ok=True)
            while (fd := try_flock(lock)) is None:
                time.sleep(0.1)
            self._first_start = (lock, fd)
        self.port = _free_port()
        self.spawned = time.perf_counter()
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WATCHED_UVICORN, str(os.getpid()), "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL,
        )
        atexit.register(self.stop)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        timings.add("prefect start", time.perf_counter() - self.spawned)  # spawn to first answer
                        self._end_first_start()
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the local Prefect server did not answer within {timeout:.0f}s")

    def _end_first_start(self) -> None:
        if self._first_start:
            lock, fd = self._first_start
            (lock.parent / READY_MARK).touch()
            release_flock(lock, fd)
            self._first_start = None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_if_needed() -> LocalPrefectServer | None:
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = LocalPrefectServer()
    server.start()
    return server
