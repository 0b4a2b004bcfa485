"""Log-probs on a CUDA GPU, per architecture and precision, against a float32 CPU reference.

    python bench/gpu_core_check.py [--smollm2-config DIR]

What runs on a GPU that DPO, the reference stage, the reward-accuracy evaluation and online RL
share: tasks/logps.py's probe (which fast paths it accepts) and reference_logps (the one way pair
log-probs are computed). For each of tests/test_logps.py's ten architectures (tiny random
configurations), in three precisions:

- float32 weights (alignflow's CPU default; the probe's tolerance 2e-3),
- bfloat16 weights (`dtype: bfloat16` on a `pretrained` model; the probe's tolerance 5e-2),
- float32 weights under bfloat16 autocast (what training with `dtype: auto` computes on a GPU),

it prints the probe's verdict and the largest error of reference_logps against the textbook
float32 log_softmax of each unpadded sequence's full logits on the CPU, and the same for the pairs
with the output layer forced into chunks of 3 rows (pair_logps' chunk_rows: what a batch past the
chunk threshold runs). The last line counts the float32 rows off by more than 2e-3 (either way):
`gpu_core_check: float32 N/10 within 2e-3; ...`.

--smollm2-config adds SmolLM2-135M's architecture (a folder with its config and tokenizer; random
weights: a real vocabulary of 49152), with a long pair among its pairs, so that reference_logps'
batch has more response tokens than the output layer keeps whole (1365 at this vocabulary) and is
chunked as in real runs, with no forcing.
Needs only torch and transformers (no Prefect, MLflow or vLLM), so it runs on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tasks import logps  # noqa: E402
from tasks.base import no_progress  # noqa: E402
from tasks.models import load_tokenizer  # noqa: E402
from test_logps import ARCHITECTURES, PAIRS, full_logits_logps, save_model_folder  # noqa: E402

SMOLLM2_PAIRS = [
    {"prompt": "Write one short sentence about owls.", "chosen": "Owls hunt at night with silent wings.",
     "rejected": "Owls are birds."},
    {"prompt": "Give me one sentence about bread.", "chosen": "Bread rises as yeast turns sugar into gas.",
     "rejected": "Bread is a food that many people eat every day, in many forms, all over the world."},
    {"prompt": "Tell me about rivers.", "chosen": "Rivers carry water from the hills down to the sea. " * 40,
     "rejected": "A river is wide, slow and brown where it meets the sea, and narrow and fast in the hills. " * 30},
]


def random_smollm2(config_dir: Path, folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(folder)
    load_tokenizer(config_dir).save_pretrained(folder)


def check(folder: Path, pairs: list[dict], mode: str, device: str) -> tuple[logps.Verdict, float, float, bool]:
    """reference_logps on `device` in `mode`, against full float32 logits on the CPU: (verdict,
    its largest error, the largest error with the output layer in chunks of 3 rows, whether
    reference_logps chunked it by itself)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    prompts = [p["prompt"] for p in pairs]
    expected = {side: full_logits_logps(folder, prompts, [p[side] for p in pairs]) for side in ("chosen", "rejected")}
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)
    verdict = logps.fast_paths(model)
    examples = logps.encode_pairs(tokenizer, prompts, [p["chosen"] for p in pairs],
                                  [p["rejected"] for p in pairs], None)
    batch = {k: v.to(device) for k, v in logps.pair_collate(model)(examples, tokenizer.pad_token_id).items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "autocast"):
        logps.reference_logps(model, examples, tokenizer.pad_token_id, len(examples), no_progress)
        with torch.no_grad():
            chunked = logps.pair_logps(model, batch, chunk_rows=3)[0].float().cpu().tolist()
    error = max(abs(e[f"ref_{side}"] - x) for side in ("chosen", "rejected") for e, x in zip(examples, expected[side]))
    chunked_error = max(abs(a - b) for a, b in zip(chunked, expected["chosen"] + expected["rejected"]))
    scored = sum(logps.response_tokens(e[side]) for e in examples for side in ("chosen", "rejected"))
    chunked_itself = verdict.head and scored * logps.output_size(model.get_output_embeddings()) * 4 > logps.HEAD_CHUNK_BYTES
    return verdict, error, chunked_error, chunked_itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2-config", type=Path, help="a folder with SmolLM2's config.json and tokenizer")
    parser.add_argument("--device", default="cuda", help="cpu checks the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_core_check: no CUDA GPU")
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{name}, torch {torch.__version__}, tf32 matmul {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-core-"))
    models = {name: (tmp / name, PAIRS) for name in ARCHITECTURES}
    for name in ARCHITECTURES:
        save_model_folder(tmp / name, name)
    if args.smollm2_config:
        random_smollm2(args.smollm2_config, tmp / "smollm2")
        models["smollm2"] = (tmp / "smollm2", SMOLLM2_PAIRS)
    modes = ("float32", "bfloat16", "autocast")
    worst = {m: [] for m in modes}
    print(f"{'model':<10} {'precision':<9} {'head':>5} {'shared':>6}  max |error| vs float32 CPU full logits "
          "(reference_logps; in chunks of 3)")
    for name, (folder, pairs) in models.items():
        for mode in modes:
            verdict, error, chunked_error, chunked_itself = check(folder, pairs, mode, args.device)
            worst[mode].append((name, max(error, chunked_error)))
            print(f"{name:<10} {mode:<9} {verdict.head!s:>5} {verdict.shared_prompt!s:>6}  {error:.2e}"
                  f"{' (chunked)' if chunked_itself else ''}  {chunked_error:.2e}"
                  + (f"  refused: {'; '.join(verdict.refused)}" if verdict.refused else ""), flush=True)
    within = sum(error <= 2e-3 for _, error in worst["float32"])
    summary = "; ".join(f"{m} worst {max(e for _, e in worst[m]):.3g} ({max(worst[m], key=lambda x: x[1])[0]})"
                        for m in modes)
    print(f"gpu_core_check: float32 {within}/{len(worst['float32'])} within 2e-3; {summary}")


if __name__ == "__main__":
    main()
