"""Each stage kind's function on tiny inputs: no Prefect, no MLflow."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from tasks import demo_task, load_stage_kinds
from tasks.base import BadInput
from tasks.models import load_causal_lm
from tasks.tables import read_table, write_table

SCORE = load_stage_kinds()["score"].params


def rows(folder):
    return read_table(folder).to_pylist()


def independent_response_logp(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """log p(response + eos | bos + prompt), one token at a time from the full-sequence logits."""
    prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = sum(logprobs[len(prompt_ids) + j - 1, token].item() for j, token in enumerate(response_ids))
    return total, len(response_ids)


# ---- import cost ----------------------------------------------------------------------------


def test_stage_modules_do_not_import_heavy_libraries():
    code = (
        "import sys, tasks; tasks.load_stage_kinds(); "
        "print([m for m in ('torch','transformers','datasets','accelerate','numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- sources --------------------------------------------------------------------------------


def test_tiny_source_builds_model_and_tokenizer_that_round_trip(tiny_demo_model):
    model, tokenizer = load_causal_lm(tiny_demo_model, device="cpu")
    assert model.config.hidden_size == 16
    assert model.config.vocab_size == len(tokenizer) == len(demo_task.vocabulary()) + 4
    assert None not in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    text = "animals cat dog : lovely cat awful hammer"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split())
    assert tokenizer.decode(ids) == text
    assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), len(tokenizer))


def test_pretrained_source_loads_a_local_model(tiny_demo_model, run_stage):
    params = {"kind": "pretrained", "path": str(tiny_demo_model)}
    assert load_stage_kinds()["pretrained"].params.model_validate(params).source_files() == [tiny_demo_model]
    out, metrics = run_stage(params)
    original, _ = load_causal_lm(tiny_demo_model, device="cpu")
    copy, tokenizer = load_causal_lm(out, device="cpu")
    assert metrics["parameters"] == sum(p.numel() for p in original.parameters())
    for a, b in zip(original.state_dict().values(), copy.state_dict().values()):
        assert torch.equal(a, b)
    assert tokenizer.pad_token_id is not None


def test_synthetic_splits_are_seeded_and_eval_prompts_are_held_out(run_stage, demo_table):
    _, metrics = run_stage({"kind": "synthetic", "split": "prompts", "size": 300})
    again, _ = run_stage({"kind": "synthetic", "split": "prompts", "size": 300})
    other_seed, _ = run_stage({"kind": "synthetic", "split": "prompts", "size": 300}, seed=1)
    assert rows(again) == rows(demo_table("prompts", 300))
    assert rows(other_seed) != rows(again)
    train = {r["prompt"] for r in rows(demo_table("prompts", 300))}
    evaluation = {r["prompt"] for r in rows(demo_table("eval_prompts", 300))}
    assert len(evaluation) == 300 and not train & evaluation
    for split in ("sft", "preferences"):  # training splits draw from the training prompts only
        assert not {r["prompt"] for r in rows(demo_table(split, 200))} & set(demo_task.all_prompts(demo_task.TRAIN_TOPICS, heldout=True))
    prefs = rows(demo_table("preferences", 200))
    assert all(r["margin"] >= 0.2 and r["chosen_reward"] > r["rejected_reward"] for r in prefs)
    assert all(demo_task.gold_reward(r["prompt"], r["chosen"]) == r["chosen_reward"] for r in prefs)


def test_gold_reward_is_graded():
    prompt = "animals cat dog :"
    assert demo_task.gold_reward(prompt, "good cat great dog") == pytest.approx(0.75)
    assert demo_task.gold_reward(prompt, "bad hammer awful saw") == pytest.approx(-0.75)
    assert demo_task.gold_reward(prompt, "good cat bad dog") == pytest.approx(0.25)
    assert demo_task.gold_reward(prompt, "") == -1.0


def test_jsonl_source_reads_rows(tmp_path, run_stage):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "extra": 1}\n\n{"prompt": "c", "response": "d", "extra": 2}\n')
    out, metrics = run_stage({"kind": "jsonl", "path": str(path), "columns": ["prompt", "response"]})
    assert metrics["rows"] == 2
    assert rows(out) == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]


def test_jsonl_source_names_file_line_and_missing_column(tmp_path, run_stage):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e"}\n')
    with pytest.raises(BadInput, match=r"prefs\.jsonl: line 2: a value for 'rejected'"):
        run_stage({"kind": "jsonl", "path": str(path)})
    with pytest.raises(BadInput, match=r"prefs\.jsonl: line 1: a value for 'response'"):
        run_stage({"kind": "jsonl", "path": str(path), "columns": ["prompt", "response"]})
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(BadInput, match=r"prefs\.jsonl: line 2: a JSON object"):
        run_stage({"kind": "jsonl", "path": str(path)})


def test_parquet_source_checks_columns(tmp_path, run_stage):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["c", None]}), path)
    out, _ = run_stage({"kind": "parquet", "path": str(path), "columns": ["prompt"]})
    assert rows(out) == [{"prompt": "a"}, {"prompt": "b"}]
    with pytest.raises(BadInput, match=r"data\.parquet: chosen: a column 'chosen'"):
        run_stage({"kind": "parquet", "path": str(path), "columns": ["prompt", "chosen"]})
    with pytest.raises(BadInput, match=r"data\.parquet: row 2: a value in column 'response'"):
        run_stage({"kind": "parquet", "path": str(path), "columns": ["response"]})


# ---- generate / score / pairs ---------------------------------------------------------------


def test_generate_is_reproducible_with_n_candidates_per_prompt(tiny_sft_model, demo_table, run_stage):
    params = {"kind": "generate", "policy": "p", "prompts": "x", "n": 3, "max_new_tokens": 12, "batch_size": 4}
    inputs = {"policy": tiny_sft_model, "prompts": demo_table("prompts", 10)}
    first, metrics = run_stage(params, inputs, seed=7)
    second, _ = run_stage(params, inputs, seed=7)
    third, _ = run_stage(params, inputs, seed=8)
    table = rows(first)
    assert table == rows(second)
    assert table != rows(third)
    assert len(table) == 30 and metrics["responses"] == 30
    assert set(table[0]) == {"prompt_id", "prompt", "sample", "response"}
    for prompt_id in range(10):
        assert sorted(r["sample"] for r in table if r["prompt_id"] == prompt_id) == [0, 1, 2]
    # the SFT policy has learnt the demo's response words (no prompt echo, no specials)
    words = " ".join(r["response"] for r in table).split()
    assert "<eos>" not in words and ":" not in words


def test_generate_greedy_gives_identical_candidates(tiny_sft_model, demo_table, run_stage):
    params = {"kind": "generate", "policy": "p", "prompts": "x", "n": 2, "temperature": 0, "max_new_tokens": 8}
    out, _ = run_stage(params, {"policy": tiny_sft_model, "prompts": demo_table("prompts", 4)})
    table = rows(out)
    assert [r["response"] for r in table[0::2]] == [r["response"] for r in table[1::2]]


def scored_candidates(tmp_path, rewards_by_prompt: dict[str, list[float]]):
    folder = tmp_path / "scored"
    folder.mkdir()
    data = {"prompt_id": [], "prompt": [], "sample": [], "response": [], "reward": []}
    words = ["good cat", "bad dog", "new saw", "lovely tiger"]
    for prompt_id, (prompt, rewards) in enumerate(rewards_by_prompt.items()):
        for sample, reward in enumerate(rewards):
            for key, value in zip(data, (prompt_id, prompt, sample, words[sample], reward)):
                data[key].append(value)
    write_table(data, folder)
    return folder


def test_score_with_reward_fn(tmp_path, run_stage):
    candidates = scored_candidates(tmp_path, {"animals cat :": [0.0, 0.0], "food rice :": [0.0, 0.0]})
    out, metrics = run_stage({"kind": "score", "candidates": "c", "reward_fn": "demo_gold"}, {"candidates": candidates})
    table = rows(out)
    assert [r["reward"] for r in table] == pytest.approx([demo_task.gold_reward(r["prompt"], r["response"]) for r in table])
    assert table[0]["reward"] == pytest.approx(0.75)  # the old reward column is replaced
    assert set(table[0]) == {"prompt_id", "prompt", "sample", "response", "reward"}


def test_score_with_reward_model(tmp_path, tiny_demo_model, run_stage):
    rm_dir, _ = run_stage(
        {"kind": "reward_model", "model": "m", "data": "d", "epochs": 0.1, "batch_size": 4},
        {"model": tiny_demo_model, "data": _prefs_table(tmp_path)},
    )
    candidates = scored_candidates(tmp_path, {"animals cat :": [0, 0, 0], "food rice :": [0, 0, 0]})
    out, _ = run_stage({"kind": "score", "candidates": "c", "reward_model": "rm", "batch_size": 4}, {"candidates": candidates, "reward_model": rm_dir})
    rewards = [r["reward"] for r in rows(out)]
    assert len(rewards) == 6 and len(set(rewards)) > 1  # a learned score per (prompt, response)


def _prefs_table(tmp_path):
    folder = tmp_path / "prefs"
    if not folder.exists():
        folder.mkdir()
        write_table({"prompt": ["animals cat :"] * 4, "chosen": ["good cat"] * 4, "rejected": ["bad saw"] * 4}, folder)
    return folder


def test_score_needs_exactly_one_scorer():
    with pytest.raises(ValidationError, match="exactly one of reward_model"):
        SCORE.model_validate({"kind": "score", "candidates": "c"})
    with pytest.raises(ValidationError, match="exactly one of reward_model"):
        SCORE.model_validate({"kind": "score", "candidates": "c", "reward_model": "rm", "reward_fn": "demo_gold"})
    with pytest.raises(ValidationError, match="unknown reward function 'gold'; known: arithmetic, brevity, demo_gold"):
        SCORE.model_validate({"kind": "score", "candidates": "c", "reward_fn": "gold"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        SCORE.model_validate({"kind": "score", "candidates": "c", "reward_fn": "demo_gold", "rewardfn": "x"})


def test_pairs_best_vs_worst_drops_and_counts(tmp_path, run_stage):
    scored = scored_candidates(tmp_path, {
        "animals cat :": [0.5, -0.2, 0.1],  # pair: sample 0 over sample 1, margin 0.7
        "food rice :": [0.3, 0.3, 0.3],  # a tie
        "tools saw :": [0.1, 0.05],  # margin 0.05 < min_margin
        "music drum :": [-0.5, 0.4, 0.4, -0.1],  # pair: sample 1 over sample 0, margin 0.9
        "places city :": [1.0],  # one candidate: no pair at all
    })
    out, metrics = run_stage({"kind": "pairs", "scored": "s", "min_margin": 0.1}, {"scored": scored})
    assert metrics == pytest.approx({"pairs": 2, "dropped_single": 1, "dropped_ties": 1, "dropped_min_margin": 1,
                                     "dropped_max_pairs": 0, "mean_margin": 0.8})
    table = rows(out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in table] == [
        ("animals cat :", "good cat", "bad dog"),
        ("music drum :", "bad dog", "good cat"),
    ]
    assert [r["margin"] for r in table] == pytest.approx([0.7, 0.9])
    assert "ref_chosen_logp" not in table[0]


def test_pairs_reference_logps_match_an_independent_computation(tmp_path, tiny_sft_model, run_stage):
    scored = scored_candidates(tmp_path, {"animals cat :": [0.5, -0.2, 0.1, 0.0], "food rice cake :": [0.0, 0.2, 0.1, 0.3]})
    out, _ = run_stage({"kind": "pairs", "scored": "s", "reference": "r", "batch_size": 1}, {"scored": scored, "reference": tiny_sft_model})
    model, tokenizer = load_causal_lm(tiny_sft_model, device="cpu")
    for row in rows(out):
        for side in ("chosen", "rejected"):
            logp, n_tokens = independent_response_logp(model, tokenizer, row["prompt"], row[side])
            assert row[f"ref_{side}_logp"] == pytest.approx(logp, abs=1e-4)
            assert row[f"{side}_tokens"] == n_tokens


# ---- training -------------------------------------------------------------------------------


def mean_sft_nll(model_dir, data_dir) -> float:
    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    total = count = 0.0
    for r in rows(data_dir)[:100]:
        logp, n = independent_response_logp(model, tokenizer, r["prompt"], r["response"])
        total, count = total - logp, count + n
    return total / count


def test_sft_lowers_the_loss_on_its_data(tiny_demo_model, tiny_sft_model, demo_table, run_stage):
    data = demo_table("sft", 800)
    before, after = mean_sft_nll(tiny_demo_model, data), mean_sft_nll(tiny_sft_model, data)
    assert after < before - 0.5, (before, after)
    # and the stage logs a loss per step
    log = []
    run_stage({"kind": "sft", "model": "m", "data": "d", "epochs": 1, "batch_size": 200}, {"model": tiny_demo_model, "data": data}, log=log)
    assert [step for step, _ in log] == [1, 2, 3, 4] and all("loss" in m for _, m in log)


def test_reward_model_beats_chance_on_held_out_demo_pairs(tiny_demo_model, demo_table, run_stage):
    out, metrics = run_stage(
        {"kind": "reward_model", "model": "m", "data": "d", "eval_data": "e", "epochs": 2, "lr": 1e-2, "batch_size": 32},
        {"model": tiny_demo_model, "data": demo_table("preferences", 1000), "eval_data": demo_table("preferences_heldout", 300)},
    )
    assert metrics["eval_accuracy"] > 0.65, metrics
    assert {"loss", "eval_accuracy", "eval_loss"} <= set(metrics)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.pad_token_id is not None
    assert "ForSequenceClassification" in config.architectures[0]


def _policy_margins(policy_dir, pairs_dir) -> list[float]:
    """(pc - pr) - (rc - rr) for each pair, computed independently of the dpo stage."""
    model, tokenizer = load_causal_lm(policy_dir, device="cpu")
    margins = []
    for r in rows(pairs_dir):
        pc, _ = independent_response_logp(model, tokenizer, r["prompt"], r["chosen"])
        pr, _ = independent_response_logp(model, tokenizer, r["prompt"], r["rejected"])
        margins.append((pc - pr) - (r["ref_chosen_logp"] - r["ref_rejected_logp"]))
    return margins


@pytest.fixture(scope="module")
def demo_pairs_with_reference(tmp_path_factory, tiny_sft_model, demo_table):
    """Gold-labelled demo pairs with the SFT model's reference log-probs (through generate/score/pairs)."""
    from conftest import run_stage_in

    root = tmp_path_factory.mktemp("dpo")
    run_stage_in(root / "cands", {"kind": "generate", "policy": "p", "prompts": "x", "n": 4, "max_new_tokens": 12},
                 {"policy": tiny_sft_model, "prompts": demo_table("prompts", 64)})
    run_stage_in(root / "scored", {"kind": "score", "candidates": "c", "reward_fn": "demo_gold"}, {"candidates": root / "cands"})
    run_stage_in(root / "pairs", {"kind": "pairs", "scored": "s", "reference": "r"}, {"scored": root / "scored", "reference": tiny_sft_model})
    return root / "pairs"


