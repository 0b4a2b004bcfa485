"""The one training loop (tasks/train/loop.py) that every training stage uses, offline and online:
micro-batches give the results of whole batches, schedules are transformers', non-finite training
stops the stage with nothing written, and bfloat16 trains on a CPU."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import alignflow, small_demo
from tasks.logps import sequence_logps
from tasks.models import collate, encode_examples, load_causal_lm


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same_training(log_a, log_b, folder_a, folder_b, atol=1e-5):
    assert [s for s, _ in log_a] == [s for s, _ in log_b]
    for (step, a), (_, b) in zip(log_a, log_b):
        for name in a:
            assert a[name] == pytest.approx(b[name], abs=atol, rel=1e-5), (step, name)
    wa, wb = weights(folder_a), weights(folder_b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-5)


# ---- micro-batches: gradient accumulation gives the whole batch's step ----------------------


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_micro_batches_train_as_whole_batches(kind, tiny_sft_model, demo_table, run_stage):
    """16 examples a step in micro-batches of 5 (5 + 5 + 5 + 1: uneven on purpose): the same losses
    and weights as one pass of 16. SFT's loss is a mean over tokens, so its micro-batches weigh by
    their response tokens, not their examples."""
    if kind == "dpo":
        params = {"kind": "dpo", "policy": "p", "pairs": "x", "lr": 5e-3, "epochs": 1, "batch_size": 16}
        inputs = {"policy": tiny_sft_model, "pairs": demo_table("preferences", 64)}
    else:
        params = {"kind": "sft", "model": "m", "data": "d", "lr": 1e-2, "epochs": 1, "batch_size": 16}
        inputs = {"model": tiny_sft_model, "data": demo_table("sft", 64)}
    whole_log, micro_log = [], []
    whole, _ = run_stage(params, inputs, log=whole_log)
    micro, _ = run_stage({**params, "micro_batch_size": 5}, inputs, log=micro_log)
    assert len(whole_log) == 4
    assert_same_training(whole_log, micro_log, whole, micro)


def test_micro_batches_under_two_processes(tiny_sft_model, demo_table, run_stage):
    """Two processes (accelerate launch, gloo), each cutting its 8 examples of a step into micro-batches
    of 3: the curve and weights of one process with whole batches (1e-4: gloo's reductions)."""
    params = {"kind": "sft", "model": "m", "data": "d", "lr": 1e-2, "epochs": 1, "batch_size": 16}
    inputs = {"model": tiny_sft_model, "data": demo_table("sft", 64)}
    one_log, two_log = [], []
    one, _ = run_stage(params, inputs, log=one_log)
    two, _ = run_stage({**params, "processes": 2, "micro_batch_size": 3}, inputs, log=two_log)
    assert_same_training(one_log, two_log, one, two, atol=1e-4)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_online_micro_batches_train_as_whole_minibatches(kind, tiny_sft_model, demo_table, run_stage):
    """An online step's minibatch of 32 responses in micro-batches of 6 (PPO's loss is a mean over
    tokens: its micro-batches weigh by tokens)."""
    params = {"kind": kind, "policy": "sft", "prompts": "p", "reward_fn": "demo_gold", "max_steps": 3,
              "batch_size": 8, "samples_per_prompt": 4, "max_new_tokens": 8, "lr": 1e-3}
    inputs = {"policy": tiny_sft_model, "prompts": demo_table("prompts", 64)}
    whole_log, micro_log = [], []
    whole, _ = run_stage(params, inputs, log=whole_log)
    micro, _ = run_stage({**params, "micro_batch_size": 6}, inputs, log=micro_log)
    assert len(whole_log) == 3  # max_steps
    assert_same_training(whole_log, micro_log, whole, micro)


def test_micro_batch_size_over_the_batch_is_refused():
    from tasks.train.dpo import DPOParams
    from tasks.train.grpo import GRPOParams

    with pytest.raises(ValueError, match="micro_batch_size"):
        DPOParams.model_validate({"kind": "dpo", "policy": "p", "pairs": "x", "batch_size": 8, "micro_batch_size": 9})
    with pytest.raises(ValueError, match="micro_batch_size"):
        GRPOParams.model_validate({"kind": "grpo", "policy": "p", "prompts": "x", "reward_fn": "demo_gold",
                                   "batch_size": 2, "samples_per_prompt": 4, "minibatches": 2, "micro_batch_size": 5})


# ---- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "constant_with_warmup"])
def test_the_logged_learning_rates_are_get_schedulers(schedule, tiny_demo_model, demo_table, run_stage):
    """max_steps=10 with warmup_ratio 0.3: each step's logged learning rate is the one transformers'
    get_scheduler gives that step (an independent optimizer, stepped alongside)."""
    from transformers import get_scheduler

    log = []
    run_stage({"kind": "sft", "model": "m", "data": "d", "lr": 1e-3, "batch_size": 8, "max_steps": 10,
               "lr_scheduler": schedule, "warmup_ratio": 0.3}, {"model": tiny_demo_model, "data": demo_table("sft", 32)},
              log=log)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert [m["learning_rate"] for _, m in log] == pytest.approx(expected, abs=1e-12)
    assert expected[0] == 0 and max(expected) == pytest.approx(1e-3)  # the warmup and the peak are there


# ---- non-finite training --------------------------------------------------------------------


def test_a_loss_that_blows_up_stops_the_stage_and_commits_nothing(tmp_path):
    """Through the CLI: an lr of 1e30 sends the SFT weights to 1e30 in one step, the next step's loss
    is nan. Exit 1, the step named; no sft artifact in the store."""
    spec_path = small_demo(tmp_path, rounds=1, name="blowup")
    spec = yaml.safe_load(spec_path.read_text())
    spec["stages"]["sft"].update(lr=1e30, warmup_ratio=0.0)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / "home"
    result = alignflow("run", spec_path, home=home)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "training step" in result.stderr and ("nan" in result.stderr or "finite" in result.stderr), result.stderr[-3000:]
    sft_store = home / "store" / "sft"
    assert not sft_store.exists() or not [p for p in sft_store.iterdir() if (p / "manifest.json").exists()]


def test_non_finite_weights_stop_the_loop(tiny_demo_model, demo_table, run_stage, monkeypatch):
    """A weight that turns inf (here: planted after the second optimizer step) stops training at that step."""
    from tasks.train import loop
    from tasks.train.loop import NonFiniteError

    real_step = torch.optim.AdamW.step
    calls = []

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(NonFiniteError, match="training step 2: the weights"):
        run_stage({"kind": "sft", "model": "m", "data": "d", "lr": 1e-3, "batch_size": 8},
                  {"model": tiny_demo_model, "data": demo_table("sft", 32)})
    assert loop.NonFiniteError is NonFiniteError


# ---- precision ------------------------------------------------------------------------------


def test_bfloat16_weights_and_compute_train_on_a_cpu(tiny_demo_model, demo_table, run_stage):
    """A pretrained model stored in bfloat16 (`dtype: bfloat16`), SFT computing in bfloat16: the loss
    falls, and the artifact loads in bfloat16 and scores its data."""
    model, _ = run_stage({"kind": "pretrained", "path": str(tiny_demo_model), "dtype": "bfloat16"})
    loaded, _ = load_causal_lm(model, device="cpu")
    assert loaded.dtype == torch.bfloat16

    log = []
    data = demo_table("sft", 256)
    trained, _ = run_stage({"kind": "sft", "model": "m", "data": "d", "lr": 1e-2, "batch_size": 16, "epochs": 2,
                            "dtype": "bfloat16"}, {"model": model, "data": data}, log=log)
    losses = [m["loss"] for _, m in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # nats per token

    policy, tokenizer = load_causal_lm(trained, device="cpu")
    assert policy.dtype == torch.bfloat16
    import pyarrow.parquet as pq

    table = pq.read_table(data / "data.parquet").slice(0, 8)
    batch = collate(encode_examples(tokenizer, table.column("prompt").to_pylist(), table.column("response").to_pylist(), 64),
                    tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = sequence_logps(policy, **batch)
    assert torch.isfinite(logps).all()


def test_torch_dtype_names():
    from tasks.models import torch_dtype

    assert torch_dtype("bfloat16") == torch.bfloat16 and torch_dtype("float16") == torch.float16
    assert torch_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                   else torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU float16 autocasts")
def test_float16_on_a_cpu_says_it_computes_in_float32():
    from tasks.train.loop import make_accelerator

    with pytest.warns(UserWarning, match="float16"):
        make_accelerator("float16")
    make_accelerator("auto")  # and the next stage gets its own precision back
