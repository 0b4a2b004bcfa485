"""The synthetic "demo" task: a tiny language a tiny model learns in seconds on a CPU.

A prompt names a topic and a few of its nouns, then a colon:

    animals cat tiger :

A response is 2-5 phrases of "adjective noun":

    lovely cat awful hammer small whale

The gold reward is graded (not binary), so best-vs-worst pairs always carry some signal:

    reward = (#positive adj - #negative adj) / #words + 0.5 * (#on-topic nouns - #off-topic nouns) / #words

It lies in [-1, 1]; a response in the demo's phrase form peaks at 0.75 ("good cat great dog").
The SFT data deliberately mixes good and bad responses (adjectives of random sentiment, nouns half
off-topic), so the SFT policy is mediocre and preference training has room to improve it.

Distribution shift (for EXRM vs DPORM, pipelines/exrm_vs_dporm.yaml): `HELDOUT_TOPICS` are topics
no training split uses, and `ResponseStyle` describes the response distribution. Two gold-labelled
preference splits shift one thing each against `preferences_heldout` (the in-distribution set):

- `preferences_prompt_shift`: prompts about the held-out topics (vehicles, clothes), responses in
  the default style. The prompts' topic words were never in a training prompt, and their nouns
  appeared in training only as *off-topic* nouns (a response's off-topic noun may come from any
  other topic), so a reward that learned "vehicle nouns are bad" must now reverse itself: on-topic
  is relative to the prompt, which is what generalising over prompts means here.
- `preferences_response_shift`: the same prompts as the in-distribution set (training topics, the
  held-out half of the prompt space), responses in `RESPONSE_SHIFT_STYLE`: longer (5-8 phrases
  instead of 2-5), mostly neutral adjectives (so each pair differs by fewer sentiment words),
  mostly on-topic nouns, and half the phrases in the other word order ("cat lovely"). The gold
  reward ignores order and length, so the labels mean the same thing; only the responses moved.

Pure Python on purpose: the engine imports it when checking a spec.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from itertools import permutations

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "rabbit", "tiger", "eagle", "whale", "mouse"),
    "food": ("bread", "cheese", "apple", "rice", "soup", "cake", "pasta", "salad"),
    "tools": ("hammer", "saw", "drill", "wrench", "shovel", "ladder", "chisel", "pliers"),
    "places": ("beach", "forest", "city", "village", "mountain", "river", "desert", "island"),
    "music": ("guitar", "piano", "drum", "violin", "song", "melody", "choir", "trumpet"),
    "sports": ("football", "tennis", "golf", "hockey", "rugby", "boxing", "skiing", "cricket"),
    # Held out of every demo split: for a prompt-shift evaluation set.
    "vehicles": ("car", "bus", "train", "bicycle", "truck", "boat", "plane", "tram"),
    "clothes": ("shirt", "hat", "coat", "scarf", "boots", "jacket", "dress", "gloves"),
}
HELDOUT_TOPICS: tuple[str, ...] = ("vehicles", "clothes")
TRAIN_TOPICS: tuple[str, ...] = tuple(t for t in TOPICS if t not in HELDOUT_TOPICS)

POSITIVE = ("good", "great", "lovely", "wonderful", "excellent", "happy", "bright", "pleasant")
NEGATIVE = ("bad", "awful", "terrible", "ugly", "horrible", "sad", "broken", "nasty")
NEUTRAL = ("big", "small", "old", "new", "tall", "round", "plain", "usual")
ADJECTIVES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}

SEPARATOR = ":"
_TOPIC_OF_NOUN = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}

SPLITS = (
    "sft", "preferences", "preferences_heldout", "prompts", "eval_prompts",
    "preferences_prompt_shift", "preferences_response_shift",
)
# Splits drawn from the held-out half of the prompt space, so evaluation never sees a train prompt.
HELDOUT_SPLITS = ("preferences_heldout", "eval_prompts", "preferences_prompt_shift", "preferences_response_shift")


def vocabulary() -> list[str]:
    """Every word the task can produce (all topics, held-out ones included), in a fixed order."""
    words = [SEPARATOR, *TOPICS]
    for nouns in TOPICS.values():
        words += nouns
    for adjectives in ADJECTIVES.values():
        words += adjectives
    return words


def gold_reward(prompt: str, response: str) -> float:
    """The task's true reward (see the module docstring). Unknown words only add length."""
    words = response.split()
    if not words:
        return -1.0  # an empty answer is as bad as the worst one
    topic = prompt.split()[0] if prompt.split() else ""
    sentiment = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    on_topic = sum(_TOPIC_OF_NOUN.get(w) == topic for w in words)
    off_topic = sum(w in _TOPIC_OF_NOUN and _TOPIC_OF_NOUN[w] != topic for w in words)
    return (sentiment + 0.5 * (on_topic - off_topic)) / len(words)


