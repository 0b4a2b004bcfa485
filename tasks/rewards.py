"""Named programmatic reward functions: `reward_fn: demo_gold` in a spec means REWARD_FNS["demo_gold"].

A reward function maps (prompt, response) to a float. Pure Python, so a spec can be checked
without importing torch.
"""
from __future__ import annotations

from typing import Callable

from tasks import demo_task

RewardFn = Callable[[str, str], float]

REWARD_FNS: dict[str, RewardFn] = {
    "demo_gold": demo_task.gold_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARD_FNS:
        raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARD_FNS))}")
    return REWARD_FNS[name]
