"""reject: keep some of each prompt's scored candidates (RSO's statistical rejection sampling,
best-of-n, top-k or a uniform sample), for `pairs` to build preference pairs from.

RSO: Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization"
(arXiv:2309.06657), Algorithm 1. Candidates y ~ pi_sft(y|x) are accepted toward
pi_r(y|x) proportional to pi_sft(y|x) exp(r(x,y) / beta), each with probability
exp((r - r_max) / beta), r_max the highest reward among the prompt's candidates not yet accepted.

The sampling is plain functions over numpy arrays (numpy imported where used, so that importing
this module stays cheap); the stage function reads and writes the tables.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tasks.base import BadInput, Ref, StageContext, StageParams, stage_kind

if TYPE_CHECKING:
    import pyarrow as pa

Strategy = Literal["rso", "best_of_n", "top_k", "random"]


class RejectParams(StageParams):
    kind: Literal["reject"] = "reject"
    scored: Ref("table")  # prompt, response, reward (prompt_id when present groups the candidates)
    strategy: Strategy = "rso"
    num_samples: int | None = Field(
        None, ge=1, description="responses accepted per prompt (rso, top_k, random); best_of_n keeps one"
    )
    beta: float | None = Field(None, gt=0, description="rso's reward temperature: small keeps the best, large is uniform")

    @model_validator(mode="after")
    def _strategy_params(self):
        # A parameter the strategy does not use is an error, not silently ignored (it would also
        # change the cache key for nothing).
        if self.strategy == "best_of_n":
            if self.num_samples not in (None, 1):
                raise ValueError("best_of_n keeps the single best response per prompt: leave num_samples unset "
                                 "(or 1), or use strategy top_k to keep several")
        elif self.num_samples is None:
            raise ValueError(f"strategy {self.strategy} needs num_samples (responses accepted per prompt)")
        if self.strategy == "rso" and self.beta is None:
            raise ValueError("strategy rso needs beta (the reward temperature of exp(r / beta))")
        if self.strategy != "rso" and self.beta is not None:
            raise ValueError(f"beta is rso's temperature; strategy {self.strategy} does not use it")
        return self


def group_rows(keys: list) -> list[list[int]]:
    """Row indices per key, keys in order of first appearance, rows in table order."""
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def rso_sample(rewards, num_samples: int, beta: float, rng) -> tuple[list[int], int]:
    """RSO's statistical rejection sampling (Liu et al. 2023, Algorithm 1) over one prompt's
    candidates: (positions accepted, in order of acceptance; passes over the candidates it took).

    Each pass goes over the candidates not yet accepted in a random order and accepts each with
    probability exp((r - r_max) / beta), r_max the highest reward among them when the pass starts
    (Algorithm 1 takes the max once per pass and removes the pass's acceptances at its end). The
    best remaining candidate is accepted with probability 1, so every pass accepts at least one
    and there are at most num_samples passes. Stops at num_samples accepted or when none remain.

    Why this targets pi_r: in a random order each candidate is a fresh draw from pi_sft, and
    accepting it with probability exp((r - r_max) / beta) is rejection sampling with envelope
    exp(r_max / beta). On a fixed small candidate set the accepted one therefore favours the best
    more than softmax(r / beta) over the set does; the two agree as the candidates grow many
    (tests/test_reject.py checks both laws).
    """
    import numpy as np

    rewards = np.asarray(rewards, dtype=np.float64)
    if not np.isfinite(rewards).all():
        raise ValueError("rso_sample needs finite rewards")
    remaining = np.arange(rewards.size)
    accepted: list[int] = []
    passes = 0
    while len(accepted) < num_samples and remaining.size:
        passes += 1
        order = rng.permutation(remaining)
        r = rewards[order]
        with np.errstate(over="ignore", under="ignore"):  # a tiny beta sends far-off rewards to exp(-inf) = 0
            accept_prob = np.exp((r - r.max()) / beta)
        hits = np.flatnonzero(rng.random(order.size) < accept_prob)[: num_samples - len(accepted)]
        accepted.extend(order[hits].tolist())
        remaining = np.delete(order, hits)
    return accepted, passes


def top_k(rewards, k: int) -> list[int]:
    """Positions of the k highest rewards, highest first; equal rewards in table order."""
    import numpy as np

    return np.argsort(-np.asarray(rewards, dtype=np.float64), kind="stable")[:k].tolist()


def uniform_sample(n: int, k: int, rng) -> list[int]:
    """k of n positions uniformly without replacement, in the order drawn."""
    return rng.permutation(n)[:k].tolist()


def select_per_prompt(keys: list, rewards: list[float], strategy: str, num_samples: int | None = None,
                      beta: float | None = None, seed: int = 0) -> tuple[list[int], list[int], dict[str, float]]:
    """Choose rows per prompt (rows grouped by `keys`). Returns (rows kept, grouped by prompt in
    order of first appearance and within a prompt in order of acceptance; each row's acceptance
    rank within its prompt, from 0; statistics). One numpy Generator seeded by `seed` drives every
    prompt in turn, so the same input and seed give the same rows.

    best_of_n is top_k with k = 1 (the first of equal best rewards, as in `pairs`' best_vs_worst).
    A prompt with fewer candidates than num_samples keeps all of them.
    """
    import numpy as np

    if strategy not in ("rso", "best_of_n", "top_k", "random"):
        raise ValueError(f"unknown reject strategy {strategy!r}")
    rng = np.random.default_rng(seed)
    k = 1 if strategy == "best_of_n" else num_samples
    rows_kept: list[int] = []
    ranks: list[int] = []
    passes: list[int] = []
    groups = group_rows(keys)
    short = 0
    for rows in groups:
        group_rewards = np.array([rewards[i] for i in rows], dtype=np.float64)
        short += len(rows) < k
        if strategy == "rso":
            chosen, n_passes = rso_sample(group_rewards, k, beta, rng)
            passes.append(n_passes)
        elif strategy in ("top_k", "best_of_n"):
            chosen = top_k(group_rewards, k)
        else:
            chosen = uniform_sample(len(rows), k, rng)
        rows_kept.extend(rows[position] for position in chosen)
        ranks.extend(range(len(chosen)))
    stats = {"prompts": len(groups), "prompts_short": short}
    if strategy == "rso":
        stats["mean_passes"] = float(np.mean(passes)) if passes else 0.0
    return rows_kept, ranks, stats


def read_scored(folder) -> tuple[pa.Table, list[float]]:
    """The scored table and its rewards, checked: the columns are there, every reward a finite number."""
    import math
    from pathlib import Path

    from tasks.tables import TABLE_FILE, read_table

    path = str(Path(folder) / TABLE_FILE)
    table = read_table(folder)
    for column in ("prompt", "response", "reward"):
        if column not in table.column_names:
            raise BadInput(path, column, f"a column {column!r} (the scored table has {table.column_names})")
    if table.num_rows == 0:
        raise BadInput(path, "rows", "at least one scored candidate")
    rewards = table.column("reward").to_pylist()
    for row, reward in enumerate(rewards):
        if not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise BadInput(path, f"row {row + 1}", f"a finite number in column 'reward', got {reward!r}")
    return table, rewards


@stage_kind("reject", RejectParams, output="table")
def reject(ctx: StageContext) -> dict[str, float]:
    import pyarrow as pa

    from tasks.tables import write_table

    p: RejectParams = ctx.params
    table, rewards = read_scored(ctx.inputs["scored"])
    keys = table.column("prompt_id" if "prompt_id" in table.column_names else "prompt").to_pylist()
    rows, ranks, stats = select_per_prompt(keys, rewards, p.strategy, p.num_samples, p.beta, ctx.seed)

    if "accept_rank" in table.column_names:  # rejecting an already accepted table again
        table = table.drop_columns(["accept_rank"])
    accepted = table.take(pa.array(rows, pa.int64())).append_column("accept_rank", pa.array(ranks, pa.int64()))
    write_table(accepted, ctx.out)

    kept_rewards = [rewards[i] for i in rows]
    metrics = {
        "accepted": float(len(rows)),
        "prompts": float(stats["prompts"]),
        "prompts_short": float(stats["prompts_short"]),  # fewer candidates than num_samples: all kept
        "mean_reward_accepted": sum(kept_rewards) / len(kept_rewards),
        "mean_reward_candidates": sum(rewards) / len(rewards),
    }
    if "mean_passes" in stats:
        metrics["mean_passes"] = stats["mean_passes"]
    return metrics
