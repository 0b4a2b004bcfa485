"""pairs: preference pairs from scored candidates (best vs worst per prompt), with reference log-probs.

The reference model's log-probs of chosen and rejected are computed once here, so the trainer
holds only the policy in memory.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import OptionalRef, Ref, StageContext, StageParams, stage_kind


class PairsParams(StageParams):
    kind: Literal["pairs"] = "pairs"
    scored: Ref("table")
    reference: OptionalRef("model") = None
    strategy: Literal["best_vs_worst"] = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose reward margin is below this")
    batch_size: int = Field(64, ge=1, description="for the reference log-probs")
    max_length: int = Field(512, ge=2, description="must match the trainer's max_length")


def best_vs_worst(prompt_keys: list, rewards: list[float], min_margin: float) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """(best row, worst row) per prompt. Ties and margins under min_margin are dropped and counted."""
    groups: dict = {}
    for row, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(row)
    pairs, dropped = [], {"dropped_ties": 0, "dropped_min_margin": 0}
    for rows in groups.values():
        best = max(rows, key=lambda i: rewards[i])
        worst = min(rows, key=lambda i: rewards[i])
        margin = rewards[best] - rewards[worst]
        if margin == 0:  # includes a prompt with a single candidate
            dropped["dropped_ties"] += 1
        elif margin < min_margin:
            dropped["dropped_min_margin"] += 1
        else:
            pairs.append((best, worst))
    return pairs, dropped


def add_reference_logps(rows: dict[str, list], reference, max_length: int, batch_size: int, progress) -> None:
    """Add ref_chosen_logp, ref_rejected_logp, chosen_tokens, rejected_tokens to `rows` (columns
    prompt, chosen, rejected): the reference model's summed response-token log-probs and how many
    tokens they cover. `reference` is a model artifact folder. Shared by `pairs` and `ref_logps`."""
    import math

    from tasks.models import batched_logps, load_causal_lm

    model, tokenizer = load_causal_lm(reference)
    n_batches = 2 * math.ceil(len(rows["prompt"]) / batch_size)
    with progress("reference log-probs", total=n_batches) as bar:
        for side in ("chosen", "rejected"):
            logps, counts = batched_logps(model, tokenizer, rows["prompt"], rows[side], max_length, batch_size, bar.advance)
            rows[f"ref_{side}_logp"] = logps
            rows[f"{side}_tokens"] = counts


@stage_kind("pairs", PairsParams, output="table")
def pairs(ctx: StageContext) -> dict[str, float]:
    from tasks.tables import read_table, write_table

    p: PairsParams = ctx.params
    table = read_table(ctx.inputs["scored"], ["prompt", "response", "reward"], what="scored table")
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response").to_pylist()
    rewards = table.column("reward").to_pylist()
    keys = table.column("prompt_id").to_pylist() if "prompt_id" in table.column_names else prompts

    chosen_rejected, dropped = best_vs_worst(keys, rewards, p.min_margin)
    rows = {
        "prompt": [prompts[c] for c, _ in chosen_rejected],
        "chosen": [responses[c] for c, _ in chosen_rejected],
        "rejected": [responses[r] for _, r in chosen_rejected],
        "chosen_reward": [rewards[c] for c, _ in chosen_rejected],
        "rejected_reward": [rewards[r] for _, r in chosen_rejected],
    }
    rows["margin"] = [c - r for c, r in zip(rows["chosen_reward"], rows["rejected_reward"])]
    if not rows["prompt"]:
        raise ValueError(f"no pairs left: {dropped['dropped_ties']} ties, {dropped['dropped_min_margin']} under min_margin={p.min_margin}")

    if p.reference is not None:
        add_reference_logps(rows, ctx.inputs["reference"], p.max_length, p.batch_size, ctx.progress)

    write_table(rows, ctx.out)
    n = len(rows["prompt"])
    return {"pairs": float(n), **{k: float(v) for k, v in dropped.items()}, "mean_margin": sum(rows["margin"]) / n}