def test_dpo_increases_the_policy_margin_on_its_pairs(tiny_sft_model, demo_pairs_with_reference, run_stage):
    before = _policy_margins(tiny_sft_model, demo_pairs_with_reference)
    assert max(abs(m) for m in before) < 1e-3  # the policy starts as the reference
    log = []
    out, metrics = run_stage(
        {"kind": "dpo", "policy": "p", "pairs": "x", "beta": 0.1, "lr": 5e-3, "epochs": 3, "batch_size": 16},
        {"policy": tiny_sft_model, "pairs": demo_pairs_with_reference}, log=log,
    )
    after = _policy_margins(out, demo_pairs_with_reference)
    assert sum(after) / len(after) > 1.0, after
    assert sum(m > 0 for m in after) / len(after) > 0.8
    trl_names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert trl_names <= set(log[0][1]) and trl_names <= set(metrics)
    assert log[-1][1]["loss"] < log[0][1]["loss"]


def test_dpo_params_are_checked():
    params = load_stage_kinds()["dpo"].params
    for bad in ({"beta": 0}, {"label_smoothing": 0.5}, {"sft_weight": -1}, {"loss": "ipo", "label_smoothing": 0.1}):
        with pytest.raises(ValidationError):
            params.model_validate({"kind": "dpo", "policy": "p", "pairs": "x", **bad})


