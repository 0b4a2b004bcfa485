"""Sampling parity of the vllm backend with the hf backend on SmolLM2: do they sample the same
distribution, and decode greedily the same answers?

    python bench/vllm_parity.py [--model smollm2|tiny] [--prompts 64] [--n 4] [--max-new-tokens 32]
        [--temperature 0.8] [--top-p 0.95] [--seed 0]

On the held-out arithmetic questions (pipelines/data/arithmetic_eval.jsonl, chat prompts), with the
pipelines' sampling (smollm2_rso.yaml: temperature 0.8, top_p 0.95) and their gold reward
(`arithmetic`: 1 for the right answer, minus 0.01 per word):

- sampled: the hf backend in the model's stored dtype (float32: what the SmolLM2 specs generate in)
  and the vllm backend with its default dtype (auto: bfloat16 on this CPU), n samples per prompt.
  Per side, the mean gold reward and mean length (tokens) with 95% t-intervals over prompts (each
  prompt's mean over its samples); and the difference vllm - hf paired by prompt, with its 95%
  t-interval: the two agree when that interval holds 0.
- greedy: the share of prompts whose greedy answer is the same text, vllm in float32 (the hf
  backend's dtype: the check is >= 90%) and in its default bfloat16 (for information).

Both backends run as the generate stage runs them (tasks.models.sample_responses,
tasks.vllm_backend.sample_models). Last line:

    vllm_parity: reward diff D [lo, hi], length diff L [lo, hi] (agree|differ); greedy same G (float32), B (bfloat16)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def t_interval(values: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def per_prompt(values: list[list[float]]) -> list[float]:
    return [statistics.fmean(v) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny (checks the script runs), or a model folder")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tasks.models import load_causal_lm, load_tokenizer, sample_responses
    from tasks.rewards import resolve_reward_fn
    from tasks.vllm_backend import Engines, VllmParams, longest_prompt, sample_models

    with tempfile.TemporaryDirectory(prefix="vllm_parity-") as tmp:
        if args.model == "smollm2":
            from bench.dpo_vs_trl import smollm2_model

            model_dir = smollm2_model()
        elif args.model == "tiny":
            from bench.generate_backends import tiny_model

            model_dir = tiny_model(Path(tmp) / "tiny")
        else:
            model_dir = Path(args.model)
        rows = [json.loads(line) for line in (ROOT / "pipelines/data/arithmetic_eval.jsonl").read_text().splitlines()]
        prompts = [rows[i % len(rows)]["prompt"] for i in range(args.prompts)]
        if not getattr(load_tokenizer(model_dir), "chat_template", None):
            prompts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        reward = resolve_reward_fn("arithmetic")
        sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
        tokenizer = load_tokenizer(model_dir)

        print(f"hf ({model_dir.name}, stored dtype) ...", flush=True)
        model, _ = load_causal_lm(model_dir)
        hf = {"sampled": sample_responses(model, tokenizer, prompts, n=args.n, batch_size=args.prompts, **sampling),
              "greedy": sample_responses(model, tokenizer, prompts, n=1, batch_size=args.prompts,
                                         **{**sampling, "temperature": 0})}
        del model
        vllm = {}
        needed = longest_prompt({"m": model_dir}, prompts) + args.max_new_tokens
        for dtype in ("auto", "float32"):
            print(f"vllm (dtype {dtype}) ...", flush=True)
            with Engines({"m": model_dir}, VllmParams(dtype=dtype), args.seed, Path(tmp), needed) as engines:
                engine, _ = engines.get("m")
                if dtype == "auto":
                    vllm["dtype"] = engine.dtype
                    vllm["sampled"] = sample_models(engines, ["m"], prompts, n=args.n, **sampling)["m"]
                vllm[f"greedy {dtype}"] = sample_models(engines, ["m"], prompts, n=1,
                                                        **{**sampling, "temperature": 0})["m"]

    def rewards(responses):
        return [[reward(p, r) for r in rs] for p, rs in zip(prompts, responses)]

    def lengths(responses):
        return [[len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rs] for rs in responses]

    print(f"\n{args.prompts} prompts x {args.n} samples, temperature {args.temperature}, top_p {args.top_p}, "
          f"max_new_tokens {args.max_new_tokens}; hf in the stored dtype, vllm in {vllm['dtype']}")
    verdicts = []
    for what, measure in (("gold reward", rewards), ("length (tokens)", lengths)):
        a, b = per_prompt(measure(hf["sampled"])), per_prompt(measure(vllm["sampled"]))
        diff = t_interval([y - x for x, y in zip(a, b)])
        for side, values in (("hf", a), ("vllm", b)):
            print(f"{what:<16} {side:<5} {t_interval(values)[0]:8.3f} [{t_interval(values)[1]:.3f}, "
                  f"{t_interval(values)[2]:.3f}]")
        print(f"{what:<16} vllm - hf {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]")
        verdicts.append((diff, diff[1] <= 0 <= diff[2]))
    same = {dtype: sum(x == y for x, y in zip(hf["greedy"], vllm[f"greedy {dtype}"])) / len(prompts)
            for dtype in ("float32", "auto")}
    print(f"greedy: the same answer on {same['float32']:.1%} of prompts (vllm float32), {same['auto']:.1%} "
          f"(vllm {vllm['dtype']})")
    (reward_diff, reward_ok), (length_diff, length_ok) = verdicts
    print(f"vllm_parity: reward diff {reward_diff[0]:+.3f} [{reward_diff[1]:+.3f}, {reward_diff[2]:+.3f}], length diff "
          f"{length_diff[0]:+.2f} [{length_diff[1]:+.2f}, {length_diff[2]:+.2f}] "
          f"({'agree' if reward_ok and length_ok else 'differ'}); greedy same {same['float32']:.0%} (float32), "
          f"{same['auto']:.0%} ({vllm['dtype']})")


if __name__ == "__main__":
    main()
