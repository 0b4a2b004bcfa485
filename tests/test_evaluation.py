"""Evaluation: the judges of `evaluate` (reward fn, reward model, pairwise LM), its KL and length
metrics; `reward_accuracy` (EXRM vs DPORM under distribution shift), the shifted synthetic sets,
`ref_logps`; and a small pipelines/exrm_vs_dporm.yaml end to end through the CLI."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pydantic import ValidationError

from conftest import REPO, alignflow, stage_runs
from tasks import demo_task, load_stage_kinds
from tasks.tables import read_table, write_table

SETS = ("id", "prompt_shift", "response_shift")
ACCURACY_METRICS = [f"acc_{name}{suffix}" for name in SETS for suffix in ("", "_ci_low", "_ci_high")]


def rows(folder):
    return read_table(folder).to_pylist()


# ---- evaluate -------------------------------------------------------------------------------


def test_evaluate_takes_exactly_one_judge():
    params = load_stage_kinds()["evaluate"].params
    base = {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x"}
    assert params.model_validate({**base, "judge": "demo_gold"}).judge == "demo_gold"
    assert params.model_validate({**base, "judge_lm": "j"}).judge is None
    for bad in ({}, {"judge": "demo_gold", "judge_model": "rm"}, {"judge_model": "rm", "judge_lm": "j"}, {"judge": "nope"}):
        with pytest.raises(ValidationError):
            params.model_validate({**base, **bad})


def test_pairwise_judge_asks_both_orders():
    from tasks.evaluate import pairwise_outcomes

    calls = []

    def always_a(prompts, a, b):
        calls.append((list(a), list(b)))
        return [1.0] * len(prompts)

    def prefers_good(prompts, a, b):  # a judge with no position bias
        return [float(x.count("good") - y.count("good")) for x, y in zip(a, b)]

    prompts, policy, baseline = ["animals :"] * 3, ["good cat", "bad cat", "new cat"], ["bad dog", "good dog", "new dog"]
    assert pairwise_outcomes(prompts, policy, baseline, always_a) == [0.5, 0.5, 0.5]
    assert calls == [(policy, baseline), (baseline, policy)]
    assert pairwise_outcomes(prompts, policy, baseline, prefers_good) == [1.0, 0.0, 0.5]


def always_a_judge(folder):
    """A causal LM that answers "A" whatever it is asked: every token embeds to the same vector, so
    the last hidden state h is the same for every input, and the output head scores "A" by h, "B" by 0."""
    from tasks.evaluate import JUDGE_TEMPLATE
    from tasks.models import build_tiny_llama, build_word_tokenizer, save_model

    words = [w for w in dict.fromkeys(JUDGE_TEMPLATE.split() + ["A", "B"]) if w not in demo_task.vocabulary()]
    tokenizer = build_word_tokenizer(demo_task.vocabulary() + words)
    model = build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[-1].clone()  # (row 0, <pad>, is 0)
        h = model.model(input_ids=torch.tensor([[1, 5, 9]])).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("A")] = h
    save_model(model, tokenizer, folder)
    return folder


def test_evaluate_with_an_lm_judge_biased_to_position_a_ties(tmp_path, tiny_sft_model, tiny_demo_model, demo_table, run_stage):
    judge = always_a_judge(tmp_path / "judge")
    out, metrics = run_stage(
        {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "judge_lm": "j", "max_new_tokens": 8},
        {"policy": tiny_sft_model, "baseline": tiny_demo_model, "prompts": demo_table("eval_prompts", 20), "judge_lm": judge},
    )
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert sum(s["policy_response"] != s["baseline_response"] for s in samples) > 10  # real comparisons
    from tasks.evaluate import lm_judge
    from tasks.models import load_causal_lm

    prefers_a = lm_judge(*load_causal_lm(judge), max_length=512, batch_size=8)
    args = [s["prompt"] for s in samples], [s["policy_response"] for s in samples], [s["baseline_response"] for s in samples]
    assert min(prefers_a(*args)) > 1  # in one order alone, it prefers A (the policy) clearly
    assert metrics["win_rate"] == 0.5 and metrics["win_rate_ci_low"] < 0.5 < metrics["win_rate_ci_high"]  # ties count half
    assert "reward_policy" not in metrics  # a pairwise judge gives no rewards
    assert metrics["length_policy"] > 0 and metrics["length_baseline"] > 0


def test_evaluate_kl_is_zero_when_policy_is_the_reference(tiny_sft_model, demo_table, run_stage):
    _, metrics = run_stage(
        {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "reference": "r", "max_new_tokens": 12,
         "judge": "demo_gold"},
        {"policy": tiny_sft_model, "baseline": tiny_sft_model, "reference": tiny_sft_model, "prompts": demo_table("eval_prompts", 30)},
    )
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["length_policy"] == metrics["length_baseline"] > 0
    assert metrics["reward_policy"] == metrics["reward_baseline"]


def test_evaluate_with_a_reward_model_judge(tiny_sft_model, tiny_demo_model, demo_table, run_stage):
    from tasks.models import batched_scores, load_reward_model

    rm_out, _ = run_stage({"kind": "reward_model", "model": "m", "data": "d", "epochs": 1, "lr": 1e-2, "batch_size": 32},
                          {"model": tiny_demo_model, "data": demo_table("preferences", 64)})
    out, metrics = run_stage(
        {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "judge_model": "rm", "max_new_tokens": 8},
        {"policy": tiny_sft_model, "baseline": tiny_demo_model, "prompts": demo_table("eval_prompts", 20), "judge_model": rm_out},
    )
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    model, tokenizer = load_reward_model(rm_out)
    expected = batched_scores(model, tokenizer, [s["prompt"] for s in samples], [s["policy_response"] for s in samples], 512, 8)
    assert [s["policy_reward"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert metrics["reward_policy"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


# ---- reward_accuracy ------------------------------------------------------------------------


def test_ranking_accuracy_and_wilson_interval_by_hand():
    from tasks.reward_accuracy import ranking_accuracy

    chosen = [3.0, 2.0, 1.0, 0.5, 4.0, 2.0, 0.0, 1.0]
    rejected = [1.0, 1.0, 0.0, 0.5, 3.0, 1.0, 1.0, 2.0]  # 5 right, 1 tie, 2 wrong
    result = ranking_accuracy(chosen, rejected)
    assert result["acc"] == pytest.approx(5.5 / 8)
    # Wilson: the bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n; worked out by hand for p_hat = 0.6875, n = 8.
    assert result["ci_low"] == pytest.approx(0.35575, abs=1e-5)
    assert result["ci_high"] == pytest.approx(0.89759, abs=1e-5)
    for bound in (result["ci_low"], result["ci_high"]):
        assert (0.6875 - bound) ** 2 == pytest.approx(1.959964**2 * bound * (1 - bound) / 8, rel=1e-5)


def test_reward_accuracy_params_need_one_reward():
    params = load_stage_kinds()["reward_accuracy"].params
    base = {"kind": "reward_accuracy", "id": "t"}
    for bad in ({}, {"dporm_policy": "p"}, {"exrm": "rm", "dporm_reference": "r"}, {"exrm": "rm", "beta": 0},
                {"exrm": "rm", "dporm_policy": "p", "dporm_reference": "r"}):  # both: two stages, one run each
        with pytest.raises(ValidationError):
            params.model_validate({**base, **bad})
    exrm = params.model_validate({**base, "exrm": "rm"})
    dporm = params.model_validate({**base, "dporm_policy": "p", "dporm_reference": "r"})
    assert exrm.run_tags() == {"alignflow.reward": "exrm"} and dporm.run_tags() == {"alignflow.reward": "dporm"}
    assert (exrm.reward_input, dporm.reward_input) == ("exrm", "dporm_policy")


def test_reward_accuracy_matches_its_per_pair_rewards(tiny_demo_model, tiny_sft_model, demo_table, run_stage):
    rm_out, _ = run_stage({"kind": "reward_model", "model": "m", "data": "d", "epochs": 1, "lr": 1e-2, "batch_size": 32},
                          {"model": tiny_demo_model, "data": demo_table("preferences", 64)})
    sets = {"id": demo_table("preferences_heldout", 40), "prompt_shift": demo_table("preferences_prompt_shift", 30),
            "response_shift": demo_table("preferences_response_shift", 20)}
    runs = {}
    for reward, params, inputs in (
            ("exrm", {"exrm": "rm"}, {"exrm": rm_out}),
            ("dporm", {"dporm_policy": "p", "dporm_reference": "r", "beta": 0.5},
             {"dporm_policy": tiny_sft_model, "dporm_reference": tiny_sft_model})):
        runs[reward] = run_stage({"kind": "reward_accuracy", "id": "a", "prompt_shift": "b", "response_shift": "c",
                                  **params}, {**sets, **inputs})
        assert set(ACCURACY_METRICS) <= set(runs[reward][1])  # the same names, whichever reward
    (out, metrics), (dporm_out, dporm_metrics) = runs["exrm"], runs["dporm"]
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    dporm_pairs = pq.read_table(dporm_out / "pairs.parquet").to_pylist()
    for name, folder in sets.items():
        mine = [r for r in pairs if r["set"] == name]
        assert [r["chosen"] for r in mine] == [r["chosen"] for r in rows(folder)]
        right = sum(1.0 if r["exrm_chosen"] > r["exrm_rejected"] else 0.5 if r["exrm_chosen"] == r["exrm_rejected"] else 0.0
                    for r in mine)
        assert metrics[f"acc_{name}"] == pytest.approx(right / len(mine))
        assert metrics[f"acc_{name}_ci_low"] <= metrics[f"acc_{name}"] <= metrics[f"acc_{name}_ci_high"]
        # policy == reference: DPORM is 0 for every response, every pair a tie
        assert all(r["dporm_chosen"] == r["dporm_rejected"] == 0 for r in dporm_pairs if r["set"] == name)
        assert dporm_metrics[f"acc_{name}"] == 0.5
    saved = json.loads((dporm_out / "metrics.json").read_text())
    assert saved["beta"] == 0.5 and saved["acc_id"] == dporm_metrics["acc_id"]


def test_dporm_ranks_its_pairs_better_after_dpo(tiny_sft_model, demo_table, run_stage):
    data = demo_table("preferences", 128)
    pairs, _ = run_stage({"kind": "ref_logps", "pairs": "t", "reference": "r"}, {"pairs": data, "reference": tiny_sft_model})
    policy, _ = run_stage({"kind": "dpo", "policy": "p", "pairs": "x", "beta": 0.1, "lr": 5e-3, "epochs": 3, "batch_size": 16},
                          {"policy": tiny_sft_model, "pairs": pairs})

    def accuracy(model):
        _, metrics = run_stage({"kind": "reward_accuracy", "id": "t", "dporm_policy": "p", "dporm_reference": "r"},
                               {"id": data, "dporm_policy": model, "dporm_reference": tiny_sft_model})
        return metrics["acc_id"]

    before, after = accuracy(tiny_sft_model), accuracy(policy)
    assert before == 0.5  # the policy is the reference: all ties
    print("DPORM accuracy on its training pairs before/after DPO:", before, after)
    assert after > 0.75, after


# ---- the shifted sets -----------------------------------------------------------------------


def test_shifted_preference_sets_differ_from_the_in_distribution_one(demo_table):
    sets = {name: rows(demo_table(split, 300)) for name, split in (
        ("id", "preferences_heldout"), ("prompt_shift", "preferences_prompt_shift"),
        ("response_shift", "preferences_response_shift"))}

    def topics(name):
        return {r["prompt"].split()[0] for r in sets[name]}

    def responses(name):
        return [r[side].split() for r in sets[name] for side in ("chosen", "rejected")]

    def noun_first(words):  # phrases in the other word order: a noun where an adjective belongs
        return any(w in demo_task._TOPIC_OF_NOUN for w in words[0::2])

    def mean(values):
        return sum(values) / len(values)

    assert topics("id") == topics("response_shift") == set(demo_task.TRAIN_TOPICS)
    assert topics("prompt_shift") == set(demo_task.HELDOUT_TOPICS)
    # prompt shift: responses drawn as in distribution
    assert abs(mean([len(w) for w in responses("prompt_shift")]) - mean([len(w) for w in responses("id")])) < 1
    assert not any(noun_first(w) for w in responses("prompt_shift"))
    # response shift: longer, fewer sentiment words, half the phrases in the other order
    assert mean([len(w) for w in responses("response_shift")]) > 1.5 * mean([len(w) for w in responses("id")])
    assert not any(noun_first(w) for w in responses("id"))
    assert mean([noun_first(w) for w in responses("response_shift")]) > 0.9

    def sentiment_share(name):
        words = [w for r in responses(name) for w in r]
        return mean([w in demo_task.POSITIVE or w in demo_task.NEGATIVE for w in words])

    assert sentiment_share("response_shift") < sentiment_share("id")
    for name, table in sets.items():  # every set is gold-labelled
        for r in table:
            assert r["chosen_reward"] == demo_task.gold_reward(r["prompt"], r["chosen"])
            assert r["rejected_reward"] == demo_task.gold_reward(r["prompt"], r["rejected"])
            assert r["margin"] >= 0.2


# ---- ref_logps ------------------------------------------------------------------------------


def test_ref_logps_equals_the_pairs_stage(tmp_path, tiny_sft_model, run_stage):
    scored = tmp_path / "scored"
    scored.mkdir()
    write_table({"prompt": ["animals cat :"] * 2 + ["food rice cake :"] * 2 + ["tools saw :"] * 2,
                 "response": ["good cat", "bad dog", "new bread great cake", "awful", "lovely saw", "ugly hammer ugly drill"],
                 "reward": [0.5, -0.5, 0.6, -1.0, 0.75, -0.8]}, scored)
    from_pairs, _ = run_stage({"kind": "pairs", "scored": "s", "reference": "r", "batch_size": 2},
                              {"scored": scored, "reference": tiny_sft_model})
    plain = tmp_path / "plain"
    plain.mkdir()
    write_table(read_table(from_pairs).select(["prompt", "chosen", "rejected", "margin"]), plain)
    out, metrics = run_stage({"kind": "ref_logps", "pairs": "t", "reference": "r", "batch_size": 4},
                             {"pairs": plain, "reference": tiny_sft_model})
    assert metrics["pairs"] == 3
    expected, got = read_table(from_pairs), read_table(out)
    assert got.column("margin").to_pylist() == expected.column("margin").to_pylist()  # other columns kept
    for column in ("ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens"):
        assert got.column(column).to_pylist() == pytest.approx(expected.column(column).to_pylist(), abs=1e-5), column


# ---- end to end -----------------------------------------------------------------------------


def small_exrm_vs_dporm(tmp_path, name="exrm-vs-dporm-small"):
    spec = yaml.safe_load((REPO / "pipelines" / "exrm_vs_dporm.yaml").read_text())
    spec["name"] = name
    spec["models"]["base"].update(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    for dataset in spec["datasets"].values():
        dataset["size"] = 48
    for stage in spec["stages"].values():
        if stage["kind"] in ("sft", "reward_model", "dpo"):
            stage["epochs"] = 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_small_exrm_vs_dporm_pipeline_logs_every_accuracy(tmp_path):
    home = tmp_path / "home"
    alignflow("run", small_exrm_vs_dporm(tmp_path), home=home, check=True, timeout=600)
    seeds = stage_runs(home, "exrm-vs-dporm-small")  # `seeds: 3`: the sweep's child runs, one per seed
    assert sorted(v.info.run_name for v in seeds) == ["seed=0", "seed=1", "seed=2"]
    for seed, variant in enumerate(sorted(seeds, key=lambda v: v.info.run_name)):
        runs = {r.data.tags["alignflow.stage"]: r for r in stage_runs(home, "exrm-vs-dporm-small", variant.info.run_id)}
        for reward in ("exrm", "dporm"):  # one run each, the same names: MLflow's Compare lines them up
            run = runs[f"{reward}_acc"]
            assert run.info.run_name == f"{reward.upper()} · seed {seed}"  # the seed of its exrm / dpo
            assert run.data.tags["alignflow.reward"] == run.data.params["reward"] == reward
            assert sorted(m for m in run.data.metrics if not m.startswith("n_")) == sorted(ACCURACY_METRICS)
            assert all(0 <= run.data.metrics[m] <= 1 for m in ACCURACY_METRICS)
        assert {"win_rate", "kl", "length_policy", "reward_policy"} <= set(runs["evaluate"].data.metrics)
