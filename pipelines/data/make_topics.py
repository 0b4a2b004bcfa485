"""Write the one-sentence prompts of pipelines/exrm_vs_dporm_smollm2.yaml: one user message each,
"<ask> <topic>.", every topic with every ask, shuffled (seeded: the same file every time).

    python pipelines/data/make_topics.py        # rewrites topics.jsonl
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
# One-sentence asks: SmolLM2 finishes its answer (about 30 tokens) well within max_new_tokens, so the
# judge `brevity` compares whole answers, not two cuts of the same length.
ASKS = ("Write a sentence about", "Write one short sentence about", "In one sentence, describe",
        "Give me one sentence about")
TOPICS = """
the ocean, mountains, a forest, the desert, rain, snow, the moon, the sun, stars, a river, a lake, volcanoes,
cats, dogs, horses, birds, bees, whales, elephants, lions, owls, penguins, dolphins, butterflies,
bread, coffee, tea, apples, chocolate, cheese, rice, soup, pizza, honey, oranges, pancakes,
a bicycle, a train, an airplane, a ship, a car, a bridge, a castle, a library, a museum, a garden,
a hospital, a school, a market, a farm, a lighthouse, a city, a village, a park,
music, painting, poetry, dancing, chess, football, swimming, running, cooking, reading, writing, photography,
friendship, courage, kindness, patience, honesty, happiness, curiosity, teamwork, gratitude, hope,
computers, the internet, robots, batteries, telescopes, clocks, maps, books, paper, glass, steel, electricity,
winter, summer, autumn, spring, mornings, birthdays, holidays, weekends, history, science
"""


def main() -> None:
    topics = [t.strip() for t in TOPICS.replace("\n", " ").split(",") if t.strip()]
    prompts = [f"{ask} {topic}." for topic in topics for ask in ASKS]
    random.Random(0).shuffle(prompts)
    with open(HERE / "topics.jsonl", "w") as f:
        for i, text in enumerate(prompts):
            f.write(json.dumps({"prompt_id": f"topic-{i:04d}", "prompt": [{"role": "user", "content": text}]}) + "\n")
    print(f"{len(prompts)} prompts ({len(topics)} topics x {len(ASKS)} asks) -> {HERE / 'topics.jsonl'}")


if __name__ == "__main__":
    main()
