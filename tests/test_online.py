"""The online RL stages (rloo, grpo, ppo): the policy's reward really rises, the rollout's
log-probs are the model's, an interrupted run resumes to the same result, and LoRA keeps one copy
of each model. The formulas themselves: tests/test_online_losses.py."""
from __future__ import annotations

import pytest
import torch

from conftest import run_stage_in
from tasks.logps import sequence_logps
from tasks.models import collate, load_causal_lm, load_reward_model
from tasks.train import LoraParams
from tasks.train.loop import latest_checkpoint

ALGORITHMS = ["rloo", "grpo", "ppo"]


def online_params(kind: str, **extra) -> dict:
    return {"kind": kind, "policy": "sft", "prompts": "p", "reward_fn": "demo_gold", "epochs": 4, "batch_size": 16,
            "max_new_tokens": 12, "lr": 1e-3, **extra}


@pytest.fixture(scope="module")
def prompts(demo_table):
    return demo_table("prompts", 64)


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_online_training_raises_the_reward(kind, tiny_sft_model, prompts, run_stage):
    log = []
    out, metrics = run_stage(online_params(kind), {"policy": tiny_sft_model, "prompts": prompts}, log=log)
    rows = [m for _, m in log]
    assert [s for s, _ in log] == list(range(1, 17))
    first, last = mean(rows[:4], "reward"), mean(rows[-4:], "reward")
    print(f"{kind}: reward {first:.3f} -> {last:.3f}, kl {rows[-1]['kl']:.3f}")
    assert last > first + 0.05
    for name in ("reward", "kl", "entropy", "clip_fraction", "response_length", "loss", "learning_rate"):
        assert name in rows[0] and name in metrics
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-4)  # the first rollout's policy is the reference
    if kind == "ppo":
        assert "value_loss" in rows[0]
    # The saved policy is the trained one: its samples score better than the SFT policy's.
    assert (out / "config.json").exists()


def test_rollout_logps_are_the_models_log_probs(tiny_sft_model, prompts):
    """The rollout layout (left-padded prompts, responses cut after eos, position ids) gives each
    response the log-prob the plain right-padded computation gives it."""
    from tasks.models import encode_prompts
    from tasks.tables import read_table
    from tasks.train.online import response_logps, sample

    model, tokenizer = load_causal_lm(tiny_sft_model)
    texts = read_table(prompts, ["prompt"]).column("prompt").to_pylist()[:6]
    texts = [" ".join(t.split()[:2 + i % 3]) + " :" for i, t in enumerate(texts)]  # lengths differ
    prompt_ids = encode_prompts(tokenizer, texts)
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, prompt_ids, 3, 1.0, 1.0, 12)
    width = rollout.pop("prompt_width")
    assert len({len(p) for p in prompt_ids}) > 1, "the prompts must differ in length to test the padding"
    with torch.no_grad():
        logps = response_logps(model, rollout, width).sum(1)
    examples = []
    for row, (sequence, mask) in enumerate(zip(rollout["sequences"], rollout["mask"])):
        prompt, response = prompt_ids[row // 3], sequence[width:][mask].tolist()
        assert response[-1] == tokenizer.eos_token_id or len(response) == 12
        examples.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        expected, _ = sequence_logps(model, **batch)
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_an_interrupted_run_resumes_to_the_same_policy(kind, tiny_sft_model, prompts, tmp_path):
    """Killed after step 5 with a checkpoint at step 4, the rerun resumes there and ends with the
    weights, and the per-step metrics, of a run that was never interrupted."""
    from tasks import load_stage_kinds
    from tasks.base import StageContext

    params = online_params(kind, epochs=2, checkpoint_every=4, minibatches=2)
    inputs = {"policy": tiny_sft_model, "prompts": prompts}
    whole: list = []
    run_stage_in(tmp_path / "whole", params, inputs, log=whole)

    kind_ = load_stage_kinds()[kind]

    def context(out, log):
        return StageContext(out=out, inputs=inputs, params=kind_.params.model_validate(params), seed=0,
                            log_metrics=log, checkpoints=tmp_path / "checkpoints")

    class Interrupted(Exception):
        pass

    def stop_after_5(metrics, step):
        if step == 5:
            raise Interrupted

    (tmp_path / "first").mkdir()
    with pytest.raises(Interrupted):
        kind_.run(context(tmp_path / "first", stop_after_5))
    assert latest_checkpoint(tmp_path / "checkpoints") is not None

    resumed: list = []
    (tmp_path / "resumed").mkdir()
    kind_.run(context(tmp_path / "resumed", lambda metrics, step: resumed.append((step, metrics))))

    assert [s for s, _ in resumed] == [s for s, _ in whole] == list(range(1, 9))
    for (_, a), (_, b) in zip(whole, resumed):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)  # steps 1-4 replayed, 5-8 recomputed alike
    trained = load_causal_lm(tmp_path / "whole")[0].state_dict()
    for name, value in load_causal_lm(tmp_path / "resumed")[0].state_dict().items():
        torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=1e-5)


