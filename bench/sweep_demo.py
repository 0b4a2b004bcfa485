"""A 2 x 2 sweep of the demo in one run: stage executions against 4 x the single run's, its wall
time against its stages' own times, and a rerun.

    python bench/sweep_demo.py [pipelines/demo.yaml] [--home DIR] [--sweep KEY=V1,V2 ...] [--small]

Runs `alignflow run SPEC --sweep stages.dpo.beta=0.05,0.1 --sweep rounds.reference=fixed,previous`
cold in a fresh home (or --home, emptied first), then the same command again. Prints:
- the stage executions it computed against V x the spec's single-run executions (`alignflow plan
  --json` of the spec alone), and the stages computed once for every variant (plan's keys);
- its wall time against the sum of the computed stages' own times (what each stage's task spent
  computing, ALIGNFLOW_TIMINGS) plus one start-up, where the start-up is the rerun's wall time:
  the interpreter, imports, the Prefect server, MLflow, and recording every variant's stage runs
  as cache hits, all but computing. Target: at most 1.1;
- what the rerun computed (target: nothing).
Last line: `sweep_demo: computed E of V x S = N stage executions (E/N); wall / (stages + start-up)
R (cold C s, stages X s, start-up U s); rerun computed K`.
--small: the demo at the tests' tiny sizes (tests/conftest.py's small_demo), a quick check that
the bench works; its ratios say little (start-up dominates).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["stages.dpo.beta=0.05,0.1", "rounds.reference=fixed,previous"]


def alignflow(args: list[str], home: Path, timings: Path | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of one `alignflow` command in `home` (its own temporary Prefect server)."""
    env = {**os.environ, "ALIGNFLOW_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    if timings is not None:
        env["ALIGNFLOW_TIMINGS"] = str(timings)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"alignflow {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started, done.stdout


def plan(spec: str, home: Path, sweep: list[str]) -> list[dict]:
    _, out = alignflow(["plan", spec, "--json", *(a for s in sweep for a in ("--sweep", s))], home)
    return [json.loads(line) for line in out.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="pipelines/demo.yaml")
    parser.add_argument("--home", type=Path, help="the ALIGNFLOW_HOME to use (emptied first); default: a temporary one")
    parser.add_argument("--sweep", action="append", help=f"default: {' '.join(SWEEP)}")
    parser.add_argument("--small", action="store_true", help="the demo at the tests' tiny sizes")
    args = parser.parse_args()
    sweep = args.sweep or SWEEP
    home = args.home or Path(tempfile.mkdtemp(prefix="alignflow-sweep-bench-"))
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    spec = args.spec
    if args.small:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import small_demo

        spec = str(small_demo(home, rounds=3, name="demo-sweep-small"))

    single = len(plan(spec, home, []))
    rows = plan(spec, home, sweep)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    keys = {(r["stage"], r["round"]): set() for r in rows}
    for r in rows:
        keys[r["stage"], r["round"]].add(r["key"])
    unique = len({r["key"] for r in rows})
    shared = [f"{stage}@{round_}" if round_ else stage for (stage, round_), found in keys.items() if len(found) == 1]
    print(f"{spec}: {len(variants)} variants ({'; '.join(variants)}), {single} stage executions each "
          f"in a single run, {len(rows)} in all, {unique} stage keys", flush=True)
    print(f"  computed once for every variant: {', '.join(shared)}", flush=True)
    print("  keys per stage and round: " + ", ".join(f"{s}@{r} {len(k)}" for (s, r), k in keys.items() if r), flush=True)

    command = ["run", spec, *(a for s in sweep for a in ("--sweep", s))]
    cold_timings, warm_timings = home / "bench-cold.json", home / "bench-warm.json"
    cold, _ = alignflow(command, home, cold_timings)
    found = json.loads(cold_timings.read_text())
    print(f"cold sweep: {cold:.1f}s wall; computed {found['ran']} stage executions in {found['ran_seconds']:.1f}s of "
          f"their own; phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in found.items()
                                             if k not in ("ran", "ran_seconds", "stages", "per_stage")), flush=True)
    warm, _ = alignflow(command, home, warm_timings)
    rerun = json.loads(warm_timings.read_text())
    print(f"rerun: {warm:.1f}s wall; computed {rerun['ran']}; phases: " + ", ".join(
        f"{k} {v:.1f}s" for k, v in rerun.items() if k not in ("ran", "ran_seconds", "stages", "per_stage")), flush=True)
    ratio = cold / (found["ran_seconds"] + warm)
    total = len(variants) * single
    print(f"sweep_demo: computed {found['ran']} of {len(variants)} x {single} = {total} stage executions "
          f"({found['ran'] / total:.2f}); wall / (stages + start-up) {ratio:.2f} (cold {cold:.1f} s, stages "
          f"{found['ran_seconds']:.1f} s, start-up {warm:.1f} s); rerun computed {rerun['ran']}")


if __name__ == "__main__":
    main()
