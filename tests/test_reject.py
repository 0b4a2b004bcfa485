"""The reject stage: RSO's statistical rejection sampling (Liu et al. 2023, Algorithm 1), best-of-n,
top-k and uniform sampling. Statistical checks use numpy, many seeded trials and chi-square tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from tasks import load_stage_kinds
from tasks.base import BadInput
from tasks.reject import rso_sample, select_per_prompt
from tasks.tables import read_table, write_table

REJECT = load_stage_kinds()["reject"].params


def chi2_sf(statistic: float, dof: int) -> float:
    """P(chi2(dof) >= statistic), the closed forms for integer dof (no scipy in the project)."""
    half = statistic / 2
    if dof % 2 == 0:
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(dof // 2))
    tail = math.erfc(math.sqrt(half))
    return tail + sum(math.exp(-half + (i + 0.5) * math.log(half) - math.lgamma(i + 1.5)) for i in range((dof - 1) // 2))


def goodness_of_fit(counts, probabilities) -> float:
    """Pearson's chi-square p-value of multinomial counts against probabilities."""
    counts, probabilities = np.asarray(counts, float), np.asarray(probabilities, float)
    expected = counts.sum() * probabilities / probabilities.sum()
    return chi2_sf(float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1)


def uniform_inclusion_p_value(inclusions, trials: int, k: int) -> float:
    """p-value that each of K candidates is kept with probability k/K when k of K are drawn
    uniformly without replacement. The counts' covariance is s2 K/(K-1) (I - J/K), s2 = T p (1-p),
    so sum (O - E)^2 (K-1) / (K s2) is chi-square with K-1 degrees of freedom."""
    inclusions = np.asarray(inclusions, float)
    n = inclusions.size
    p = k / n
    s2 = trials * p * (1 - p)
    return chi2_sf(float(((inclusions - trials * p) ** 2).sum() * (n - 1) / (n * s2)), n - 1)


def test_chi2_sf_matches_known_quantiles():
    # 95% and 99.9% quantiles of chi-square with 1..4 degrees of freedom
    for dof, q95, q999 in ((1, 3.841459, 10.827566), (2, 5.991465, 13.815511), (3, 7.814728, 16.266236), (4, 9.487729, 18.466827)):
        assert chi2_sf(q95, dof) == pytest.approx(0.05, rel=1e-5)
        assert chi2_sf(q999, dof) == pytest.approx(0.001, rel=1e-5)


def repeated(rewards, trials: int) -> tuple[list, list]:
    """`trials` prompts that each have the same candidates: keys and rewards for select_per_prompt."""
    return np.repeat(np.arange(trials), len(rewards)).tolist(), np.tile(rewards, trials).tolist()


def exact_first_acceptance(rewards, beta: float) -> np.ndarray:
    """The law of Algorithm 1's single accepted candidate (num_samples=1) on a fixed candidate set.
    In a random order each candidate arrives at an independent uniform time t; candidate i is the
    one accepted when accepted (a_i) and none before it was: P(i) = a_i int_0^1 prod_j!=i (1 - a_j t) dt,
    a_j = exp((r_j - r_max) / beta). (The best has a = 1, so the first pass always accepts one.)"""
    a = np.exp((np.asarray(rewards) - np.max(rewards)) / beta)
    # Gauss-Legendre on [0, 1] with 256 nodes: exact for these polynomials of degree below 512
    nodes, weights = np.polynomial.legendre.leggauss(256)
    t, weights = (nodes + 1) / 2, weights / 2
    log_none = np.log1p(-np.outer(t, a)).sum(axis=1, keepdims=True)  # log prod_j (1 - a_j t), per node
    with np.errstate(divide="ignore"):  # the best (a = 1) has log(1 - t) = -inf only at t = 1, not a node
        others = np.exp(log_none - np.log1p(-np.outer(t, a)))
    law = a * (weights[:, None] * others).sum(axis=0)
    return np.array(law)


# ---- RSO against its target --------------------------------------------------------------------


