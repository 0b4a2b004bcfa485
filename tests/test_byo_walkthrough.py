"""Issue 11's "done when", at tiny sizes through the real CLI: a spec a user writes with their own
policy folder, their own prompt column, their own reward module beside the spec and a pretrained
reward model with another tokenizer runs 2 rounds of iterative DPO (LoRA) to a win rate; editing
the reward function makes score stale and leaves generate fresh; the trained model exports to a
folder from_pretrained loads; a bad reward path exits 2 naming the field, with nothing written."""
from __future__ import annotations

import json

import pytest
import yaml

from byo_tiny import reward_model_folder
from conftest import TINY_MODEL, alignflow, run_stage_in, stage_runs

REWARD = '''
def concise_and_kind(prompt, response):
    """My reward: kind words count, every word costs a little."""
    words = response.split()
    return sum(w in ("good", "great", "tasty") for w in words) - 0.1 * len(words)
'''


def user_spec(folder):
    return {
        "name": "my-iterative-dpo",
        "store": str(folder / "store"),
        "models": {
            "base": {"kind": "pretrained", "path": "my_policy"},
            "judge": {"kind": "pretrained_reward_model", "path": "my_reward_model", "dtype": "float32"},
        },
        "datasets": {
            "questions": {"kind": "jsonl", "path": "questions.jsonl", "columns": {"prompt": "question"}},
        },
        "stages": {
            "generate": {"kind": "generate", "policy": "policy", "prompts": "questions", "n": 4, "max_new_tokens": 8},
            "score": {"kind": "score", "candidates": "generate", "reward_fn": "myreward:concise_and_kind"},
            "pairs": {"kind": "pairs", "scored": "score", "reference": "reference"},
            "dpo": {"kind": "dpo", "policy": "policy", "pairs": "pairs", "lr": 5e-2, "batch_size": 4, "epochs": 4,
                    "micro_batch_size": 2, "lr_scheduler": "cosine", "lora": {"r": 4, "alpha": 8}},
            "evaluate": {"kind": "evaluate", "policy": "dpo", "baseline": "base", "prompts": "questions",
                         "judge_model": "judge", "max_new_tokens": 8},
        },
        "rounds": {"count": 2, "repeat": ["generate", "score", "pairs", "dpo", "evaluate"],
                   "policy": {"start": "base", "next": "dpo"}},
    }


@pytest.fixture(scope="module")
def user(tmp_path_factory, demo_table):
    from tasks.tables import read_table

    folder = tmp_path_factory.mktemp("my_project")
    run_stage_in(folder / "my_policy", TINY_MODEL)  # someone's causal LM: a folder from_pretrained loads
    reward_model_folder(folder / "my_reward_model")  # someone's reward model, with a BPE tokenizer
    prompts = read_table(demo_table("eval_prompts", 16), ["prompt"]).column("prompt").to_pylist()
    (folder / "questions.jsonl").write_text("".join(json.dumps({"question": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    (folder / "myreward.py").write_text(REWARD)
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(user_spec(folder), sort_keys=False))
    home = folder / "home"
    return {"folder": folder, "spec": spec, "home": home, "run": alignflow("run", spec, home=home)}


def plan(user) -> dict:
    out = alignflow("plan", user["spec"], "--json", home=user["home"], check=True)
    return {(r["stage"], r["round"]): r for r in map(json.loads, out.stdout.splitlines())}


def test_the_users_spec_runs_two_rounds_to_a_win_rate(user):
    assert user["run"].returncode == 0, user["run"].stderr[-3000:]
    runs = stage_runs(user["home"], "my-iterative-dpo")
    evaluations = {r.data.tags["alignflow.round"]: r.data.metrics for r in runs if r.data.tags["alignflow.stage"] == "evaluate"}
    assert set(evaluations) == {"1", "2"}
    for metrics in evaluations.values():
        assert 0 <= metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"] <= 1
        assert metrics["reward_policy"] != metrics["reward_baseline"]  # the judge scored two different models


def test_editing_the_reward_function_makes_score_stale_and_leaves_generate_fresh(user):
    assert user["run"].returncode == 0
    module = user["folder"] / "myreward.py"
    before = module.read_text()
    try:
        module.write_text("# a comment changes nothing\n" + before)
        assert {row["status"] for row in plan(user).values()} == {"fresh"}
        module.write_text(before.replace("0.1 * len(words)", "0.2 * len(words)"))
        rows = plan(user)
        assert rows["generate", 1]["status"] == "fresh" and rows["base", 0]["status"] == "fresh"
        assert rows["score", 1]["status"] == "stale" and rows["score", 1]["reason"] == "code changed: myreward.py"
        assert {rows[s, 1]["status"] for s in ("pairs", "dpo", "evaluate")} == {"stale"}
        # the changed round-1 policy changes round 2's samples
        assert rows["generate", 2]["status"] == "stale"
        # round 2's dpo has no artifact for its new key: nothing to export
        refused = alignflow("export", user["spec"], "dpo", user["folder"] / "nothing", home=user["home"])
        assert refused.returncode == 2 and "no finished artifact" in refused.stdout + refused.stderr
        assert not (user["folder"] / "nothing").exists()
    finally:
        module.write_text(before)


def test_the_trained_model_exports_to_a_folder_from_pretrained_loads(user, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    assert user["run"].returncode == 0
    out = tmp_path / "my_aligned_model"
    alignflow("export", user["spec"], "dpo", out, "--round", "2", home=user["home"], check=True)
    assert not list(out.glob("adapter*"))  # LoRA merged: a plain model
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("food the", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    # the same weights as the artifact the pipeline evaluated
    from flows.export import EXPORT_INFO
    from tasks.models import load_causal_lm

    artifact = json.loads((out / EXPORT_INFO).read_text())["artifact"]
    reference, _ = load_causal_lm(artifact, device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)

    again = alignflow("export", user["spec"], "dpo", out, home=user["home"])
    assert again.returncode == 2 and "--overwrite" in again.stdout + again.stderr
    alignflow("export", user["spec"], "judge", tmp_path / "judge", home=user["home"], check=True)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "judge").config.num_labels == 1
    wrong = alignflow("export", user["spec"], "score", tmp_path / "table", home=user["home"])
    assert wrong.returncode == 2 and "outputs a table" in wrong.stdout + wrong.stderr


def test_a_bad_reward_path_exits_2_naming_the_field_and_writes_nothing(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(user_spec(folder)))  # its model folders do not even exist: never reached
    home = tmp_path / "home"
    result = alignflow("run", spec, "--set", "stages.score.reward_fn=myreward:concise_and_kind", home=home)
    assert result.returncode == 2
    said = result.stdout + result.stderr
    assert "stages.score.reward_fn" in said and "module 'myreward' does not import" in said
    assert not (folder / "store").exists() and not home.exists()