# ---- evaluate -------------------------------------------------------------------------------


def test_evaluate_policy_against_itself_is_a_coin_flip(tiny_sft_model, demo_table, run_stage):
    out, metrics = run_stage(
        {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "judge": "demo_gold", "max_new_tokens": 12},
        {"policy": tiny_sft_model, "baseline": tiny_sft_model, "prompts": demo_table("eval_prompts", 50)},
    )
    assert metrics["win_rate_ci_low"] <= 0.5 <= metrics["win_rate_ci_high"]
    assert metrics["win_rate"] == pytest.approx(0.5)
    assert metrics["n"] == 50 and metrics["reward_policy"] == pytest.approx(metrics["reward_baseline"])
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    samples = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(samples) == 50 and {"policy_response", "baseline_response", "outcome"} <= set(samples[0])


def test_win_rate_interval():
    from tasks.evaluate import win_rate

    result = win_rate([1, 1, 0, 0.5], [0, 0, 1, 0.5])  # win, win, loss, tie
    assert result["win_rate"] == pytest.approx(0.625)
    assert result["outcomes"] == [1.0, 1.0, 0.0, 0.5]
    # Wilson, the tie counted half: the bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n, p_hat = 2.5 / 4
    for bound in (result["win_rate_ci_low"], result["win_rate_ci_high"]):
        assert (0.625 - bound) ** 2 == pytest.approx(1.959964**2 * bound * (1 - bound) / 4, rel=1e-5)
    assert 0 < result["win_rate_ci_low"] < 0.625 < result["win_rate_ci_high"] < 1