def test_rso_samples_the_optimal_policy_from_fresh_sft_samples():
    """The paper's claim: candidates drawn from pi_sft, accepted by Algorithm 1, follow
    pi_r(y) proportional to pi_sft(y) exp(r(y) / beta). Four distinct responses; each trial draws
    32 candidates from pi_sft and accepts one. The best response is missing from a trial's
    candidates (so r_max would be lower) with probability 0.7^32 ~ 1e-5: negligible here."""
    sft = np.array([0.3, 0.2, 0.3, 0.2])
    reward = np.array([0.6, 0.2, 0.0, -0.4])
    beta, trials, k = 0.4, 10_000, 32
    rng = np.random.default_rng(0)
    drawn = rng.choice(4, size=(trials, k), p=sft)
    keys = np.repeat(np.arange(trials), k).tolist()
    rows, ranks, stats = select_per_prompt(keys, reward[drawn.ravel()].tolist(), "rso", num_samples=1, beta=beta, seed=1)
    assert len(rows) == trials and set(ranks) == {0} and stats["mean_passes"] == 1.0
    counts = np.bincount(drawn.ravel()[rows], minlength=4)

    target = sft * np.exp(reward / beta)
    assert goodness_of_fit(counts, target) > 1e-3, counts
    # a wrong weighting fails the same test, so the test can fail
    assert goodness_of_fit(counts, np.exp(reward / beta)) < 1e-6  # pi_sft left out
    assert goodness_of_fit(counts, sft * np.exp(reward / (1.5 * beta))) < 1e-6  # another temperature


def test_rso_on_a_fixed_candidate_set_follows_algorithm_1s_law():
    """With the same few candidates every trial, the accepted one follows the law of a random-order
    pass (exact_first_acceptance), which favours the best more than softmax(r / beta) over the set;
    the two agree only as the candidates grow many (each candidate then being a fresh pi_sft draw)."""
    rewards, beta, trials = np.array([0.0, -0.35, -0.7, -1.4]), 0.5, 10_000
    rows, _, _ = select_per_prompt(*repeated(rewards, trials), "rso", num_samples=1, beta=beta, seed=2)
    counts = np.bincount(np.array(rows) % rewards.size, minlength=rewards.size)
    assert goodness_of_fit(counts, exact_first_acceptance(rewards, beta)) > 1e-3, counts
    assert goodness_of_fit(counts, np.exp(rewards / beta)) < 1e-6  # softmax over these 4 is not it


def test_exact_first_acceptance_is_a_distribution_that_tends_to_softmax():
    assert exact_first_acceptance([0.0, -1.0, -2.0], 0.5).sum() == pytest.approx(1.0)
    rewards = np.tile([0.0, -0.5, -1.0, -1.5], 100)  # 400 candidates, 4 reward levels
    law = exact_first_acceptance(rewards, 1.0)
    by_level = law.reshape(100, 4).sum(axis=0)
    softmax = np.exp([0.0, -0.5, -1.0, -1.5]) / np.exp([0.0, -0.5, -1.0, -1.5]).sum()
    assert by_level == pytest.approx(softmax, abs=2e-3)


def test_rso_with_beta_near_zero_is_exactly_top_k():
    rng = np.random.default_rng(3)
    groups, size, k = 200, 6, 3
    keys = np.repeat(np.arange(groups), size).tolist()
    rewards = np.concatenate([rng.permutation(size) * 0.1 + rng.normal() for _ in range(groups)]).tolist()
    rso_rows, rso_ranks, stats = select_per_prompt(keys, rewards, "rso", num_samples=k, beta=1e-6, seed=4)
    assert (rso_rows, rso_ranks) == select_per_prompt(keys, rewards, "top_k", num_samples=k)[:2]
    assert stats["mean_passes"] == k  # one acceptance (the best remaining) per pass
    for g in range(groups):
        accepted = [rewards[i] for i in rso_rows[g * k:(g + 1) * k]]
        assert accepted == sorted(rewards[g * size:(g + 1) * size], reverse=True)[:k]


