"""Locks held by the operating system, so a holder that dies frees them, and no cleanup can ever
remove a live one.

With SERIALIZABLE isolation, Prefect holds a lock per cache key while a task computes it, so two
runs needing the same key compute it once. Prefect's file lock manager marks a lock by a file's
existence: it never expires, and freeing the lock of a dead holder means "check, then delete",
which can delete a lock another process has just taken. Here a lock is an `flock` on a file: the
kernel releases it when its holder exits, however it exits (SIGKILL, OOM).

The lock file is removed by its holder on release, while still locked. A process that opened it
before the removal then locks an unlinked file; it notices (the path no longer names the file it
holds) and tries again, so two processes never both hold one key.

A holder writes its pid and command into the file, so that a process waiting for it says whose
lock it waits for, every WAIT_NOTE_S seconds.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from flows.store import plain

# (lock folder, key) -> (fd, holder) for the locks this process holds: shared by every manager
# instance (Prefect may copy its lock manager), guarded for the task runner's threads.
_HELD: dict[tuple[str, str], tuple[int, str]] = {}
_GUARD = threading.Lock()
POLL_S = 0.1
WAIT_NOTE_S = 10.0  # a waiter says whose lock it waits for, this often
LABELS: dict[str, str] = {}  # key -> the stage it is, for those notes (the flow fills it)


def try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if need be), or None if another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                _write_holder(fd)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it between our open and our lock: a new file now


def _write_holder(fd: int) -> None:
    """Our pid and command, for whoever waits for this lock (a full disk only loses the note)."""
    program = "alignflow" if sys.argv and sys.argv[0].endswith(("alignflow", "flows/cli.py")) else sys.argv[0] if sys.argv else "python"
    note = f"{os.getpid()} {shlex.join([Path(program).name, *sys.argv[1:]])}\n".encode()
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as its holder wrote it: "pid 123 (alignflow run x.yaml)"."""
    try:
        pid, _, command = path.read_text(errors="replace").strip().partition(" ")
    except OSError:
        return "a process that has not said who it is"
    return f"pid {pid} ({command})" if pid.isdigit() else "a process that has not said who it is"


class WaitNotes:
    """Says, every WAIT_NOTE_S seconds of waiting, what for and whose lock it is."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.started = self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= WAIT_NOTE_S:
            self.last = now
            from flows.console import console

            console.print(f"waiting {now - self.started:.0f}s for {self.what}, held by {holder(self.path)}",
                          highlight=False, soft_wrap=True, markup=False)


def release_flock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # while still locked: see the module's docstring
    os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None, what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (blocking, polling) for the block's duration; while
    waiting, say whose it is (`what` it guards: "the lock on ...")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    note = WaitNotes(path, what or f"the lock {path}")
    while (fd := try_flock(path)) is None:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"could not lock {path} within {timeout}s")
        note()
        time.sleep(POLL_S)
    try:
        yield
    finally:
        release_flock(path, fd)


class CrashSafeLockManager:
    """Prefect's LockManager protocol (prefect.locking.protocol) over `flock`s in one folder. `hold_timeout` is not needed:
    a lock lives exactly as long as its holder holds it or lives."""

    def __init__(self, lock_files_directory: Path) -> None:
        self.folder = Path(lock_files_directory).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.folder / plain(f"{key}.lock")

    def _id(self, key: str) -> tuple[str, str]:
        return str(self.folder), key

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        self.folder.mkdir(parents=True, exist_ok=True)
        note = WaitNotes(self._path(key), f"{LABELS.get(key, 'key')} ({key[:12]}), which another run is computing")
        while True:
            with _GUARD:
                held = _HELD.get(self._id(key))
                if held is not None and held[1] == holder:
                    return True
                fd = try_flock(self._path(key)) if held is None else None
                if fd is not None:
                    _HELD[self._id(key)] = (fd, holder)
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            if held is None:  # another process's (this process's own runs share the work)
                note()
            time.sleep(POLL_S)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with _GUARD:
            held = _HELD.get(self._id(key))
            if held is None or held[1] != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del _HELD[self._id(key)]
            release_flock(self._path(key), held[0])

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        with _GUARD:
            if self._id(key) in _HELD:
                return True
            if not self._path(key).exists():
                return False
            fd = try_flock(self._path(key))
            if fd is None:
                return True
            release_flock(self._path(key), fd)  # nobody held it: a dead holder's file, removed
            return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = _HELD.get(self._id(key))
        return held is not None and held[1] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        note = WaitNotes(self._path(key), f"{LABELS.get(key, 'key')} ({key[:12]}), which another run is computing")
        while self.is_locked(key):
            if deadline is not None and time.monotonic() > deadline:
                return False
            if self._id(key) not in _HELD:
                note()
            time.sleep(POLL_S)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
