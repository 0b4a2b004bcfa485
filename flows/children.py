"""Servers alignflow starts for one command (the temporary Prefect server of `run`, MLflow's UI
server of `ui`): each in a session of its own, so that Ctrl-C in the terminal reaches only us and
we stop it when we are done with it, and each watching its owner, so that it stops itself when
the owner dies however it dies (SIGKILL of its pid alone, the OOM killer, a closed terminal).

A thread in the child polls its parent pid (this works on every POSIX system, unlike Linux's
PR_SET_PDEATHSIG); when the owner is gone, the child's whole process group gets SIGTERM (a graceful
shutdown, web workers included), then SIGKILL five seconds later.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_WATCHED_MODULE = """
import os, runpy, signal, sys, threading, time
owner, module = int(sys.argv[1]), sys.argv[2]
def stop_group(signum):
    if os.getpgrp() == os.getpid():  # our own group: the server and every worker it started
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)
def watch():
    while os.getppid() == owner:
        time.sleep(0.5)
    stop_group(signal.SIGTERM)
    time.sleep(5)
    stop_group(signal.SIGKILL)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def owned_command(module: str, args: list[str]) -> list[str]:
    """`python -m module args...`, run so that it stops when this process ends. Start it with
    `start_new_session=True`: its process group is then its own, to stop as a whole."""
    return [sys.executable, "-c", _WATCHED_MODULE, str(os.getpid()), module, *args]


def listening_pids(port: int) -> set[int] | None:
    """The pids with a socket listening on TCP `port` (any address), from /proc; None where
    /proc cannot tell (not Linux)."""
    inodes = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except FileNotFoundError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    except (OSError, ValueError, IndexError):
        return None
    if not Path("/proc/self/fd").is_dir():
        return None
    found = set()
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    found.add(int(entry.name))
                    break
        except OSError:  # gone, or not ours to read
            continue
    return found


def group_members(pgid: int) -> set[int]:
    """The pids in process group `pgid` (from /proc)."""
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.add(int(entry.name))
            except OSError:
                continue
    return members