@pytest.mark.parametrize("strategy, beta", [("rso", 1e6), ("random", None)])
def test_rso_with_huge_beta_and_random_keep_each_candidate_with_probability_k_over_n(strategy, beta):
    rewards, trials, k = np.array([2.0, 1.0, 0.0, -1.0, -3.0]), 10_000, 2
    rows, ranks, _ = select_per_prompt(*repeated(rewards, trials), strategy, num_samples=k, beta=beta, seed=5)
    assert len(rows) == trials * k and ranks[:4] == [0, 1, 0, 1]
    inclusions = np.bincount(np.array(rows) % rewards.size, minlength=rewards.size)
    assert uniform_inclusion_p_value(inclusions, trials, k) > 1e-3, inclusions
    # top-k fails the same test
    top = np.bincount(np.array(select_per_prompt(*repeated(rewards, trials), "top_k", num_samples=k)[0]) % 5, minlength=5)
    assert uniform_inclusion_p_value(top, trials, k) < 1e-6


def test_rso_accepts_best_first_more_often_and_stops_when_candidates_run_out():
    rng = np.random.default_rng(6)
    accepted, passes = rso_sample([1.0, 0.0, -1.0], num_samples=5, beta=0.3, rng=rng)
    assert sorted(accepted) == [0, 1, 2] and 1 <= passes <= 3  # all 3 accepted; not 5
    firsts = [rso_sample([1.0, 0.0, -1.0], 2, 0.3, rng)[0][0] for _ in range(300)]
    assert firsts.count(0) > firsts.count(1) > firsts.count(2)
    with pytest.raises(ValueError, match="finite"):
        rso_sample([0.0, float("nan")], 1, 1.0, rng)


def test_selection_is_reproducible_by_seed():
    keys, rewards = repeated(np.array([0.3, 0.1, 0.0, -0.2, -0.5]), 50)
    for strategy in ("rso", "random"):
        beta = 0.2 if strategy == "rso" else None
        first = select_per_prompt(keys, rewards, strategy, 2, beta, seed=7)
        assert select_per_prompt(keys, rewards, strategy, 2, beta, seed=7) == first
        assert select_per_prompt(keys, rewards, strategy, 2, beta, seed=8)[0] != first[0]


def test_best_of_n_and_top_k_break_ties_by_table_order():
    keys = ["a", "a", "a", "b", "b", "a"]
    rewards = [0.1, 0.5, 0.5, -1.0, 2.0, 0.3]
    assert select_per_prompt(keys, rewards, "best_of_n")[:2] == ([1, 4], [0, 0])
    rows, ranks, stats = select_per_prompt(keys, rewards, "top_k", num_samples=3)
    assert rows == [1, 2, 5, 4, 3] and ranks == [0, 1, 2, 0, 1]
    assert stats == {"prompts": 2, "prompts_short": 1}


# ---- parameters ----------------------------------------------------------------------------------


def test_params_name_what_a_strategy_needs():
    base = {"kind": "reject", "scored": "s"}
    assert REJECT.model_validate({**base, "num_samples": 4, "beta": 0.5}).strategy == "rso"
    assert REJECT.model_validate({**base, "strategy": "best_of_n"}).num_samples is None
    assert REJECT.model_validate({**base, "strategy": "best_of_n", "num_samples": 1}).num_samples == 1
    assert REJECT.model_validate({**base, "strategy": "top_k", "num_samples": 2}).beta is None
    for bad, message in (
        ({"beta": 0.5}, "rso needs num_samples"),
        ({"num_samples": 4}, "rso needs beta"),
        ({"num_samples": 4, "beta": 0}, "greater than 0"),
        ({"num_samples": 0, "beta": 1}, "greater than or equal to 1"),
        ({"strategy": "best_of_n", "num_samples": 3}, "use strategy top_k"),
        ({"strategy": "top_k", "num_samples": 2, "beta": 1.0}, "top_k does not use it"),
        ({"strategy": "random"}, "random needs num_samples"),
        ({"strategy": "best", "num_samples": 1}, "Input should be"),
    ):
        with pytest.raises(ValidationError, match=message):
            REJECT.model_validate({**base, **bad})