def test_lora_uses_the_policy_as_its_own_reference(tiny_sft_model, prompts, run_stage, monkeypatch):
    """With LoRA only the policy is loaded (its base is the reference), and it still learns."""
    import tasks.models

    loads = []
    original = tasks.models.load_causal_lm
    monkeypatch.setattr(tasks.models, "load_causal_lm", lambda *a, **k: loads.append(a) or original(*a, **k))
    log = []
    lora = {"r": 8, "alpha": 16, "dropout": 0.1}
    # This 16-wide model's adapters gain reward only far from the base: a weak KL term.
    params = online_params("rloo", lora=lora, lr=2e-2, epochs=6, kl_coef=0.002)
    run_stage(params, {"policy": tiny_sft_model, "prompts": prompts}, log=log)
    assert len(loads) == 1
    rows = [m for _, m in log]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5)  # adapters start at zero: policy == base
    assert rows[-1]["kl"] > 1e-3  # and then move away from it
    assert mean(rows[-4:], "reward") > mean(rows[:4], "reward") + 0.05


def test_ppo_with_lora_shares_the_reward_models_weights_with_the_value_model(tiny_demo_model, demo_table, tmp_path):
    """The value model is the reward model plus an adapter (and its own head); with the adapter
    disabled it is the reward model again, whatever the value training did."""
    from tasks.models import batched_scores
    from tasks.train.lora import add_lora, reference_context

    rm_dir = tmp_path / "rm"
    run_stage_in(rm_dir, {"kind": "reward_model", "model": "m", "data": "d", "epochs": 1, "lr": 1e-3},
                 {"model": tiny_demo_model, "data": demo_table("preferences", 200)})
    reward_model, tokenizer = load_reward_model(rm_dir)
    prompts, responses = ["animals cat dog :"] * 3, ["good cat", "bad hammer", "lovely dog great cat"]
    before = batched_scores(reward_model, tokenizer, prompts, responses, 64, 8)
    value = add_lora(reward_model, LoraParams(r=4), seed=0, task_type="SEQ_CLS")
    with torch.no_grad():
        for name, parameter in value.named_parameters():
            if parameter.requires_grad:  # the adapters and the value head's own copy of the score head
                parameter.add_(torch.randn_like(parameter))
    assert batched_scores(value, tokenizer, prompts, responses, 64, 8) != pytest.approx(before, abs=1e-3)
    with reference_context(value):
        assert batched_scores(value, tokenizer, prompts, responses, 64, 8) == pytest.approx(before, abs=1e-5)


def test_ppo_with_lora_and_a_reward_model_trains(tiny_sft_model, tiny_demo_model, demo_table, prompts, run_stage):
    rm_out, _ = run_stage({"kind": "reward_model", "model": "m", "data": "d", "epochs": 2, "lr": 1e-3, "batch_size": 32},
                          {"model": tiny_demo_model, "data": demo_table("preferences", 800)})
    log = []
    params = online_params("ppo", reward_fn=None, reward_model="rm", monitor_reward_fn="demo_gold",
                           lora={"r": 8, "alpha": 16}, lr=1e-2, epochs=2)
    run_stage(params, {"policy": tiny_sft_model, "prompts": prompts, "reward_model": rm_out}, log=log)
    rows = [m for _, m in log]
    assert all("monitor_reward" in r and "value_loss" in r for r in rows)
    assert rows[-1]["value_loss"] < rows[0]["value_loss"]


@pytest.mark.parametrize("change, message", [
    ({"reward_model": "rm"}, "exactly one of reward_model"),
    ({"reward_fn": "gold"}, "unknown reward function 'gold'"),
    ({"minibatches": 3}, "must divide"),
    ({"max_new_tokens": 600}, "must be below max_length"),
    ({"samples_per_prompt": 1}, "greater than or equal to 2"),
])
def test_impossible_options_are_refused(change, message):
    from tasks import load_stage_kinds

    with pytest.raises(ValueError, match=message):
        load_stage_kinds()["grpo"].params.model_validate(online_params("grpo", **change))


