"""The pairs stage's strategies (best_vs_worst, best_vs_random, all_pairs, tournament), its filters
and what it counts as dropped; on hand-made groups with known pairs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks.pairs import build_pairs
from tasks.tables import read_table, write_table


def previous_best_vs_worst(prompt_keys, rewards, min_margin):
    """pairs' only strategy before there were several, kept verbatim as the reference: best_vs_worst
    must still give the same pairs (it counted a single-candidate prompt as a tie)."""
    groups: dict = {}
    for row, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(row)
    pairs, dropped = [], {"dropped_ties": 0, "dropped_min_margin": 0}
    for rows in groups.values():
        best = max(rows, key=lambda i: rewards[i])
        worst = min(rows, key=lambda i: rewards[i])
        margin = rewards[best] - rewards[worst]
        if margin == 0:
            dropped["dropped_ties"] += 1
        elif margin < min_margin:
            dropped["dropped_min_margin"] += 1
        else:
            pairs.append((best, worst))
    return pairs, dropped


def grouped(*groups: list[float]) -> tuple[list[int], list[float]]:
    """keys and rewards for build_pairs: group g's candidates have key g, in the order given."""
    return [g for g, rewards in enumerate(groups) for _ in rewards], [r for rewards in groups for r in rewards]


def test_best_vs_worst_pairs_and_counts():
    keys, rewards = grouped(
        [0.5, -0.2, 0.1],  # rows 0-2: 0 over 1, margin 0.7
        [0.3, 0.3, 0.3],  # rows 3-5: a tie
        [0.1, 0.05],  # rows 6-7: margin 0.05 < min_margin
        [-0.5, 0.4, 0.4, -0.1],  # rows 8-11: the first best (9) over 8
        [1.0],  # row 12: a single candidate
    )
    pairs, dropped = build_pairs(keys, rewards, "best_vs_worst", min_margin=0.1)
    assert pairs == [(0, 1), (9, 8)]
    assert dropped == {"dropped_single": 1, "dropped_ties": 1, "dropped_min_margin": 1, "dropped_max_pairs": 0}


def test_best_vs_worst_is_unchanged_from_before_strategies():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=300)
    keys = np.repeat(np.arange(sizes.size), sizes).tolist()
    rewards = (rng.integers(0, 4, size=len(keys)) * 0.25).tolist()  # coarse: many ties
    for min_margin in (0.0, 0.3, 0.6):
        pairs, dropped = build_pairs(keys, rewards, min_margin=min_margin, seed=int(rng.integers(100)))
        old_pairs, old_dropped = previous_best_vs_worst(keys, rewards, min_margin)
        assert pairs == old_pairs
        assert dropped["dropped_ties"] + dropped["dropped_single"] == old_dropped["dropped_ties"]
        assert dropped["dropped_min_margin"] == old_dropped["dropped_min_margin"]


def test_best_vs_random_pairs_the_best_with_a_uniform_other():
    # rows 0-3 per group: the first best is row 0; row 3 ties with it, so a third of the draws are ties
    trials = 900
    keys, rewards = grouped(*[[0.9, 0.1, 0.5, 0.9]] * trials)
    pairs, dropped = build_pairs(keys, rewards, "best_vs_random", seed=1)
    assert all(c % 4 == 0 and r % 4 in (1, 2) for c, r in pairs)
    others = np.bincount([r % 4 for _, r in pairs], minlength=4)
    assert dropped["dropped_ties"] == trials - len(pairs)
    assert abs(others[1] - 300) < 50 and abs(others[2] - 300) < 50 and abs(dropped["dropped_ties"] - 300) < 50  # ~3.5 sd
    keys, rewards = grouped([0.2, 0.4], [1.0])
    assert build_pairs(keys, rewards, "best_vs_random", seed=2) == ([(1, 0)], {
        "dropped_single": 1, "dropped_ties": 0, "dropped_min_margin": 0, "dropped_max_pairs": 0})


