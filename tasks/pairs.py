"""pairs: preference pairs from scored candidates, with reference log-probs.

Which candidates of a prompt are paired (`strategy`):
- best_vs_worst: the highest reward against the lowest (one pair per prompt).
- best_vs_random: the highest reward against one other candidate chosen uniformly.
- best_vs_median: the highest reward against the candidate ranked in the middle (of K ranked
  best first, the one at index K // 2): a rejected response the policy typically gives, not its
  rare worst. RLHFlow's Online-RLHF names: max_min is best_vs_worst, max_random best_vs_random.
- all_pairs: every two candidates with different rewards (K(K-1)/2 for K distinct rewards),
  optionally a uniform subset of max_pairs_per_prompt of them.
- tournament: RSO's pairs over the accepted samples (Liu et al. 2023, "Statistical Rejection
  Sampling Improves Preference Optimization", arXiv:2309.06657): the sampled responses are
  paired at random, as in the first round of a tournament (shuffle, then pair consecutive
  samples: (1st, 2nd), (3rd, 4th), ...), and each pair is labelled by the reward. Pairs are
  disjoint within a prompt; with an odd count the last sample sits out (our choice).
In every pair the higher reward is `chosen`. Pairs with equal rewards, or a margin under
min_margin, are dropped; so are prompts with fewer than two candidates. Each is counted.

The reference model's log-probs of chosen and rejected are computed once here, so the trainer
holds only the policy in memory.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import BadInput, OptionalRef, Ref, StageContext, StageParams, stage_kind
from tasks.logps_report import reports_logps

PairStrategy = Literal["best_vs_worst", "best_vs_random", "best_vs_median", "all_pairs", "tournament"]


class PairsParams(StageParams):
    kind: Literal["pairs"] = "pairs"
    scored: Ref("table")
    reference: OptionalRef("model") = None
    strategy: PairStrategy = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose reward margin is below this")
    max_pairs_per_prompt: int | None = Field(
        None, ge=1, description="keep at most this many of a prompt's pairs (a uniform, seeded subset)"
    )
    batch_size: int = Field(64, ge=1, description="for the reference log-probs")
    max_length: int = Field(512, ge=2, description="must match the trainer's max_length")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompts longer than this lose their beginning (bos kept); must match the trainer's"
    )
    strict: bool = Field(False, description="a text that tokenizes to nothing is an error, not a dropped pair")


def group_rows(keys: list) -> list[list[int]]:
    """Row indices per key, keys in order of first appearance, rows in table order."""
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


# Each proposes (row, row) pairs for one prompt's rows (two or more); labelling and filters follow.
def _best(rows: list[int], rewards: list[float]) -> int:
    return max(rows, key=lambda i: rewards[i])  # the first of equal best rewards


def propose_best_vs_worst(rows, rewards, rng) -> list[tuple[int, int]]:
    return [(_best(rows, rewards), min(rows, key=lambda i: rewards[i]))]


def propose_best_vs_random(rows, rewards, rng) -> list[tuple[int, int]]:
    best = _best(rows, rewards)
    others = [i for i in rows if i != best]
    return [(best, others[int(rng.integers(len(others)))])]


def propose_best_vs_median(rows, rewards, rng) -> list[tuple[int, int]]:
    ranked = sorted(rows, key=lambda i: -rewards[i])  # stable: equal rewards keep table order
    return [(ranked[0], ranked[len(ranked) // 2])]


def propose_all_pairs(rows, rewards, rng) -> list[tuple[int, int]]:
    return [(a, b) for n, a in enumerate(rows) for b in rows[n + 1:]]


def propose_tournament(rows, rewards, rng) -> list[tuple[int, int]]:
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    return list(zip(shuffled[0::2], shuffled[1::2]))


PROPOSERS = {
    "best_vs_worst": propose_best_vs_worst,
    "best_vs_random": propose_best_vs_random,
    "best_vs_median": propose_best_vs_median,
    "all_pairs": propose_all_pairs,
    "tournament": propose_tournament,
}


def build_pairs(prompt_keys: list, rewards: list[float], strategy: str = "best_vs_worst", min_margin: float = 0.0,
                max_pairs_per_prompt: int | None = None, seed: int = 0) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """(chosen row, rejected row) pairs, grouped by prompt in order of first appearance, and what was
    dropped: dropped_single (prompts with fewer than two candidates), dropped_ties and
    dropped_min_margin (pairs), dropped_max_pairs (pairs over max_pairs_per_prompt).
    One numpy Generator seeded by `seed` drives every prompt in turn."""
    import numpy as np

    propose = PROPOSERS[strategy]
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    dropped = {"dropped_single": 0, "dropped_ties": 0, "dropped_min_margin": 0, "dropped_max_pairs": 0}
    for rows in group_rows(prompt_keys):
        if len(rows) < 2:
            dropped["dropped_single"] += 1
            continue
        kept = []
        for a, b in propose(rows, rewards, rng):
            chosen, rejected = (a, b) if rewards[a] >= rewards[b] else (b, a)
            margin = rewards[chosen] - rewards[rejected]
            if margin == 0:
                dropped["dropped_ties"] += 1
            elif margin < min_margin:
                dropped["dropped_min_margin"] += 1
            else:
                kept.append((chosen, rejected))
        if max_pairs_per_prompt is not None and len(kept) > max_pairs_per_prompt:
            dropped["dropped_max_pairs"] += len(kept) - max_pairs_per_prompt
            keep = np.sort(rng.choice(len(kept), max_pairs_per_prompt, replace=False))
            kept = [kept[i] for i in keep]
        pairs.extend(kept)
    return pairs, dropped


def add_reference_logps(rows: dict[str, list], reference, max_length: int, batch_size: int, progress,
                        file: str = "pairs", strict: bool = False,
                        max_prompt_length: int | None = None) -> dict[str, float]:
    """Add ref_chosen_logp, ref_rejected_logp, chosen_tokens, rejected_tokens to `rows` (columns
    prompt, chosen, rejected): the reference model's summed response-token log-probs and how many
    tokens they cover. `reference` is a model artifact folder. Shared by `pairs` and `ref_logps`;
    the log-probs are tasks.logps.reference_logps', as dpo's own. Rows with a text that tokenizes
    to nothing are dropped from every column (strict: an error; see screen_texts). Returns metrics."""
    from tasks.logps import encode_pairs, reference_logps, response_tokens
    from tasks.models import load_causal_lm, screen_texts

    model, tokenizer = load_causal_lm(reference)
    keep, metrics = screen_texts(tokenizer, {c: rows[c] for c in ("prompt", "chosen", "rejected")}, file, strict)
    if len(keep) < len(rows["prompt"]):
        for column in rows:
            rows[column] = [rows[column][i] for i in keep]
    if not keep:
        raise BadInput(file, "rows", "at least one pair whose texts have tokens under the reference's tokenizer")
    examples = encode_pairs(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"], max_length,
                            max_prompt_length)
    reference_logps(model, examples, tokenizer.pad_token_id, batch_size, progress)
    for side in ("chosen", "rejected"):
        rows[f"ref_{side}_logp"] = [e[f"ref_{side}"] for e in examples]
        rows[f"{side}_tokens"] = [response_tokens(e[side]) for e in examples]
    return metrics


@stage_kind("pairs", PairsParams, output="table")
@reports_logps
def pairs(ctx: StageContext) -> dict[str, float]:
    from tasks.tables import read_table, write_table

    p: PairsParams = ctx.params
    table = read_table(ctx.inputs["scored"], ["prompt", "response", "reward"], what="scored table")
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response").to_pylist()
    rewards = table.column("reward").to_pylist()
    keys = table.column("prompt_id").to_pylist() if "prompt_id" in table.column_names else prompts

    chosen_rejected, dropped = build_pairs(keys, rewards, p.strategy, p.min_margin, p.max_pairs_per_prompt, ctx.seed)
    rows = {"prompt_id": [keys[c] for c, _ in chosen_rejected]} if "prompt_id" in table.column_names else {}
    rows |= {
        "prompt": [prompts[c] for c, _ in chosen_rejected],
        "chosen": [responses[c] for c, _ in chosen_rejected],
        "rejected": [responses[r] for _, r in chosen_rejected],
        "chosen_reward": [rewards[c] for c, _ in chosen_rejected],
        "rejected_reward": [rewards[r] for _, r in chosen_rejected],
    }
    rows["margin"] = [c - r for c, r in zip(rows["chosen_reward"], rows["rejected_reward"])]
    if not rows["prompt"]:
        raise ValueError(f"no pairs left: {dropped['dropped_single']} prompts with one candidate, {dropped['dropped_ties']} ties, "
                         f"{dropped['dropped_min_margin']} under min_margin={p.min_margin}")

    logps_metrics = {}
    if p.reference is not None:
        logps_metrics = add_reference_logps(rows, ctx.inputs["reference"], p.max_length, p.batch_size, ctx.progress,
                                            str(ctx.inputs["scored"] / "data.parquet"), p.strict, p.max_prompt_length)

    write_table(rows, ctx.out)
    n = len(rows["prompt"])
    return {"pairs": float(n), **{k: float(v) for k, v in dropped.items()}, "mean_margin": sum(rows["margin"]) / n,
            **logps_metrics}
