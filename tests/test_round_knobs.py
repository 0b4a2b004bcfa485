"""The settings iterative DPO's users study, each a spec setting in the stage keys:
rounds.reference (fixed | previous | {mix: tau}), rounds.data (fresh | cumulative | {replay: f}),
pairs' best_vs_median, and evaluate's baseline: previous and proxy reward, with the per-round
signals the parent run logs."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import DEMO_SPEC, alignflow, small_demo, stage_runs
from flows.errors import SpecError
from flows.keys import resolve
from flows.spec import load_spec
from tasks.mix_models import mix_state
from tasks.pairs import build_pairs
from tasks.round_data import pick_rows


def nodes_of(*overrides, rounds=3):
    return {n.id: n for n in resolve(load_spec(DEMO_SPEC, list(overrides), rounds))}


def test_mixed_reference_chains_from_round_to_round():
    nodes = nodes_of("rounds.reference={mix: 0.25}")
    assert nodes["pairs@1"].inputs["reference"] == "sft"
    assert nodes["reference_mix@2"].inputs == {"first": "sft", "second": "dpo@1"}
    assert nodes["reference_mix@3"].inputs == {"first": "reference_mix@2", "second": "dpo@2"}
    assert nodes["pairs@3"].inputs["reference"] == "reference_mix@3"
    assert nodes["reference_mix@2"].params.weight == 0.25
    assert "reference_mix@1" not in nodes
    # In the key: another tau is another reference, and so other pairs from round 2 on
    other = nodes_of("rounds.reference={mix: 0.5}")
    assert other["pairs@1"].key == nodes["pairs@1"].key
    assert other["pairs@2"].key != nodes["pairs@2"].key


def test_cumulative_and_replay_data_join_earlier_rounds():
    fresh = nodes_of()
    cumulative = nodes_of("rounds.data=cumulative")
    assert cumulative["dpo@1"].inputs["pairs"] == "pairs@1"  # round 1 has nothing earlier
    assert cumulative["dpo@3"].inputs["pairs"] == "pairs_rounds@3"
    joined = cumulative["pairs_rounds@3"]
    assert joined.inputs == {"current": "pairs@3", "round_1": "pairs@1", "round_2": "pairs@2"}  # reference fixed
    assert joined.params.fraction == 1.0
    assert cumulative["pairs@2"].key == fresh["pairs@2"].key  # upstream of the change: the same
    assert cumulative["dpo@2"].key != fresh["dpo@2"].key
    replay = nodes_of("rounds.data={replay: 0.25}", "rounds.reference=previous")
    assert replay["pairs_rounds@2"].params.fraction == 0.25
    # a moving reference: the earlier rows' reference log-probs are computed again under round r's
    assert replay["pairs_rounds@3"].inputs["reference"] == "dpo@2"
    assert replay["pairs_rounds@3"].params.max_length == replay["pairs@3"].params.max_length


@pytest.mark.parametrize("overrides, field, words", [
    (["rounds.reference={mix: 0}"], "rounds.reference", "greater than 0"),
    (["rounds.data={replay: 1.5}"], "rounds.data", "less than or equal to 1"),
    (["rounds.data=sometimes"], "rounds.data", "cumulative"),
    (["rounds.data=cumulative", "rounds.repeat=[generate, score, evaluate]"], "rounds.data", "reads no table"),
])
def test_bad_round_settings_name_the_field(overrides, field, words):
    with pytest.raises(SpecError) as err:
        load_spec(DEMO_SPEC, overrides)
    problems = [p for p in err.value.problems if p.path.startswith(field)]
    assert problems and any(words in p.message for p in problems), err.value.problems


def test_generated_names_are_reserved(tmp_path):
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    spec["datasets"]["pairs_rounds"] = spec["datasets"]["eval_prompts"]
    spec["rounds"]["data"] = "cumulative"
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert any("reserved" in p.message and "pairs_rounds" in p.path for p in err.value.problems)
    with pytest.raises(SpecError):
        load_spec(DEMO_SPEC, ["stages.evaluate.baseline=previous", "rounds.repeat=[generate, score, pairs, dpo]"])


def test_mix_state_is_the_weighted_average_in_the_first_dtype():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 6.0], dtype=torch.bfloat16), "ids": torch.tensor([0, 1])}
    mixed = mix_state(a, b, 0.25)
    assert mixed["w"].dtype == torch.bfloat16
    assert mixed["w"].tolist() == [1.5, 3.0]
    assert mixed["ids"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="w: shape"):
        mix_state(a, {**b, "w": torch.zeros(3)}, 0.5)
    with pytest.raises(KeyError):
        mix_state(a, {**b, "extra": torch.zeros(1)}, 0.5)


def test_best_vs_median_pairs_the_best_with_the_middle_candidate():
    rewards = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]  # ranked: 1 (0.9), 4, 2, 3 (0.3), 5, 0
    pairs, _ = build_pairs([0] * 6, rewards, "best_vs_median")
    assert pairs == [(1, 3)]
    assert build_pairs([0, 0], [0.2, 0.4], "best_vs_median")[0] == [(1, 0)]


def test_replay_picks_a_seeded_fraction():
    picked = pick_rows(100, 0.25, seed=3)
    assert len(picked) == 25 and picked == sorted(set(picked)) and picked == pick_rows(100, 0.25, seed=3)
    assert picked != pick_rows(100, 0.25, seed=4)
    assert pick_rows(7, 1.0, seed=0) == list(range(7))


def test_round_data_recomputes_earlier_reference_logps_as_the_pairs_stage_does(run_stage, tiny_demo_model, demo_table):
    """Earlier rounds' rows under a moved reference get the log-probs `ref_logps` (the independent
    stage the pairs table's columns come from) gives them under that reference."""
    import pyarrow.parquet as pq

    def pairs_table(seed):
        candidates = demo_table("prompts", 4, seed)
        gen, _ = run_stage({"kind": "generate", "policy": "m", "prompts": "p", "n": 3, "max_new_tokens": 4},
                           {"policy": tiny_demo_model, "prompts": candidates}, seed=seed)
        scored, _ = run_stage({"kind": "score", "candidates": "g", "reward_fn": "demo_gold"}, {"candidates": gen})
        out, _ = run_stage({"kind": "pairs", "scored": "s", "reference": "r"},
                           {"scored": scored, "reference": tiny_demo_model}, seed=seed)
        return out

    other_reference, _ = run_stage({"kind": "tiny", "task": "demo", "hidden_size": 16, "num_layers": 1,
                                    "num_heads": 2, "intermediate_size": 32}, seed=7)
    first, second = pairs_table(1), pairs_table(2)
    joined, metrics = run_stage({"kind": "round_data", "current": "c", "reference": "r"},
                                {"current": second, "round_1": first, "reference": other_reference})
    rows = pq.read_table(joined / "data.parquet").to_pydict()
    earlier = pq.read_table(first / "data.parquet").num_rows
    current = pq.read_table(second / "data.parquet").to_pydict()
    assert metrics["rows_earlier"] == earlier and metrics["rows"] == earlier + len(current["prompt"])
    assert rows["ref_chosen_logp"][earlier:] == current["ref_chosen_logp"]  # this round's: as computed
    expected, _ = run_stage({"kind": "ref_logps", "pairs": "p", "reference": "r"},
                            {"pairs": first, "reference": other_reference})
    want = pq.read_table(expected / "data.parquet").to_pydict()
    assert rows["ref_chosen_logp"][:earlier] == pytest.approx(want["ref_chosen_logp"], abs=1e-5)
    assert rows["ref_rejected_logp"][:earlier] == pytest.approx(want["ref_rejected_logp"], abs=1e-5)
    assert pq.read_table(first / "data.parquet").to_pydict()["ref_chosen_logp"] != pytest.approx(
        want["ref_chosen_logp"], abs=1e-5)  # the reference really moved