def test_all_pairs_is_every_pair_of_different_rewards():
    rewards = [0.3, -0.1, 0.8, 0.0, 0.5]
    pairs, dropped = build_pairs([0] * 5, rewards, "all_pairs")
    assert len(pairs) == 5 * 4 // 2 and sum(dropped.values()) == 0
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in itertools.combinations(range(5), 2)}
    assert all(rewards[c] > rewards[r] for c, r in pairs)

    keys, rewards = grouped([1.0, 1.0, 0.0], [0.0, 0.05, 0.5], [2.0])
    pairs, dropped = build_pairs(keys, rewards, "all_pairs", min_margin=0.1)
    # group 0: (0, 1) a tie; group 1: 4 over 3 by 0.05 < 0.1
    assert pairs == [(0, 2), (1, 2), (5, 3), (5, 4)]
    assert dropped == {"dropped_single": 1, "dropped_ties": 1, "dropped_min_margin": 1, "dropped_max_pairs": 0}


def test_all_pairs_capped_per_prompt_is_a_seeded_subset():
    keys, rewards = grouped(*[list(np.linspace(0, 1, 6))] * 20)
    every, _ = build_pairs(keys, rewards, "all_pairs")
    capped, dropped = build_pairs(keys, rewards, "all_pairs", max_pairs_per_prompt=4, seed=3)
    assert len(capped) == 20 * 4 and dropped["dropped_max_pairs"] == 20 * (15 - 4)
    assert set(capped) <= set(every)
    assert all(sum(c // 6 == g for c, _ in capped) == 4 for g in range(20))
    assert build_pairs(keys, rewards, "all_pairs", max_pairs_per_prompt=4, seed=3)[0] == capped
    assert build_pairs(keys, rewards, "all_pairs", max_pairs_per_prompt=4, seed=4)[0] != capped
    # a prompt with no more pairs than the cap keeps them all
    assert build_pairs(keys[:6], rewards[:6], "all_pairs", max_pairs_per_prompt=15)[0] == every[:15]


def test_tournament_pairs_are_disjoint_random_and_labelled_by_reward():
    rng = np.random.default_rng(5)
    keys, rewards = grouped(*[list(rng.permutation(8) * 0.1) for _ in range(50)], [0.1, 0.2, 0.3])
    pairs, dropped = build_pairs(keys, rewards, "tournament", seed=6)
    assert len(pairs) == 50 * 4 + 1 and sum(dropped.values()) == 0
    for g in range(50):
        rows = [row for pair in pairs for row in pair if row // 8 == g]
        assert sorted(rows) == list(range(8 * g, 8 * g + 8))  # 4 disjoint pairs cover all 8
    odd = [row for pair in pairs[-1:] for row in pair]
    assert len(set(odd)) == 2 and all(row >= 400 for row in odd)  # 3 samples: one pair, one sits out
    assert all(rewards[c] > rewards[r] for c, r in pairs)
    # pairing is random: row 0's partner differs across prompts that hold the same rewards
    keys, rewards = grouped(*[[0.0, 0.1, 0.2, 0.3]] * 600)
    partners = np.bincount([(c + r) % 4 for c, r in build_pairs(keys, rewards, "tournament", seed=7)[0] if 0 in (c % 4, r % 4)])
    assert partners.sum() == 600 and all(abs(n - 200) < 45 for n in partners[1:])  # each of 3 partners ~1/3


def test_tournament_counts_ties_and_margins():
    keys, rewards = grouped([0.5, 0.5, 0.5, 0.5], [0.0, 0.01])
    pairs, dropped = build_pairs(keys, rewards, "tournament", min_margin=0.05, seed=0)
    assert pairs == [] and dropped == {"dropped_single": 0, "dropped_ties": 2, "dropped_min_margin": 1, "dropped_max_pairs": 0}


@pytest.mark.parametrize("strategy", ["best_vs_random", "tournament"])
def test_random_strategies_are_reproducible_by_seed(strategy):
    keys, rewards = grouped(*[[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]] * 30)
    first = build_pairs(keys, rewards, strategy, seed=11)
    assert build_pairs(keys, rewards, strategy, seed=11) == first
    assert build_pairs(keys, rewards, strategy, seed=12)[0] != first[0]


# ---- the stage function ------------------------------------------------------------------------


def scored(folder, data: dict):
    folder.mkdir()
    write_table(data, folder)
    return folder


SCORED = {
    "prompt_id": [7, 7, 7, 7, 8, 8, 9],
    "prompt": ["p7"] * 4 + ["p8"] * 2 + ["p9"],
    "response": ["a", "b", "c", "d", "e", "f", "g"],
    "reward": [0.4, 0.1, 0.1, -0.2, 0.3, 0.3, 1.0],
}


def test_pairs_stage_strategies_columns_and_metrics(tmp_path, run_stage):
    folder = scored(tmp_path / "scored", SCORED)
    out, metrics = run_stage({"kind": "pairs", "scored": "s", "strategy": "all_pairs"}, {"scored": folder})
    table = read_table(out).to_pylist()
    assert list(table[0]) == ["prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"]
    assert [(r["prompt_id"], r["chosen"], r["rejected"]) for r in table] == [
        (7, "a", "b"), (7, "a", "c"), (7, "a", "d"), (7, "b", "d"), (7, "c", "d")]  # b-c and e-f tie
    assert metrics == pytest.approx({"pairs": 5, "dropped_single": 1, "dropped_ties": 2, "dropped_min_margin": 0,
                                     "dropped_max_pairs": 0, "mean_margin": (0.3 + 0.3 + 0.6 + 0.3 + 0.3) / 5})

    params = {"kind": "pairs", "scored": "s", "strategy": "tournament"}
    first, _ = run_stage(params, {"scored": folder}, seed=4)
    again, _ = run_stage(params, {"scored": folder}, seed=4)
    assert read_table(first).to_pylist() == read_table(again).to_pylist()

    without_ids = scored(tmp_path / "no_ids", {k: v for k, v in SCORED.items() if k != "prompt_id"})
    out, metrics = run_stage({"kind": "pairs", "scored": "s"}, {"scored": without_ids})
    assert read_table(out).column_names == ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"]
    assert [(r["chosen"], r["rejected"]) for r in read_table(out).to_pylist()] == [("a", "d")]


def test_pairs_stage_says_why_no_pairs_are_left(tmp_path, run_stage):
    folder = scored(tmp_path / "scored", {"prompt": ["p", "p", "q"], "response": ["a", "b", "c"], "reward": [0.2, 0.2, 0.0]})
    with pytest.raises(ValueError, match="no pairs left: 1 prompts with one candidate, 1 ties, 0 under min_margin"):
        run_stage({"kind": "pairs", "scored": "s"}, {"scored": folder})


def test_reject_then_tournament_pairs(tmp_path, run_stage):
    """RSO's data path: accept samples per prompt, then pair them at random."""
    rng = np.random.default_rng(8)
    n_prompts, n_candidates = 10, 16
    folder = scored(tmp_path / "scored", {
        "prompt_id": np.repeat(np.arange(n_prompts), n_candidates).tolist(),
        "prompt": [f"p{i}" for i in np.repeat(np.arange(n_prompts), n_candidates)],
        "response": [f"r{i}" for i in range(n_prompts * n_candidates)],
        "reward": rng.normal(size=n_prompts * n_candidates).tolist(),
    })
    accepted, _ = run_stage({"kind": "reject", "scored": "s", "num_samples": 4, "beta": 0.5}, {"scored": folder})
    out, metrics = run_stage({"kind": "pairs", "scored": "s", "strategy": "tournament"}, {"scored": accepted})
    table = read_table(out).to_pylist()
    assert metrics["pairs"] == len(table) == 2 * n_prompts
    for prompt_id in range(n_prompts):
        responses = [x for r in table if r["prompt_id"] == prompt_id for x in (r["chosen"], r["rejected"])]
        assert len(set(responses)) == 4
