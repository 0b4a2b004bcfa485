"""Run the demo pipeline's stage functions directly (no Prefect, no MLflow), for tuning.

    python bench/demo_stages.py --config full --seeds 0 1 2

Builds each StageContext itself (artifacts in a temporary folder), runs the stages in the demo's
order for the configured number of rounds, and prints each stage's time and metrics, then the
win rates and reward-model accuracy per seed. CONFIGS mirrors pipelines/demo.yaml.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import load_stage_kinds  # noqa: E402
from tasks.base import StageContext  # noqa: E402

FULL = {
    "models": {"base": {"kind": "tiny", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}},
    "datasets": {
        "sft_data": {"kind": "synthetic", "split": "sft", "size": 4000},
        "rm_pairs": {"kind": "synthetic", "split": "preferences", "size": 4000},
        "rm_heldout": {"kind": "synthetic", "split": "preferences_heldout", "size": 500},
        "train_prompts": {"kind": "synthetic", "split": "prompts", "size": 512},
        "eval_prompts": {"kind": "synthetic", "split": "eval_prompts", "size": 400},
    },
    "sft": {"epochs": 3, "lr": 1e-3, "batch_size": 32},
    "reward_model": {"epochs": 4, "lr": 1e-3, "batch_size": 32},
    "generate": {"n": 4, "temperature": 1.0, "max_new_tokens": 12, "batch_size": 128},
    "pairs": {"min_margin": 0.0},
    "dpo": {"beta": 0.1, "sft_weight": 0.1, "lr": 5e-4, "epochs": 2, "batch_size": 32},
    "evaluate": {"judge": "demo_gold", "temperature": 1.0, "max_new_tokens": 12, "batch_size": 200},
    "rounds": 3,
}
# For CI: a smaller model and less data (its reward model learns sentiment but not topic).
SMALL = {
    **FULL,
    "models": {"base": {"kind": "tiny", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
    "datasets": {
        "sft_data": {"kind": "synthetic", "split": "sft", "size": 2000},
        "rm_pairs": {"kind": "synthetic", "split": "preferences", "size": 2000},
        "rm_heldout": {"kind": "synthetic", "split": "preferences_heldout", "size": 300},
        "train_prompts": {"kind": "synthetic", "split": "prompts", "size": 256},
        "eval_prompts": {"kind": "synthetic", "split": "eval_prompts", "size": 200},
    },
    "sft": {"epochs": 2, "lr": 3e-3, "batch_size": 32},
    "reward_model": {"epochs": 2, "lr": 2e-3, "batch_size": 32},
    "dpo": {"beta": 0.1, "sft_weight": 0.1, "lr": 1e-3, "epochs": 2, "batch_size": 32},
}
CONFIGS = {"full": FULL, "small": SMALL}


def run_stage(kinds, store: Path, name: str, params: dict, inputs: dict[str, str], seed: int, log: list):
    kind = kinds[params["kind"]]
    p = kind.params.model_validate(params)
    out = store / name
    out.mkdir(parents=True)
    ctx = StageContext(out=out, inputs={k: store / v for k, v in inputs.items()}, params=p, seed=seed)
    start = time.perf_counter()
    metrics = kind.run(ctx)
    seconds = time.perf_counter() - start
    shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items())
    print(f"  {name:<22} {seconds:6.1f}s  {shown}", flush=True)
    log.append((name, params["kind"], seconds, metrics))
    return metrics


def describe(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """How demo responses look: well-formed ("adj noun" x 2-5), positive adjectives, on-topic nouns."""
    from tasks import demo_task as d

    adjectives = set(d.POSITIVE + d.NEGATIVE + d.NEUTRAL)
    formed = positive = adjs = on_topic = nouns = words = 0
    for prompt, response in zip(prompts, responses):
        w = response.split()
        words += len(w)
        formed += 4 <= len(w) <= 10 and len(w) % 2 == 0 and all(x in adjectives for x in w[::2]) and all(x in d._TOPIC_OF_NOUN for x in w[1::2])
        adjs += sum(x in adjectives for x in w)
        positive += sum(x in d.POSITIVE for x in w)
        nouns += sum(x in d._TOPIC_OF_NOUN for x in w)
        on_topic += sum(d._TOPIC_OF_NOUN.get(x) == prompt.split()[0] for x in w)
    n = len(responses)
    return {"well_formed": formed / n, "words": words / n, "positive_adj": positive / max(1, adjs), "on_topic": on_topic / max(1, nouns)}


def run_demo(config: dict, seed: int, store: Path) -> dict:
    kinds = load_stage_kinds()
    log = []
    for name, params in {**config["models"], **config["datasets"]}.items():
        run_stage(kinds, store, name, params, {}, seed, log)
    run_stage(kinds, store, "sft", {"kind": "sft", "model": "base", "data": "sft_data", **config["sft"]},
              {"model": "base", "data": "sft_data"}, seed, log)
    rm = run_stage(kinds, store, "reward_model",
                   {"kind": "reward_model", "model": "base", "data": "rm_pairs", "eval_data": "rm_heldout", **config["reward_model"]},
                   {"model": "base", "data": "rm_pairs", "eval_data": "rm_heldout"}, seed, log)
    policy, results = "sft", {"rm_eval_accuracy": rm.get("eval_accuracy")}
    for r in range(1, config["rounds"] + 1):
        g, s, pr, d, e = (f"r{r}_{k}" for k in ("generate", "score", "pairs", "dpo", "evaluate"))
        run_stage(kinds, store, g, {"kind": "generate", "policy": policy, "prompts": "train_prompts", **config["generate"]},
                  {"policy": policy, "prompts": "train_prompts"}, seed, log)
        run_stage(kinds, store, s, {"kind": "score", "candidates": g, "reward_model": "reward_model"},
                  {"candidates": g, "reward_model": "reward_model"}, seed, log)
        run_stage(kinds, store, pr, {"kind": "pairs", "scored": s, "reference": "sft", **config["pairs"]},
                  {"scored": s, "reference": "sft"}, seed, log)
        run_stage(kinds, store, d, {"kind": "dpo", "policy": policy, "pairs": pr, **config["dpo"]},
                  {"policy": policy, "pairs": pr}, seed, log)
        ev = run_stage(kinds, store, e, {"kind": "evaluate", "policy": d, "baseline": "sft", "prompts": "eval_prompts", **config["evaluate"]},
                       {"policy": d, "baseline": "sft", "prompts": "eval_prompts"}, seed, log)
        results[f"round{r}"] = ev
        import pyarrow.parquet as pq

        samples = pq.read_table(store / e / "samples.parquet").to_pydict()
        for who in ("baseline", "policy") if r == 1 else ("policy",):
            shape = describe(samples["prompt"], samples[f"{who}_response"])
            print(f"    {who} samples: " + ", ".join(f"{k}={v:.2f}" for k, v in shape.items()))
        policy = d
    results["total_seconds"] = sum(t for _, _, t, _ in log)
    results["by_kind"] = {}
    for _, kind, t, _ in log:
        results["by_kind"][kind] = results["by_kind"].get(kind, 0.0) + t
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=CONFIGS, default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: tasks.models.set_cpu_threads)")
    parser.add_argument("--keep", type=Path, help="keep the artifacts under this folder")
    parser.add_argument("--set", nargs="*", default=[], help="section.key=json_value overrides, e.g. dpo.beta=0.2")
    args = parser.parse_args()

    if args.threads:
        import os

        os.environ["ALIGNFLOW_TORCH_THREADS"] = str(args.threads)
    config = json.loads(json.dumps(CONFIGS[args.config]))
    for item in args.set:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = json.loads(value)

    summary = []
    for seed in args.seeds:
        print(f"== config {args.config}, seed {seed}", flush=True)
        if args.keep:
            results = run_demo(config, seed, args.keep / f"{args.config}-seed{seed}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                results = run_demo(config, seed, Path(tmp))
        summary.append((seed, results))
        print(f"  total {results['total_seconds']:.1f}s; by kind: " + ", ".join(f"{k} {v:.1f}s" for k, v in results["by_kind"].items()))
    print("\nseed  rm_acc  " + "  ".join(f"round{r} win [ci]        reward" for r in range(1, config["rounds"] + 1)) + "   total_s")
    for seed, res in summary:
        cells = []
        for r in range(1, config["rounds"] + 1):
            ev = res[f"round{r}"]
            cells.append(f"{ev['win_rate']:.3f} [{ev['win_rate_ci_low']:.3f},{ev['win_rate_ci_high']:.3f}] {ev['reward_policy']:+.3f}/{ev['reward_baseline']:+.3f}")
        print(f"{seed:<5} {res['rm_eval_accuracy']:.3f}  " + "  ".join(cells) + f"   {res['total_seconds']:.0f}")


if __name__ == "__main__":
    main()