def test_round_knobs_run_end_to_end_with_per_round_signals(tmp_path):
    """Two rounds with a mixed reference, cumulative data, an evaluation against the previous
    round and a proxy reward: the parent run draws each signal by round."""
    from mlflow.tracking import MlflowClient

    path = small_demo(tmp_path, rounds=2, name="knobs")
    spec = yaml.safe_load(path.read_text())
    spec["rounds"].update(reference={"mix": 0.5}, data="cumulative")
    spec["stages"]["evaluate"].update(reference="reference", proxy_model="reward_model")
    spec["stages"]["evaluate_previous"] = {**spec["stages"]["evaluate"], "baseline": "previous"}
    spec["rounds"]["repeat"].append("evaluate_previous")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / "home"
    alignflow("run", path, home=home, check=True)
    runs = stage_runs(home, "knobs")
    stages = {(r.data.tags["alignflow.stage"], r.data.tags["alignflow.round"]) for r in runs}
    assert {("reference_mix", "2"), ("pairs_rounds", "2"), ("evaluate_previous", "2")} <= stages
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])

    def by_round(name):
        return {m.step: m.value for m in client.get_metric_history(parent.info.run_id, name)}

    for name in ("win_rate", "win_rate_ci_low", "win_rate_vs_previous", "proxy_reward_policy", "length_policy", "kl"):
        assert set(by_round(name)) == {1, 2}, name
    # round 1's previous policy is the start, the fixed baseline: the same comparison, the same number
    assert by_round("win_rate_vs_previous")[1] == by_round("win_rate")[1]
    evaluate = {r.data.tags["alignflow.round"]: r for r in runs if r.data.tags["alignflow.stage"] == "evaluate"}
    # the parent's headline is rounded to 4 decimals (MLflow's runs list shows every digit)
    assert by_round("proxy_reward_policy")[2] == pytest.approx(evaluate["2"].data.metrics["proxy_reward_policy"], abs=1e-4)
