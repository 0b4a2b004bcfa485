"""Write the walkthrough's data files (README, "Your own model, prompts and reward model") in a
user's own column names, from the arithmetic prompts of pipelines/data/:

    python pipelines/byo/make_data.py

- questions.jsonl, questions_eval.jsonl: {"qid", "question"}: a conversational prompt (one user
  message) under the column "question" (the specs rename it: columns: {prompt: question});
- preferences.jsonl: {"question", "good", "bad"}: the right answer against a wrong one, for the
  reward model that pipelines/byo/reward_model.yaml trains (on the training questions only).
Seeded: the same files every time.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def answer(question: str) -> int:
    a, op, b = re.search(r"(\d+) (\+|-|\*) (\d+)", question).groups()
    return OPS[op](int(a), int(b))


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    rng = random.Random(0)
    train, held_out = read("arithmetic_train.jsonl"), read("arithmetic_eval.jsonl")
    write(HERE / "questions.jsonl", [{"qid": r["prompt_id"], "question": r["prompt"]} for r in train])
    write(HERE / "questions_eval.jsonl", [{"qid": r["prompt_id"], "question": r["prompt"]} for r in held_out])
    pairs = []
    for row in train:
        right = answer(row["prompt"][0]["content"])
        wrong = right + rng.choice([-1, 1]) * rng.randint(1, 5)
        pairs.append({"question": row["prompt"], "good": str(right), "bad": str(wrong)})
        pairs.append({"question": row["prompt"], "good": str(right), "bad": f"The answer is {wrong}."})
    write(HERE / "preferences.jsonl", pairs)


if __name__ == "__main__":
    main()
