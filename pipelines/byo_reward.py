"""The walkthrough's own reward function (pipelines/byo_iterative_dpo.yaml: reward_fn:
"byo_reward:right_and_brief"). alignflow imports this file with the spec's folder first on
sys.path; its code is in the score stage's key, so editing it reruns score and what follows it,
and nothing before."""
import re

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def right_and_brief(prompt, response: str) -> float:
    """1 for the right number as the answer, minus 0.05 per word beyond the first (up to 10 words).

    `prompt` is a conversation here (a list of {role, content} messages): the question is the
    last user message.
    """
    question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    a, op, b = re.search(r"(\d+) (\+|-|\*) (\d+)", question).groups()
    expected = OPS[op](int(a), int(b))
    numbers = [int(n) for n in re.findall(r"-?\d+", response)]
    # The model often restates the question ("7 + 5 = 12"): the answer is its last number.
    right = bool(numbers) and numbers[-1] == expected
    return float(right) - 0.05 * min(max(len(response.split()) - 1, 0), 10)