@dataclass(frozen=True)
class ResponseStyle:
    """The distribution responses are drawn from. The SFT data uses the default."""

    min_phrases: int = 2
    max_phrases: int = 5
    positive: float = 1 / 3  # probability an adjective is positive / negative (else neutral)
    negative: float = 1 / 3
    on_topic: float = 0.5  # probability a noun is from the prompt's topic
    noun_first: float = 0.0  # probability a phrase is "noun adjective" instead of "adjective noun"


# The response-shift set's style (see the module docstring).
RESPONSE_SHIFT_STYLE = ResponseStyle(min_phrases=5, max_phrases=8, positive=0.2, negative=0.2, on_topic=0.7, noun_first=0.5)


def sample_response(rng: random.Random, topic: str, style: ResponseStyle = ResponseStyle()) -> str:
    words = []
    for _ in range(rng.randint(style.min_phrases, style.max_phrases)):
        u = rng.random()
        kind = "positive" if u < style.positive else "negative" if u < style.positive + style.negative else "neutral"
        words.append(rng.choice(ADJECTIVES[kind]))
        noun_topic = topic if rng.random() < style.on_topic else rng.choice([t for t in TOPICS if t != topic])
        words.append(rng.choice(TOPICS[noun_topic]))
        if style.noun_first and rng.random() < style.noun_first:  # no draw at 0: default style unchanged
            words[-2:] = words[-1], words[-2]
    return " ".join(words)


def _is_heldout_prompt(prompt: str) -> bool:
    # A fixed hash split of the prompt space (about a quarter held out), independent of any seed.
    return zlib.crc32(prompt.encode()) % 4 == 0


def all_prompts(topics: tuple[str, ...] | list[str], heldout: bool) -> list[str]:
    """Every prompt "<topic> <1-3 distinct nouns of it> :" in one half of the prompt space."""
    prompts = []
    for topic in topics:
        for k in (1, 2, 3):
            for nouns in permutations(TOPICS[topic], k):
                prompt = " ".join((topic, *nouns, SEPARATOR))
                if _is_heldout_prompt(prompt) == heldout:
                    prompts.append(prompt)
    return prompts


def make_split(
    split: str,
    size: int,
    seed: int,
    topics: list[str] | None = None,
    min_margin: float = 0.2,
    style: ResponseStyle | None = None,
) -> dict[str, list]:
    """Rows of one split as columns (a dict of lists). Seeded by seed AND split name, so splits differ.

    sft: prompt, response, reward.  preferences*: prompt, chosen, rejected, chosen_reward,
    rejected_reward, margin (gold margin >= min_margin).  prompts / eval_prompts: prompt_id, prompt,
    topic (distinct prompts while the prompt space lasts).  By default topics are the training
    topics (the held-out ones for preferences_prompt_shift) and the style is the default one
    (RESPONSE_SHIFT_STYLE for preferences_response_shift).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not topics:
        topics = HELDOUT_TOPICS if split == "preferences_prompt_shift" else TRAIN_TOPICS
    topics = tuple(topics)
    if style is None:
        style = RESPONSE_SHIFT_STYLE if split == "preferences_response_shift" else ResponseStyle()
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        raise ValueError(f"unknown topics {unknown}; known: {', '.join(TOPICS)}")
    rng = random.Random(f"demo/{split}/{seed}")
    pool = all_prompts(topics, heldout=split in HELDOUT_SPLITS)

    if split in ("prompts", "eval_prompts"):
        prompts = rng.sample(pool, size) if size <= len(pool) else rng.choices(pool, k=size)
        return {"prompt_id": list(range(size)), "prompt": prompts, "topic": [p.split()[0] for p in prompts]}

    if split == "sft":
        rows = {"prompt": [], "response": [], "reward": []}
        for _ in range(size):
            prompt = rng.choice(pool)
            response = sample_response(rng, prompt.split()[0], style)
            rows["prompt"].append(prompt)
            rows["response"].append(response)
            rows["reward"].append(gold_reward(prompt, response))
        return rows

    rows = {k: [] for k in ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin")}
    while len(rows["prompt"]) < size:
        prompt = rng.choice(pool)
        a, b = (sample_response(rng, prompt.split()[0], style) for _ in range(2))
        ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
        if abs(ra - rb) < min_margin:
            continue
        (chosen, rc), (rejected, rr) = sorted([(a, ra), (b, rb)], key=lambda x: -x[1])
        for key, value in zip(rows, (prompt, chosen, rejected, rc, rr, rc - rr)):
            rows[key].append(value)
    return rows
