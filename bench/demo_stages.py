"""Run a spec's stage functions directly, without Prefect or MLflow, to tune and time them.

    python bench/demo_stages.py [pipelines/demo.yaml] --seeds 0 1 2 [--set stages.dpo.beta=0.2 ...]

Resolves the spec exactly as `alignflow run` does (same graph, rounds and seeds), runs every
stage in order into a temporary folder, and prints each stage's seconds and metrics; then, per
seed, the reward model's held-out accuracy and the win rate of each round. The baseline for the
engine's overhead is this: `alignflow run`'s cold time minus the sum printed here.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.keys import resolve  # noqa: E402
from flows.spec import load_spec  # noqa: E402
from tasks import load_stage_kinds  # noqa: E402
from tasks.base import StageContext  # noqa: E402


def run_spec(spec_file: str, overrides: list[str], folder: Path) -> dict[str, dict]:
    kinds, metrics = load_stage_kinds(), {}
    total = 0.0
    for node in resolve(load_spec(spec_file, overrides)):
        out = folder / node.id
        out.mkdir(parents=True)
        ctx = StageContext(out=out, inputs={p: folder / i for p, i in node.inputs.items()},
                           params=node.params, seed=node.recipe["seed"])
        started = time.perf_counter()
        metrics[node.id] = kinds[node.kind].run(ctx)
        seconds = time.perf_counter() - started
        total += seconds
        shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics[node.id].items())
        print(f"  {node.label:<22} {seconds:6.1f}s  {shown}", flush=True)
    print(f"  {'all stages':<22} {total:6.1f}s")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default="pipelines/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = parser.parse_args()
    summary = []
    for seed in args.seeds:
        print(f"seed {seed}")
        with tempfile.TemporaryDirectory() as folder:
            m = run_spec(args.spec, [*args.overrides, f"seed={seed}"], Path(folder))
        rates = {i: v for i, v in m.items() if i.startswith("evaluate@")}
        summary.append((seed, m.get("reward_model", {}).get("eval_accuracy"), rates))
    for seed, accuracy, rates in summary:
        shown = "  ".join(f"{i}: {v['win_rate']:.3f} [{v['win_rate_ci_low']:.3f}, {v['win_rate_ci_high']:.3f}]"
                          for i, v in rates.items())
        print(f"seed {seed}: reward model held-out accuracy {accuracy}; win rate vs SFT {shown}")


if __name__ == "__main__":
    main()
