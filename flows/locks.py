"""Prefect's file lock manager, made safe against a holder that died.

With SERIALIZABLE isolation, Prefect holds a file lock per cache key while a task computes it, so
two runs needing the same key compute it once. Its locks never expire, though: a run killed with
SIGKILL mid-stage would block every later run forever. Here a lock records its holder's host and
process id, and a lock whose holder process is gone (on this host) counts as free.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager

_HOST = socket.gethostname()


def _tag(holder: str) -> str:
    prefix = f"{_HOST}|{os.getpid()}|"
    return holder if holder.startswith(prefix) else prefix + holder  # the base class re-enters


def _holder_dead(tagged: str) -> bool:
    host, _, rest = tagged.partition("|")
    pid, _, _ = rest.partition("|")
    if host != _HOST or not pid.isdigit():
        return False  # another machine's lock: only its expiry can free it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class CrashSafeLockManager(FileSystemLockManager):
    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            info = super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # the holder has created the file but not yet written it
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}
        if info is not None and _holder_dead(info.get("holder", "")):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return None
        return info

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        return super().acquire_lock(key, _tag(holder), acquire_timeout, hold_timeout)

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        return await super().aacquire_lock(key, _tag(holder), acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, _tag(holder))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return super().is_lock_holder(key, _tag(holder))