def test_a_killed_pipeline_run_resumes_its_online_stage(tmp_path):
    """`alignflow run` killed (SIGKILL) mid-training: the rerun resumes from the stage's last
    checkpoint, MLflow gets the whole curve, and the checkpoints go once the artifact is in place."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from conftest import REPO, alignflow, stage_runs

    spec = {
        "name": "resume", "seed": 0,
        "models": {"base": {"kind": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "datasets": {"sft_data": {"kind": "synthetic", "split": "sft", "size": 200},
                     "prompts": {"kind": "synthetic", "split": "prompts", "size": 32}},
        "stages": {
            "sft": {"kind": "sft", "model": "base", "data": "sft_data", "epochs": 1, "lr": 1e-2},
            "train": {"kind": "grpo", "policy": "sft", "prompts": "prompts", "reward_fn": "demo_gold",
                      "epochs": 8, "batch_size": 4, "max_new_tokens": 8, "checkpoint_every": 5},
        },
    }
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    env = {**os.environ, "ALIGNFLOW_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = home / "store" / "_checkpoints" / "grpo"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/step-*/alignflow_state.json")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before its first checkpoint: make it longer"
    os.killpg(run.pid, signal.SIGKILL)  # the run and the Prefect server it started
    run.wait()

    alignflow("run", path, home=home, check=True, timeout=600)
    train = next(r for r in stage_runs(home, "resume") if r.data.tags["alignflow.stage"] == "train")
    resumed_after = train.data.metrics["resumed_after_step"]
    assert resumed_after > 0 and resumed_after % 5 == 0
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_metric_history(train.info.run_id, "reward")
    assert sorted(m.step for m in history)[:-1] == list(range(1, 65))  # every step, then the final summary
    assert not list(checkpoints.glob("*/step-*/alignflow_state.json"))


# ---- the fast paths give the plain path's numbers --------------------------------------------


@pytest.fixture(scope="module")
def tiny_architectures(tmp_path_factory):
    from test_logps import save_model_folder

    folders = {}
    for name in ("llama", "gpt2"):
        folders[name] = tmp_path_factory.mktemp(name)
        save_model_folder(folders[name], name)
    return folders


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_shared_prompt_rows_give_the_plain_log_probs(name, tiny_architectures):
    """Each prompt once for its samples (shared_prompt_inputs) gives every response token the
    log-prob, gradient and entropy of one row per response: for a whole rollout and for a
    shuffled micro-batch whose prompts have unequal numbers of samples in it."""
    from tasks.train.online import response_logps, sample

    model, tokenizer = load_causal_lm(tiny_architectures[name])
    bos = tokenizer.bos_token_id
    prompts = [[bos, 3, 4, 5], [bos, 6], [bos, 7, 8], [bos, 9, 3, 5, 6, 7]]  # lengths differ: left padding
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, prompts, 3, 1.0, 1.0, 8)
    width = rollout.pop("prompt_width")
    lengths = rollout["mask"].sum(1)
    assert lengths.min() < lengths.max(), "some responses must end early to test the masking"
    for rows in (torch.arange(12), torch.tensor([4, 0, 8, 2, 1, 11])):
        part = {k: v[rows] for k, v in rollout.items()}
        results = []
        for shared in (False, True):
            model.zero_grad()
            logps, entropy = response_logps(model, part, width, 0.7, entropy=True, shared_ok=shared)
            (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
            grads = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
            results.append((logps, entropy, grads))
        (plain, plain_entropy, plain_grads), (fast, fast_entropy, fast_grads) = results
        assert (plain[~part["mask"]] == 0).all() and (plain[part["mask"]] < 0).all()
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast_entropy, plain_entropy, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast_grads, plain_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_single_update_path_gives_the_plain_paths_run(kind, tiny_sft_model, prompts, tmp_path, monkeypatch):
    """A single update per rollout takes the old log-probs from the training forward instead of a
    separate pass (and runs rloo's advantages inside it): the same metrics at every step and the
    same trained weights as with the separate pass."""
    from tasks.train import online

    params = online_params(kind, epochs=1, kl_coef=0.1)
    inputs = {"policy": tiny_sft_model, "prompts": prompts}
    runs, real = {}, online.response_logps
    for single in (True, False):
        monkeypatch.setattr(online, "SINGLE_UPDATE_FORWARD", single)
        calls = []
        monkeypatch.setattr(online, "response_logps", lambda model, *a, **k: calls.append(torch.is_grad_enabled()) or real(model, *a, **k))
        log: list = []
        run_stage_in(tmp_path / str(single), params, inputs, log=log)
        runs[single] = log, calls
    (fast, fast_calls), (plain, plain_calls) = runs[True], runs[False]
    assert fast_calls.count(False) < plain_calls.count(False)  # the rollout's policy pass is left out
    assert [s for s, _ in fast] == [s for s, _ in plain] == list(range(1, 5))
    for (_, a), (_, b) in zip(fast, plain):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    trained = load_causal_lm(tmp_path / "False")[0].state_dict()
    for name, value in load_causal_lm(tmp_path / "True")[0].state_dict().items():
        torch.testing.assert_close(value, trained[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prompts_computed_once_give_the_same_samples(name, tiny_architectures, monkeypatch):
    """Sampling from each prompt's KV cache, computed once and copied to its samples, draws the
    very tokens that generate(num_return_sequences=k) draws from the same seed."""
    from tasks.train import online

    model, tokenizer = load_causal_lm(tiny_architectures[name])
    bos = tokenizer.bos_token_id
    prompts = [[bos, 3, 4, 5], [bos, 6], [bos, 7, 8, 9, 10, 11]]
    calls, real = [], online.shared_prompt_cache
    monkeypatch.setattr(online, "shared_prompt_cache", lambda *a: calls.append(1) or real(*a))
    samples = []
    for shared in (True, False):
        torch.manual_seed(0)
        samples.append(online.sample(model, tokenizer, prompts, 4, 1.0, 1.0, 10, shared_prefill=shared))
    assert calls == [1, 1]  # its check on first use (tasks/logps.py's verified), then the sampling
    for key in ("sequences", "attention_mask", "mask"):
        assert torch.equal(samples[0][key], samples[1][key]), key
    assert samples[0]["sequences"][:, samples[0]["prompt_width"]:].unique().numel() > 3  # really sampled
