"""A full disk, recognised whatever met it (a stage writing its artifact, MLflow's or Prefect's
database, Prefect's result files), so that the CLI says `no space left on device: <path>` in one
line instead of the traceback of whichever library it reached first.

Nothing partial is committed either way: an artifact is renamed into place whole (flows/store.py),
MLflow's first database is built beside its place (flows/tracking.py), and Prefect's first one is
made anew when its making died (flows/prefect_server.py).
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

# How libraries word it: the OS (ENOSPC, EDQUOT; EFBIG past a file size limit), SQLite, Rust's io
# (safetensors), Arrow.
_WORDS = re.compile(r"No space left on device|database or disk is full|Disk quota exceeded|File too large|"
                    r"\[Errno (28|122|27)\]|StorageFull|QuotaExceeded|FileTooLarge", re.IGNORECASE)
_SQLITE_FULL = re.compile(r"database or disk is full", re.IGNORECASE)
_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """The error, its causes and contexts, a StageFailed's cause, an exception group's members."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None),
                 *getattr(current, "exceptions", ())]


def _free_bytes(path: Path) -> float:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return float("inf")
    return stat.f_bavail * stat.f_frsize


def no_space_at(error: BaseException | None, server_lines: Iterable[str] = (), *, mlflow_db: Path | None = None,
                prefect_db: Path | None = None, places: Iterable[Path] = ()) -> Path | None:
    """Where a failure ran out of space, or None when it is not a full disk. The path: the file
    the OS named; else the database SQLite could not grow (MLflow's in this process, Prefect's in
    its server); else, of `places` (where stages write), the one with the least space left."""
    for current in _chain(error):
        if isinstance(current, OSError) and current.errno in _ERRNOS and (current.filename or current.filename2):
            return Path(current.filename or current.filename2)
    words = [str(current) for current in _chain(error)]
    if any(_WORDS.search(text) for text in words):
        if mlflow_db is not None and any(_SQLITE_FULL.search(text) for text in words):
            return mlflow_db
        places = list(places)
        return min(places, key=_free_bytes) if places else Path.cwd()
    if prefect_db is not None and any(_WORDS.search(line) for line in server_lines):
        return prefect_db
    return None
