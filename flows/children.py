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


def family(pid: int) -> set[int]:
    """`pid` and its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = {pid}, [pid]
    while todo:
        current = todo.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                todo.append(child)
    return found


def describe(pid: int) -> str:
    """"pid 123 (its command line)"."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"pid {pid}" + (f" ({command[:120]})" if command else "")


def port_holder(port: int, owner: int) -> str | None:
    """Who listens on `port` when it is not `owner` or one of its descendants ("pid N (...)"), else
    None (ours, nobody, or no /proc to tell)."""
    pids = listening_pids(port)
    if not pids:
        return None
    ours = family(owner)
    others = sorted(pids - ours)
    return describe(others[0]) if others and not pids & ours else None
