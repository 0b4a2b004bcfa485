"""Cold run against no-change (fully cached) runs of a spec, and `plan`'s time, in one home.

    python bench/cache_speedup.py [pipelines/demo.yaml] [--home DIR] [--warm 3] [--no-server-runs]

Baseline: the cold run of the same spec, in the same home, measured just before. With --home, a
home that already holds this spec's cold run (and its time, in bench-cold.json) is reused, so
the no-change runs can be measured again without paying for the cold one.
Each no-change run prints its phases, as the CLI measured them (ALIGNFLOW_TIMINGS): imports,
the Prefect server's start and what we waited for it, MLflow, and the flow's cost per stage.
Then the same no-change runs against a Prefect server that outlives them (what `alignflow server`
and PREFECT_API_URL give): without the server's start in each run, the figure a user with a
server sees. The last line is the default case, each run starting its own temporary server.
Last line: `cache_speedup: warm/cold X.XXX (cold C s, warm W s); plan P s`. Targets: warm/cold
<= 0.02, plan <= 1.5 s on the demo.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes, theirs included (the Prefect
    server's): on a shared machine, the figure the other processes do not inflate."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed(args: list[str], home: Path, timings: Path | None = None, api: str | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this child's and its children's) of one `alignflow` command.
    api: a running Prefect server's URL; None, the run's own temporary server, as a user gets by default."""
    env = {**os.environ, "ALIGNFLOW_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    if timings is not None:
        env["ALIGNFLOW_TIMINGS"] = str(timings)
    started, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"alignflow {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return seconds, cpu_seconds() - cpu


def phases(timings: Path, wall: float) -> str:
    try:
        found = json.loads(timings.read_text())
    except (OSError, ValueError):
        return "no phase times"
    per_stage = found.pop("per_stage", None)
    found["interpreter start and exit"] = wall - found["total"]  # outside what the CLI measures
    shown = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in found.items() if name != "stages")
    if per_stage is not None:
        shown += f"; per stage {per_stage * 1000:.0f} ms ({found.get('stages', '?')} stages)"
    return shown


def no_change_runs(spec: str, home: Path, count: int, api: str | None = None) -> list[float]:
    walls = []
    for i in range(count):
        timings = home / f"bench-timings-{i}.json"
        timings.unlink(missing_ok=True)  # an earlier bench's
        wall, cpu = timed(["run", spec], home, timings, api)
        walls.append(wall)
        print(f"no-change run {i + 1}: {wall:.2f}s (cpu {cpu:.2f}s{'' if api else ', Prefect server included'}); "
              f"{phases(timings, wall)}", flush=True)
    return walls


def running_server(home: Path):
    """A Prefect server that outlives the runs, on the home's Prefect database: what
    `alignflow server` gives (with PREFECT_API_URL set, a run starts none of its own)."""
    os.environ["ALIGNFLOW_HOME"] = str(home)
    sys.path.insert(0, str(REPO))
    from flows.home import configure_environment
    from flows.prefect_server import LocalPrefectServer

    configure_environment()
    server = LocalPrefectServer()
    server.start()
    server.wait_ready()
    return server


def measure(spec: str, home: Path, warm_runs: int, with_server: bool) -> None:
    record = home / "bench-cold.json"
    spec_hash = hashlib.sha256(Path(spec).read_bytes()).hexdigest()  # the same spec in another checkout too
    cold = json.loads(record.read_text()) if record.is_file() else {}
    if cold.get("spec_sha256") == spec_hash:
        print(f"cold {cold['seconds']:.1f}s (measured earlier in {home})")
    else:
        seconds, cpu = timed(["run", spec], home)
        cold = {"spec_sha256": spec_hash, "seconds": seconds, "cpu": cpu}
        record.write_text(json.dumps(cold))
        print(f"cold {cold['seconds']:.1f}s (cpu {cold['cpu']:.1f}s)", flush=True)
    best = min(no_change_runs(spec, home, warm_runs))
    plans = [timed(["plan", spec], home)[0] for _ in range(3)]
    print(f"plan: {', '.join(f'{p:.2f}s' for p in plans)}")
    if with_server:
        server = running_server(home)
        try:
            print(f"with a running Prefect server ({os.environ['PREFECT_API_URL']}):")
            served = min(no_change_runs(spec, home, warm_runs, os.environ["PREFECT_API_URL"]))
        finally:
            server.stop()
        print(f"with a running Prefect server: warm/cold {served / cold['seconds']:.3f} (warm {served:.2f} s)")
    print(f"cache_speedup: warm/cold {best / cold['seconds']:.3f} (cold {cold['seconds']:.1f} s, warm {best:.2f} s); "
          f"plan {min(plans):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="pipelines/demo.yaml")
    parser.add_argument("--home", type=Path, help="keep (or reuse) the cold run's home here")
    parser.add_argument("--warm", type=int, default=3, help="no-change runs (the best one counts)")
    parser.add_argument("--no-server-runs", dest="with_server", action="store_false",
                        help="skip the no-change runs against a running Prefect server")
    args = parser.parse_args()
    if args.home:
        args.home.mkdir(parents=True, exist_ok=True)
        measure(args.spec, args.home.resolve(), args.warm, args.with_server)
        return
    with tempfile.TemporaryDirectory() as home:
        measure(args.spec, Path(home), args.warm, args.with_server)


if __name__ == "__main__":
    main()
