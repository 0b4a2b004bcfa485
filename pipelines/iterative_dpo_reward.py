"""The picking reward of pipelines/iterative_dpo_smollm2.yaml: a proxy, deliberately not the gold.

The gold judge (`evaluate.judge: arithmetic`, tasks/rewards.py) reads a response's answer as its
first number that is not an operand. This proxy only asks whether the right number appears
anywhere in the response, so a policy that learns to hedge ("26, or maybe 36") raises the proxy
and not the gold: over-optimising it shows up as the proxy reward (evaluate's
proxy_reward_policy) rising while the gold win rate stalls. Both take 0.01 per word off (up to
20 words): "Answer with just the number."
"""
import re

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def right_number_anywhere(prompt, response: str) -> float:
    """1 if the right answer is among the response's numbers, else 0; minus 0.01 per word."""
    question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    a, op, b = re.search(r"(\d+) ([+*-]) (\d+)", question).groups()
    expected = OPERATIONS[op](int(a), int(b))
    numbers = {int(n) for n in re.findall(r"-?\d+", response.replace(",", ""))}
    return float(expected in numbers) - 0.01 * min(len(response.split()), 20)
