"""A temporary local Prefect server for one `alignflow run`, started as early as possible.

This is what Prefect's own ephemeral mode does (a uvicorn subprocess serving
`prefect.server.api.server:create_app`, stopped at exit), with one difference that matters for a
fully cached run: we start it before importing prefect and mlflow, so its ~4 s boot overlaps our
own start-up instead of following it, and without importing prefect.server into this process.
Users with their own server set PREFECT_API_URL and none is started.

The server runs in a session of its own (flows/children.py): Ctrl-C in the terminal reaches only
the run, which records what it stopped before it stops the server; and the server stops itself
when the run dies. Its stderr is kept (the last lines), to say why it failed, if it does; a server
that dies under a running pipeline stops the run (flows/stopping.py) within seconds.
"""
from __future__ import annotations

import atexit
import collections
import importlib.util
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from flows import stopping, timings
from flows.children import owned_command
from flows.locks import WaitNotes, release_flock, try_flock

READY_MARK = ".alignflow-ready"  # this Prefect home's database exists: servers may start at once
CREATING_MARK = ".alignflow-creating"  # a first start is making the database: if it is still here, it died


class LocalPrefectServer:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._first_start: tuple[Path, int] | None = None
        self._stopping = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)

    def start(self) -> None:
        # Servers starting at once on a new Prefect home would each create its database: the
        # first start in a home happens alone, under a lock held until the server answers.
        home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
        if not (home / READY_MARK).exists():
            lock = home / ".alignflow-start.lock"
            home.mkdir(parents=True, exist_ok=True)
            note = WaitNotes(lock, f"the first start of Prefect's server in {home}")
            while (fd := try_flock(lock)) is None:
                note()
                time.sleep(0.1)
            if (home / READY_MARK).exists():  # another run's first start, while we waited
                release_flock(lock, fd)
            else:
                self._first_start = (lock, fd)
                _redo_a_half_made_database(home)
        self.port = _free_port()
        self.spawned = time.perf_counter()
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            owned_command("uvicorn", ["--app-dir", str(prefect_dir.parent), "--factory",
                                      "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        threading.Thread(target=self._read_stderr, daemon=True, name="prefect-server-stderr").start()
        atexit.register(self.stop)
        stopping.on_hard_stop(self.kill, immediate=True)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{self.port}/api"

    def _read_stderr(self) -> None:
        for line in iter(self.process.stderr.readline, b""):
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    def _watch(self) -> None:
        """A server that exits while the run still needs it stops the run (exit 1)."""
        while self.process.poll() is None:
            time.sleep(0.5)
        if not self._stopping:
            last = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
            stopping.request(f"the temporary Prefect server (pid {self.process.pid}) exited with code "
                             f"{self.process.returncode} under the run" + (f" ({last.strip()[:200]})" if last else ""),
                             1, grace=stopping.LOST_SERVER_GRACE_S)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.1)  # its last words
                tail = "\n".join(list(self.stderr_tail)[-20:])
                raise RuntimeError(f"the local Prefect server exited with code {self.process.returncode}"
                                   + (f":\n{tail}" if tail else ""))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        timings.add("prefect start", time.perf_counter() - self.spawned)  # spawn to first answer
                        self._end_first_start()
                        threading.Thread(target=self._watch, daemon=True, name="prefect-server-watch").start()
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the local Prefect server did not answer within {timeout:.0f}s")

    def _end_first_start(self) -> None:
        if self._first_start:
            lock, fd = self._first_start
            (lock.parent / READY_MARK).touch()
            (lock.parent / CREATING_MARK).unlink(missing_ok=True)
            release_flock(lock, fd)
            self._first_start = None

    def stop(self) -> None:
        self._stopping = True
        if self.process and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)

    def kill(self) -> None:
        """Stop it without waiting (a hard stop: the process exits next)."""
        self._stopping = True
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # its own group: the server and anything it started
        except (ProcessLookupError, PermissionError):
            pass


def _redo_a_half_made_database(home: Path) -> None:
    """A home's first server start creates Prefect's database (its migrations); one that died
    before the server answered (a full disk, a kill) may have left it half-made, which every later
    start would trip on. A mark says a first start is under way: found again, the database it was
    making is removed, to be made anew. A database without the mark (an older alignflow's, or one
    of Prefect's own home, or at a URL the user set) is left as it is."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        return
    creating = home / CREATING_MARK
    if creating.exists():
        for name in ("prefect.db", "prefect.db-wal", "prefect.db-shm", "prefect.db-journal"):
            (home / name).unlink(missing_ok=True)
    elif (home / "prefect.db").exists():
        return
    creating.touch()


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
