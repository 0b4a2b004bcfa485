"""Write the arithmetic prompts of pipelines/smollm2_rso.yaml: conversational prompts ("What is
a op b? Answer with just the number.", one user message, so the model's chat template is used),
a training set and a held-out set with no question in common.

    python pipelines/data/make_arithmetic.py        # rewrites arithmetic_{train,eval}.jsonl
    python pipelines/data/make_arithmetic.py --name arithmetic_rounds --train 1024 --eval 256 --mix pool
                                                    # pipelines/iterative_dpo_smollm2.yaml's

Questions: a + b (2..30 each), a - b (0 < b < a <= 40) and a * b (2..12 each), never one whose
answer equals an operand (the reward skips the operands when it reads the answer: see
tasks/rewards.py, arithmetic_reward). Seeded: the same files every time.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = "What is {a} {op} {b}? Answer with just the number."


def questions(rng: random.Random) -> list[tuple[int, str, int]]:
    """Every allowed question once, shuffled."""
    pool = [(a, "+", b) for a in range(2, 31) for b in range(2, 31)]
    pool += [(a, "-", b) for a in range(3, 41) for b in range(1, a) if a - b not in (a, b)]
    pool += [(a, "*", b) for a in range(2, 13) for b in range(2, 13)]
    rng.shuffle(pool)
    return pool


def rows(items, prefix: str) -> list[dict]:
    return [
        {"prompt_id": f"{prefix}-{i:04d}", "prompt": [{"role": "user", "content": TEMPLATE.format(a=a, op=op, b=b)}]}
        for i, (a, op, b) in enumerate(items)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=64, help="training prompts")
    parser.add_argument("--eval", type=int, default=128, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="arithmetic", help="the files' name: NAME_train.jsonl, NAME_eval.jsonl")
    parser.add_argument("--mix", choices=("equal", "pool"), default="equal",
                        help="equal: each operator in equal share (at most 363 questions in all); "
                             "pool: as the pool has them (mostly + and -, 1,660 in all)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    if args.mix == "equal":  # so that + (the one this model is worst at) is not most of it
        by_op = {op: [q for q in questions(rng) if q[1] == op] for op in "+-*"}
        mixed = [q for group in zip(*by_op.values()) for q in group]  # + - * + - * ...
    else:
        mixed = questions(rng)
    if args.train + args.eval > len(mixed):
        parser.error(f"--train + --eval: at most {len(mixed)} questions with --mix {args.mix}")
    train, held_out = mixed[: args.train], mixed[args.train : args.train + args.eval]
    for name, items in (("train", train), ("eval", held_out)):
        path = HERE / f"{args.name}_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(items, name)))
        print(f"{path}: {len(items)} prompts")


if __name__ == "__main__":
    main()