# ---- the stage function --------------------------------------------------------------------------


def scored_table(folder, rewards_by_prompt: dict[str, list[float]], prompt_ids: bool = True):
    folder.mkdir()
    data = {"prompt_id": [], "prompt": [], "sample": [], "response": [], "reward": []}
    for prompt_id, (prompt, rewards) in enumerate(rewards_by_prompt.items()):
        for sample, reward in enumerate(rewards):
            for key, value in zip(data, (prompt_id, prompt, sample, f"response {prompt_id}.{sample}", reward)):
                data[key].append(value)
    if not prompt_ids:
        del data["prompt_id"]
    write_table(data, folder)
    return folder


SCORED = {"animals cat :": [0.5, -0.2, 0.1, 0.9], "food rice :": [0.3, 0.2], "tools saw :": [1.0]}


def test_reject_stage_keeps_rows_and_adds_accept_rank(tmp_path, run_stage):
    scored = scored_table(tmp_path / "scored", SCORED)
    params = {"kind": "reject", "scored": "s", "num_samples": 2, "beta": 0.5}
    out, metrics = run_stage(params, {"scored": scored}, seed=3)
    table = read_table(out).to_pylist()
    assert list(table[0]) == ["prompt_id", "prompt", "sample", "response", "reward", "accept_rank"]
    assert [(r["prompt_id"], r["accept_rank"]) for r in table] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert all(r["response"] == f"response {r['prompt_id']}.{r['sample']}" for r in table)  # whole rows
    assert metrics["accepted"] == 5 and metrics["prompts"] == 3 and metrics["prompts_short"] == 1
    assert metrics["mean_reward_accepted"] == pytest.approx(np.mean([r["reward"] for r in table]))
    assert metrics["mean_reward_candidates"] == pytest.approx(np.mean([x for v in SCORED.values() for x in v]))
    assert 1 <= metrics["mean_passes"] <= 2
    again, _ = run_stage(params, {"scored": scored}, seed=3)
    assert read_table(again).to_pylist() == table


def test_reject_stage_groups_by_prompt_without_prompt_id(tmp_path, run_stage):
    scored = scored_table(tmp_path / "scored", SCORED, prompt_ids=False)
    out, metrics = run_stage({"kind": "reject", "scored": "s", "strategy": "best_of_n"}, {"scored": scored})
    table = read_table(out).to_pylist()
    assert [(r["prompt"], r["reward"], r["accept_rank"]) for r in table] == [
        ("animals cat :", 0.9, 0), ("food rice :", 0.3, 0), ("tools saw :", 1.0, 0)]
    assert "mean_passes" not in metrics and metrics["mean_reward_accepted"] == pytest.approx(2.2 / 3)


def test_reject_stage_names_a_missing_column_and_a_bad_reward(tmp_path, run_stage):
    folder = tmp_path / "no_reward"
    folder.mkdir()
    write_table({"prompt": ["a"], "response": ["b"]}, folder)
    params = {"kind": "reject", "scored": "s", "strategy": "top_k", "num_samples": 1}
    with pytest.raises(BadInput, match=r"no_reward/data\.parquet: reward: a column 'reward' \(the scored table has \['prompt', 'response'\]\)"):
        run_stage(params, {"scored": folder})
    folder = tmp_path / "nan_reward"
    folder.mkdir()
    write_table({"prompt": ["a", "a"], "response": ["b", "c"], "reward": [0.1, float("nan")]}, folder)
    with pytest.raises(BadInput, match=r"nan_reward/data\.parquet: row 2: a finite number in column 'reward'"):
        run_stage(params, {"scored": folder})
    folder = tmp_path / "empty"
    folder.mkdir()
    write_table({"prompt": [], "response": [], "reward": []}, folder)
    with pytest.raises(BadInput, match=r"empty/data\.parquet: rows: at least one scored candidate"):
        run_stage(params, {"scored": folder})
