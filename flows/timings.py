"""Where one `alignflow run` spends its time, by phase: written as JSON to the file that
ALIGNFLOW_TIMINGS names when the run ends (bench/cache_speedup.py reads it). Measuring costs a
clock read per phase; nothing is written unless the variable is set."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Iterator

STARTED = time.perf_counter()  # when the CLI first imports flows/: the interpreter's start is before it
PHASES: dict[str, float] = {}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time to phase `name` (a phase may be entered several times)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - started)


def timed(name: str):
    """A decorator: the function's calls count to phase `name`."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def add(name: str, seconds: float) -> None:
    PHASES[name] = PHASES.get(name, 0.0) + seconds


def write(**extra) -> None:
    path = os.environ.get("ALIGNFLOW_TIMINGS")
    if path:
        found = {**{k: round(v, 3) for k, v in PHASES.items()}, **extra,
                 "total": round(time.perf_counter() - STARTED, 3)}
        with contextlib.suppress(OSError):
            with open(path, "w") as handle:
                json.dump(found, handle)
