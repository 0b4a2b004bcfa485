"""Stopping a run before its end: a signal (Ctrl-C, SIGTERM, a closed terminal), bad input data
found while running, or the temporary Prefect server lost under the run.

The first request sets the run's reason to stop. Every computing stage checks it at its next step
(each metric step it logs, each progress advance) and before it commits, and raises `Cancelled`:
it commits nothing. Stages that finished are kept. The flow then ends its MLflow runs as KILLED and
its Prefect run as Cancelled, and the CLI says in one line what stopped and what was kept.

A stage may not reach a step for a while (a long generation batch): `GRACE_S` after the request,
the process stops anyway (a hard stop): the callbacks registered with `on_hard_stop` write the
records, the line is printed, and the process exits. A second signal hard-stops at once, without
records (the next run ends the runs left RUNNING as KILLED). A stage abandoned this way commits
nothing either: an artifact is renamed into place whole, or not at all.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

GRACE_S = 7.0  # a signal stops the run within 10 s: this, then at most RECORDS_S of records
LOST_SERVER_GRACE_S = 5.0  # without its Prefect server the flow cannot end by itself
RECORDS_S = 2.5  # what a hard stop gives the records before it exits regardless


class Cancelled(Exception):
    """A stage stopped at a step, uncommitted, because the run is stopping."""


@dataclass
class Request:
    reason: str  # "SIGINT", "bad input data: ...", "the Prefect server ... exited"
    exit_code: int
    signal: int | None = None
    error: BaseException | None = None  # the error to report instead of a stop line (bad input data)
    at: float = field(default_factory=time.monotonic)


class Stopped(Exception):
    """The run stopped on a request; raised out of the flow (Prefect records it as Cancelled)."""

    def __init__(self, request: Request):
        self.request = request
        super().__init__(summary(request))


_REQUESTS: list[Request] = []
_LOCK = threading.Lock()
_HARD_STOP: list[tuple[Callable[[], None], bool]] = []
_DEADLINE: list[threading.Thread] = []
# What the run has done so far, for the line: stage labels kept (finished), computing now, and
# stopped while computing.
KEPT: dict[str, None] = {}  # ordered, once each
COMPUTING: set[str] = set()
STOPPED: list[str] = []


def reset(signals: bool = False) -> None:
    """A new run in this process (tests run several). A signal already received still counts,
    unless `signals` (a new command)."""
    with _LOCK:
        _REQUESTS[:] = [r for r in _REQUESTS if r.signal is not None and not signals]
        KEPT.clear()
        COMPUTING.clear()
        STOPPED.clear()
        if signals:
            _REPORTED.clear()


def request(reason: str, exit_code: int, signum: int | None = None, error: BaseException | None = None,
            grace: float | None = None, first: bool = False) -> Request:
    """Ask the run to stop; the first request is the one reported (`first`: this one instead).
    With `grace`, the process hard-stops that many seconds later if it has not ended by then."""
    with _LOCK:
        _REQUESTS.insert(0 if first else len(_REQUESTS), Request(reason, exit_code, signum, error))
        start = grace is not None and not _DEADLINE
        if start:
            _DEADLINE.append(threading.Thread(target=_hard_stop_after, args=(grace,), daemon=True,
                                              name="alignflow-stop"))
        current = _REQUESTS[0]
    if start:
        _DEADLINE[0].start()
    return current


def requested() -> Request | None:
    return _REQUESTS[0] if _REQUESTS else None


def check() -> None:
    """Raise Cancelled if the run is stopping: a stage calls it at each step and before it commits."""
    if _REQUESTS:
        raise Cancelled(f"cancelled: {_REQUESTS[0].reason}")


@contextlib.contextmanager
def checked() -> Iterator[None]:
    """check() on entering: a stage about to start does not when the run is stopping."""
    check()
    yield


@contextlib.contextmanager
def computing(label: str) -> Iterator[None]:
    """Name a stage as computing while it does, for the line a stopped run prints."""
    COMPUTING.add(label)
    try:
        yield
    except Cancelled:
        STOPPED.append(label)
        raise
    finally:
        COMPUTING.discard(label)


def kept(label: str) -> None:
    KEPT[label] = None


def on_hard_stop(callback: Callable[[], None], immediate: bool = False) -> Callable[[], None]:
    """Run `callback` before a hard stop exits: records (all at once), or (`immediate`, after
    them, and also on a second Ctrl-C) stopping a server that must not outlive the run."""
    _HARD_STOP.append((callback, immediate))
    return callback


def forget_hard_stop(callback: Callable[[], None]) -> None:
    _HARD_STOP[:] = [entry for entry in _HARD_STOP if entry[0] is not callback]


def summary(req: Request) -> str:
    """The one line: what stopped, what was kept."""
    computing = [*STOPPED, *sorted(COMPUTING - set(STOPPED))]
    stopped = (f"stopped {', '.join(computing)} (nothing of it committed)" if computing
               else "no stage was computing")
    count = len(KEPT)
    shown = f": {', '.join(KEPT)}" if 0 < count <= 4 else ""
    return (f"{req.reason}: {stopped}; kept {count} finished stage{'s' * (count != 1)}{shown}; "
            f"`alignflow run` again resumes from them")


_REPORTED: list[bool] = []


def report(req: Request) -> None:
    """Print the line (once)."""
    from flows.console import console

    if _REPORTED:
        return
    _REPORTED.append(True)
    if req.exit_code == 1:  # a failure (the server lost), not a stop someone asked for
        console.print(f"[red]error:[/] {summary(req)}")
    else:
        console.print(f"[yellow]stopped[/] by {summary(req)}")


def _quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except BaseException:  # noqa: BLE001 - best effort: the next run ends what is left as KILLED
        pass


def hard_stop(records: bool = True) -> None:
    """Stop now: the line, the records (all at once, for at most RECORDS_S; none unless
    `records`), then the immediate callbacks (the server the records needed), the exit."""
    req = requested() or Request("stopped", 1)
    try:
        report(req)
        sys.stderr.flush()
        if records:
            writers = [threading.Thread(target=_quietly, args=(callback,), daemon=True)
                       for callback, immediate in list(_HARD_STOP) if not immediate]
            for writer in writers:
                writer.start()
            deadline = time.monotonic() + RECORDS_S
            for writer in writers:
                writer.join(max(0.0, deadline - time.monotonic()))
        for callback, immediate in reversed(list(_HARD_STOP)):
            if immediate:
                _quietly(callback)
    finally:
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(req.exit_code)


def _hard_stop_after(grace: float) -> None:
    time.sleep(grace)
    hard_stop()


# ---- signals -------------------------------------------------------------------------------

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_INSTALLED: list[bool] = []


def _on_signal(signum, frame) -> None:
    current = requested()
    if current is not None and current.signal is not None:  # a second signal: at once
        hard_stop(records=False)
    # Stopping already for another reason (bad data): the signal is what is reported.
    request(signal.Signals(signum).name, 128 + signum, signum=signum, grace=GRACE_S, first=True)


@contextlib.contextmanager
def signal_handlers() -> Iterator[None]:
    """For the block (a command, in the main thread): SIGINT, SIGTERM and SIGHUP stop the run,
    the first gently, a second at once. The handlers before it are restored after it, unless
    the run is stopping (then a second signal during the exit still stops at once)."""
    reset(signals=True)
    previous = {signum: signal.signal(signum, _on_signal) for signum in _SIGNALS}
    _INSTALLED[:] = [True]
    try:
        yield
    finally:
        if not any(r.signal is not None for r in _REQUESTS):
            _INSTALLED.clear()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def reassert_signal_handlers() -> None:
    """Prefect's flow engine installs its own SIGTERM handler for the flow's duration; inside the
    flow, ours is put back (only where the CLI installed it: a deployment's runner keeps Prefect's)."""
    if _INSTALLED and threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            if signal.getsignal(signum) is not _on_signal:
                signal.signal(signum, _on_signal)
