"""The training machinery under every trainer: response log-probs, LoRA, references, batching, length rules."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from tasks.base import BadInput
from tasks.logps import sequence_logps
from tasks.models import IGNORE, build_tiny_llama, collate, encode_examples, load_causal_lm
from tasks.train import LoraParams
from tasks.train.lora import add_lora, reference_context
from tasks.train.loop import LengthGroupedBatches, fit_to_length


def full_logits_logps(model, input_ids, attention_mask, labels):
    """The textbook computation: every position's logits, log-softmax, gather the labelled tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def demo_batch(tokenizer):
    prompts = ["animals cat dog :", "tools saw :", "animals dog :"]
    responses = ["good cat great dog", "bad saw", "dog"]
    return collate(encode_examples(tokenizer, prompts, responses, 64), tokenizer.pad_token_id)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "llama+lora"])
def test_response_logps_match_full_logits(tiny_demo_model, architecture):
    model, tokenizer = load_causal_lm(tiny_demo_model, device="cpu")
    if architecture == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    if architecture == "llama+lora":
        model = add_lora(model, LoraParams(r=4, dropout=0.0), seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter matter
                torch.nn.init.normal_(p, std=0.5)
    model.eval()
    batch = demo_batch(tokenizer)
    ours, n_ours = sequence_logps(model, **batch)
    expected, n_expected = full_logits_logps(model, **batch)
    assert torch.equal(n_ours, n_expected) and n_ours.tolist() == [5, 3, 2]  # response words + eos
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # ... and the same gradients
    grads = []
    for fn in (sequence_logps, full_logits_logps):
        model.zero_grad()
        fn(model, **batch)[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lora_reference_is_the_base_model(tiny_demo_model):
    base, tokenizer = load_causal_lm(tiny_demo_model, device="cpu")
    batch = demo_batch(tokenizer)
    with torch.no_grad():
        base_logps, _ = sequence_logps(base, **batch)
    model = add_lora(load_causal_lm(tiny_demo_model, device="cpu")[0], LoraParams(r=4, dropout=0.0), seed=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.2 * sum(p.numel() for p in base.parameters())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        adapted, _ = sequence_logps(model, **batch)
        with reference_context(model):
            disabled, _ = sequence_logps(model, **batch)
    assert not torch.allclose(adapted, base_logps, atol=1e-3)  # the adapter changes the policy...
    torch.testing.assert_close(disabled, base_logps)  # ...and disabling it gives the base back


def test_length_grouped_batches_cover_everything_once_with_less_padding():
    lengths = [int(x) for x in torch.randint(2, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedBatches(lengths, batch_size=16, seed=0)
    epoch1, epoch2 = list(sampler), list(sampler)
    for epoch in (epoch1, epoch2):
        assert sorted(i for b in epoch for i in b) == list(range(1000))
        assert len(epoch) == len(sampler) == 63
    assert epoch1 != epoch2  # reshuffled each epoch
    assert list(LengthGroupedBatches(lengths, 16, seed=0)) == epoch1  # seeded

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_batches = [list(range(s, min(s + 16, 1000))) for s in range(0, 1000, 16)]
    assert padding(epoch1) < 0.1 * padding(random_batches)


def test_too_long_examples_truncate_drop_or_stop():
    lengths = [5, 12, 8, 30]
    assert fit_to_length(lengths, 10, "truncate", "data") == ([0, 1, 2, 3], {"truncated": 2.0})
    assert fit_to_length(lengths, 10, "drop", "data") == ([0, 2], {"dropped_too_long": 2.0})
    with pytest.raises(BadInput, match=r"prefs\.parquet: row 2: at most max_length=10 tokens, got 12 \(2 rows"):
        fit_to_length(lengths, 10, "error", "prefs.parquet")


# ---- the dpo stage ---------------------------------------------------------------------------


def preference_margins(model_dir, pairs_dir) -> torch.Tensor:
    """log pi(chosen) - log pi(rejected) of every pair in a pairs table, under a model artifact."""
    from tasks.logps import batched_logps

    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    table = pq.read_table(pairs_dir / "data.parquet").to_pydict()
    chosen, _ = batched_logps(model, tokenizer, table["prompt"], table["chosen"], 64, 128)
    rejected, _ = batched_logps(model, tokenizer, table["prompt"], table["rejected"], 64, 128)
    return torch.tensor(chosen) - torch.tensor(rejected)


def dpo_params(**extra):
    return {"kind": "dpo", "policy": "p", "pairs": "x", "lr": 5e-3, "epochs": 2, "batch_size": 16, **extra}


def test_dpo_with_lora_learns_and_saves_merged_or_adapter_only(tiny_sft_model, demo_table, run_stage):
    inputs = {"policy": tiny_sft_model, "pairs": demo_table("preferences", 256)}
    log = []
    # lr 1e-2: at 2e-2 the loss jumps after warmup and the outcome hangs on the schedule's first
    # steps (get_scheduler's warmup starts at lr 0: accuracy 0.58, against 0.73 with the old one).
    options = {"lr": 1e-2, "epochs": 3}
    merged, metrics = run_stage(dpo_params(lora={"r": 8, "alpha": 16}, **options), inputs, log=log)
    # Reference: the base with the adapter disabled, so the first step sees policy == reference.
    first_step = log[0][1]
    assert first_step["loss"] == pytest.approx(0.6931, abs=1e-3) and first_step["rewards/margins"] == pytest.approx(0, abs=1e-6)
    # Implicit-reward accuracy on the training pairs: (pc - rc) > (pr - rr), the reference the SFT model.
    implicit = preference_margins(merged, inputs["pairs"]) - preference_margins(tiny_sft_model, inputs["pairs"])
    assert (implicit > 0).float().mean() > 0.7 and implicit.mean() > 1.0  # chance: 0.5 and 0
    assert metrics["trainable_parameters"] < 0.5 * sum(p.numel() for p in load_causal_lm(tiny_sft_model, device="cpu")[0].parameters())
    assert (merged / "adapter" / "adapter_config.json").exists()

    adapter_only, again = run_stage(dpo_params(lora={"r": 8, "alpha": 16, "merge": False}, **options), inputs)
    assert not (adapter_only / "model.safetensors").exists()
    assert (adapter_only / "adapter_model.safetensors").stat().st_size < 0.5 * (merged / "model.safetensors").stat().st_size
    assert again["loss"] == pytest.approx(metrics["loss"], abs=1e-5)  # same training either way
    a, tokenizer = load_causal_lm(merged, device="cpu")
    b, _ = load_causal_lm(adapter_only, device="cpu")
    batch = demo_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(a, **batch)[0], sequence_logps(b, **batch)[0], atol=1e-4, rtol=1e-5)


def test_dpo_reference_from_the_table_or_computed_here_agree(tiny_sft_model, demo_table, run_stage):
    """Reference log-probs precomputed by `ref_logps` (cached, shared) and computed inside `dpo`
    from the same reference give the same training."""
    pairs = demo_table("preferences", 64)
    with_ref, _ = run_stage({"kind": "ref_logps", "pairs": "x", "reference": "r"}, {"pairs": pairs, "reference": tiny_sft_model})
    _, from_table = run_stage(dpo_params(), {"policy": tiny_sft_model, "pairs": with_ref})
    _, computed = run_stage(dpo_params(), {"policy": tiny_sft_model, "pairs": pairs})
    for name in ("loss", "rewards/margins", "rewards/accuracies"):
        assert computed[name] == pytest.approx(from_table[name], abs=1e-4)


@pytest.mark.parametrize("loss", ["slic", "rrhf", "ipo", "hinge"])
def test_every_pairwise_loss_trains_toward_chosen(loss, tiny_sft_model, demo_table, run_stage):
    extra = {"loss": loss, "sft_weight": 0.1} if loss in ("slic", "rrhf") else {"loss": loss}
    pairs = demo_table("preferences", 256)
    # 3 epochs: with get_scheduler's warmup (lr 0 at the first step) slic needs more than 2.
    trained, _ = run_stage(dpo_params(epochs=3, **extra), {"policy": tiny_sft_model, "pairs": pairs})
    before, after = preference_margins(tiny_sft_model, pairs), preference_margins(trained, pairs)
    # The policy now prefers chosen over rejected more often, and by more, than the SFT policy did.
    assert (after > 0).float().mean() > (before > 0).float().mean() + 0.1
    assert after.mean() > before.mean() + 1.0


def test_dpo_drops_or_refuses_too_long_pairs(tiny_sft_model, demo_table, run_stage):
    pairs = demo_table("preferences", 64)
    table = pq.read_table(pairs / "data.parquet")
    inputs = {"policy": tiny_sft_model, "pairs": pairs}
    _, metrics = run_stage(dpo_params(max_length=12, too_long="drop", epochs=0.1), inputs)
    assert 0 < metrics["dropped_too_long"] < table.num_rows
    assert metrics["pairs"] == table.num_rows - metrics["dropped_too_long"]
    with pytest.raises(BadInput, match="at most max_length=12 tokens"):
        run_stage(dpo_params(max_length=12, too_long="error"), inputs)


def test_loss_specific_options_are_checked():
    from tasks.train.dpo import DPOParams

    with pytest.raises(ValueError, match="delta applies to loss 'slic' only"):
        DPOParams.model_validate(dpo_params(delta=2.0))
    with pytest.raises(ValueError, match="label_smoothing applies to loss 'dpo' only"):
        DPOParams.model_validate(dpo_params(loss="ipo", label_smoothing=0.1))
    assert DPOParams.model_validate(dpo_params(loss="slic", delta=2.0)).loss_params() == {"sft_weight": 0.0, "delta": 2.0}


def test_reward_model_with_lora_trains_head_and_adapters(tiny_demo_model, demo_table, run_stage):
    from tasks.models import batched_scores, load_reward_model

    params = {"kind": "reward_model", "model": "m", "data": "d", "eval_data": "e", "epochs": 2, "lr": 1e-2,
              "batch_size": 32, "lora": {"r": 8, "alpha": 16, "merge": False}}
    inputs = {"model": tiny_demo_model, "data": demo_table("preferences", 400), "eval_data": demo_table("preferences_heldout", 200)}
    out, metrics = run_stage(params, inputs)
    assert metrics["eval_accuracy"] > 0.6  # chance: 0.5
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    model, tokenizer = load_reward_model(out, device="cpu")  # adapter + trained score head on the base
    table = pq.read_table(inputs["eval_data"] / "data.parquet").to_pydict()
    chosen = batched_scores(model, tokenizer, table["prompt"], table["chosen"], 64, 128)
    rejected = batched_scores(model, tokenizer, table["prompt"], table["rejected"], 64, 128)
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(chosen) == pytest.approx(metrics["eval_accuracy"])


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa+lora"])
def test_shared_prompt_rows_give_the_same_logps_and_gradients(tiny_demo_model, attention):
    """collate_shared_prompt (each pair one row: the prompt once, then both responses under a 4D
    mask) against collate_pairs (chosen and rejected as separate padded sequences)."""
    from tasks.logps import collate_pairs, collate_shared_prompt, fast_paths, pair_logps
    from tasks.train.dpo import pair_examples
    import pyarrow as pa

    model, tokenizer = load_causal_lm(tiny_demo_model, device="cpu", attn_implementation=attention.split("+")[0])
    if attention.endswith("lora"):
        model = add_lora(model, LoraParams(r=4, dropout=0.0), seed=0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    assert fast_paths(model).shared_prompt
    table = pa.table({"prompt": ["animals cat dog :", "tools saw :", "food rice soup bread :"],
                      "chosen": ["good cat great dog", "fine saw", "tasty rice"],
                      "rejected": ["bad", "awful hammer old saw broken drill", "x"]})
    examples = pair_examples(tokenizer, table, 64)
    results = []
    for collate_fn in (collate_pairs, collate_shared_prompt):
        model.zero_grad()
        logps, counts = pair_logps(model, collate_fn(examples, tokenizer.pad_token_id))
        logps.sum().backward()
        results.append((logps.detach(), counts, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (separate, n_separate, grads_separate), (shared, n_shared, grads_shared) = results
    assert n_separate.tolist() == n_shared.tolist() == [5, 3, 3, 2, 7, 2]
    torch.testing.assert_close(shared, separate, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads_separate, grads_shared):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_output_layer_matches_the_plain_one(bias):
    """head_logps with logits too big to keep (chunked, recomputed in backward) against
    log_softmax(head(hidden)): values and gradients for the hidden states, weight and bias."""
    from tasks import logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)  # a non-uniform upstream gradient

    expected = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None])[:, 0]
    expected_grads = torch.autograd.grad((expected * weights).sum(), [hidden, *head.parameters()])
    ours = logps.head_logps(head, hidden, targets, chunk_rows=8)  # 5 chunks, the last partial
    grads = torch.autograd.grad((ours * weights).sum(), [hidden, *head.parameters()])
    torch.testing.assert_close(ours.double(), expected, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
