"""Writes demo_preferences.jsonl: gold-labelled preference pairs of the demo task, in trl's format.

The input of pipelines/dpo_offline.yaml, standing in for a preference file a user brings.

    python pipelines/data/make_demo_preferences.py
"""
import json
from pathlib import Path

from tasks import demo_task

ROWS, SEED = 2000, 1234

if __name__ == "__main__":
    split = demo_task.make_split("preferences", ROWS, SEED)
    path = Path(__file__).with_name("demo_preferences.jsonl")
    with open(path, "w") as f:
        for prompt, chosen, rejected in zip(split["prompt"], split["chosen"], split["rejected"]):
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    print(f"wrote {ROWS} pairs to {path}")
