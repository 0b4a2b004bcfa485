"""Named programmatic reward functions: `reward_fn: demo_gold` in a spec means REWARD_FNS["demo_gold"].

A reward function maps (prompt, response) to a float. The prompt is a str, or for a
conversational prompt a list of {role, content} messages. Pure Python, so a spec can be checked
without importing torch.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from tasks import demo_task

RewardFn = Callable[[Any, str], float]


def prompt_text(prompt) -> str:
    """The text a reward reads from a prompt: a str as it is; for a conversation (a list of
    {role, content} messages), the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("a conversational prompt with no user message")
    return users[-1]


# ---- arithmetic: a verifiable reward ------------------------------------------------------------

# "What is 7 + 5?": two integers and an operator (×, x between numbers and "times" too).
_QUESTION = re.compile(r"(-?\d+)\s*(\+|-|\*|×|x|times)\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b,
    "*": lambda a, b: a * b, "×": lambda a, b: a * b, "x": lambda a, b: a * b, "times": lambda a, b: a * b,
}
ARITHMETIC_LENGTH_PENALTY = 0.01  # per word of the response
ARITHMETIC_MAX_WORDS = 20  # the penalty stops growing here: at most 0.2, so a right answer always wins


def arithmetic_question(prompt) -> tuple[int, int, int]:
    """(a, b, the right answer) of the first "a op b" in the prompt's (last user message's) text."""
    text = prompt_text(prompt)
    match = _QUESTION.search(text)
    if match is None:
        raise ValueError(f"the arithmetic reward needs a question 'a op b' (op one of + - * ×) in the prompt, got {text!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a, b, _OPS[op](a, b)


def arithmetic_answer(response: str, operands: tuple[int, ...] = ()) -> float | None:
    """The answer a response gives: its first number that is not one of the question's operands
    (this model restates the question before answering: "7 + 5 = 12"), or None. Thousands
    separators are read ("1,024"); signs count ("-3"), but an operand's value with either sign is
    skipped ("10-18" reads as 10, then 18)."""
    skip = {abs(x) for x in operands}
    for token in _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response)):
        value = float(token)
        if abs(value) not in skip:
            return value
    return None


def arithmetic_reward(prompt, response: str) -> float:
    """Verifiable reward for "What is a op b? Answer with just the number.":
    1 if the response's answer (arithmetic_answer) is right, else 0, minus 0.01 per word of the
    response (counted up to 20 words) to break ties in favour of doing what the prompt asks.
    A response with no answer at all gets the most penalty: -0.2, below any wrong number.
    So: right answers score in [0.8, 0.99], wrong ones in [-0.2, -0.01].

    The operands are skipped when reading the answer, so a question whose answer equals an
    operand's absolute value (5 * 1, 4 - 2) cannot be answered right: don't ask those.
    """
    a, b, expected = arithmetic_question(prompt)
    answer = arithmetic_answer(response, (a, b))
    words = min(len(response.split()), ARITHMETIC_MAX_WORDS)
    if answer is None:
        return -ARITHMETIC_LENGTH_PENALTY * ARITHMETIC_MAX_WORDS
    return float(answer == expected) - ARITHMETIC_LENGTH_PENALTY * words


def brevity_reward(prompt, response: str) -> float:
    """The shorter response wins: minus its length in characters (surrounding spaces ignored).
    pipelines/exrm_vs_dporm_smollm2.yaml's gold judge: a property of the text alone, so a reward
    model can learn it from pairs (a truncated, rambling answer against a finished, short one)."""
    return -float(len(response.strip()))


REWARD_FNS: dict[str, RewardFn] = {
    "demo_gold": demo_task.gold_reward,
    "arithmetic": arithmetic_reward,
    "brevity": brevity_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    if name not in REWARD_FNS:
        raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARD_FNS))}")
    return REWARD_FNS[name]
