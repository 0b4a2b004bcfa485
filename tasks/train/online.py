"""Online RL: the loop the rloo, grpo and ppo stages share, with generation inside it.

Each step, on the next `batch_size` prompts:
1. rollout: sample `samples_per_prompt` responses to each from the current policy (transformers
   generate) and keep their token ids; score them with the reward model or reward function; take
   the sampled tokens' log-probs under the policy (the "old" ones) and under the reference, and
   the policy's entropy; all without gradients.
2. advantages: the algorithm's `prepare` (rloo.py, grpo.py, ppo.py) turns scores into advantages.
3. update: `updates_per_rollout` passes over the rollout, in `minibatches`, each an optimizer step
   on the algorithm's `loss`, in micro-batches of `micro_batch_size` responses.
When the rollout gets a single update in a single forward pass (rloo and grpo with
updates_per_rollout = minibatches = 1 and the whole rollout in one micro-batch), the old
log-probs are that forward's, detached: step 1 leaves out the policy's pass and step 2 runs
between the training forward and its loss. The numbers are the same (tests/test_online.py).
Each forward over the rollout computes a prompt once for all its samples where the model
takes shared-prompt rows (shared_prompt_inputs), and the output layer only over response tokens.
The optimizer, schedule, micro-batches, precision, non-finite checks and checkpoints are the
offline loop's (tasks/train/loop.py). A checkpoint every `checkpoint_every` steps (trained
weights, optimizer, schedule, every RNG's state, the metric history) lets an interrupted run
resume where it stopped and draw the same samples it would have drawn.

Memory: the reward model and the reference are frozen, evaluated under no_grad. With LoRA the
reference is the policy with its adapter disabled (no second copy); with kl_coef 0 none is
loaded. PPO's value model starts from the reward model (or the policy when the reward is a
function); with LoRA, when it starts from the reward model, the reward is that same model with
the value adapter disabled, so reward and value share one set of weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tasks.base import StageContext
from tasks.train import OnlineParams


@dataclass
class OnlineModels:
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: the policy itself under reference_context (LoRA), or no KL
    value: torch.nn.Module | None = None  # PPO
    trainable: list = field(default_factory=list)


# ---- the rollout: sampled tokens and what the algorithms need from them ---------------------
#
# A rollout is a dict of tensors, one row per sampled response, prompt-major (row b * K + k is
# prompt b's k-th sample), so a minibatch is `{name: tensor[rows]}`:
#   sequences (N, P + T): the prompt, left-padded to width P, then the response
#   attention_mask (N, P + T), mask (N, T): real response tokens, up to and including eos
#   logps, ref_logps (N, T): the sampled tokens' log-probs under the policy and the reference
#   scores (N,): the reward; advantages, and for PPO values and returns, from `prepare`


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], k: int, temperature: float, top_p: float,
           max_new_tokens: int, shared_prefill: bool = True) -> dict:
    """k sampled responses to each prompt (token ids in, token ids out), in the rollout layout.
    shared_prefill: each prompt's cache computed once for its k samples where the model allows
    (shared_prompt_cache; the same tokens are drawn) and its check agrees (shared_prefill_disagreement,
    once per model: tasks/logps.py's `verified`); False computes it k times."""
    from tasks.logps import verified
    from tasks.models import pad

    device = next(model.parameters()).device
    input_ids = pad(prompt_ids, tokenizer.pad_token_id, left=True).to(device)
    prompt_mask = pad([[1] * len(p) for p in prompt_ids], 0, left=True).to(device)
    model.eval()
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                    use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    cache = None
    if shared_prefill and k > 1 and verified(model, "shared prefill", shared_prefill_disagreement):
        cache = shared_prompt_cache(model, input_ids, prompt_mask, k)
    if cache is None:
        out = model.generate(input_ids=input_ids, attention_mask=prompt_mask, num_return_sequences=k, **settings)
    else:  # generate computes only the prompts' last token, then samples as it would have
        out = model.generate(input_ids=input_ids.repeat_interleave(k, 0), attention_mask=prompt_mask.repeat_interleave(k, 0),
                             cache=cache, **settings)
    response = out[:, input_ids.shape[1]:]
    is_eos = response == tokenizer.eos_token_id
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first eos
    return {
        "sequences": out,
        "attention_mask": torch.cat([prompt_mask.repeat_interleave(k, 0), mask.long()], 1),
        "mask": mask,
        "prompt_width": input_ids.shape[1],
    }


def shared_prompt_cache(model, input_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int):
    """The KV cache of each prompt but its last token, computed once and copied to its k samples,
    or None where the model's cache cannot be copied so. generate(num_return_sequences=k) would
    compute every prompt k times: with 4 samples of 46-token chat prompts, that is most of a
    SmolLM2 rollout's prefill."""
    if input_ids.shape[1] < 2:
        return None
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    out = model(input_ids=input_ids[:, :-1], attention_mask=prompt_mask[:, :-1], position_ids=positions[:, :-1],
                use_cache=True)
    cache = getattr(out, "cache", None)
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(k)
    return cache


@torch.no_grad()
def shared_prefill_disagreement(model) -> str | None:
    """None where generating from shared_prompt_cache's copied caches gives the logits of generating
    with every sample's own prefill, else how it does not: two greedy steps from two left-padded
    probe prompts, k = 2, both ways. (FalconH1's hybrid cache, copied so, fails to decode.)"""
    from tasks.logps import probe_batch, probe_tolerance
    from tasks.models import pad

    pairs, pad_id = probe_batch(model)
    prompts = [pair["chosen"]["input_ids"] for pair in pairs]  # 9 and 5 tokens: left padding
    device = next(model.parameters()).device
    input_ids = pad(prompts, pad_id, left=True).to(device)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
    settings = dict(do_sample=False, max_new_tokens=2, min_new_tokens=2, use_cache=True, pad_token_id=pad_id,
                    output_logits=True, return_dict_in_generate=True)
    training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            repeated = {"input_ids": input_ids.repeat_interleave(2, 0), "attention_mask": prompt_mask.repeat_interleave(2, 0)}
            plain = torch.stack(model.generate(**repeated, **settings).logits)
            try:
                cache = shared_prompt_cache(model, input_ids, prompt_mask, 2)
                if cache is None:  # nothing shared: sample computes every prefill
                    return None
                shared = torch.stack(model.generate(**repeated, cache=cache, **settings).logits)
                error = (shared.float() - plain.float()).abs().max().item()
            except Exception as exc:  # noqa: BLE001 - any failure of the shared prefill means: do not use it
                return f"sampling's shared prefill fails ({type(exc).__name__}: {exc})"
    finally:
        model.train(training)
    if error <= probe_tolerance(model):
        return None
    return f"sampling's shared prefill disagrees with each sample's own prefill by {error:.3g} in the logits"


def response_logps(model, batch: dict, prompt_width: int, temperature: float = 1.0, entropy: bool = False,
                   shared_ok: bool | None = None):
    """Log-probs (N, T) of the response tokens under `model` at the sampling temperature (0 where
    mask is false); with `entropy`, also the mean entropy of its next-token distributions there.

    Rows with the same prompt (a prompt's samples) go through the model as one shared-prompt row
    (shared_prompt_inputs) where that layout is verified for the model (tasks/logps.py's
    fast_paths; shared_ok overrides), else one row per response."""
    from tasks.logps import fast_paths, head_logits, head_logps, selected_outputs

    mask, targets = batch["mask"], batch["sequences"][:, prompt_width:]
    shared = fast_paths(model).shared_prompt if shared_ok is None else shared_ok
    if shared:
        inputs, index = shared_prompt_inputs(batch, prompt_width, model)
        select = lambda out: out.reshape(-1, out.shape[-1])[index]  # noqa: E731
    else:
        attention = batch["attention_mask"]
        inputs = {"input_ids": batch["sequences"], "attention_mask": attention,
                  "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)}  # as generate numbers left-padded rows
        select = lambda out: out[:, prompt_width - 1 : -1][mask]  # noqa: E731
    # hidden states (or logits, head None) at the positions that predict each response token
    states, head = selected_outputs(model, inputs, select)
    if head is not None:  # the logits are never built whole
        token_logps = head_logps(head, states, targets[mask], temperature)
        logits_of = lambda rows: head_logits(head, rows, temperature)  # noqa: E731
    else:
        token_logps = -F.cross_entropy(states.float() / temperature, targets[mask], reduction="none")
        logits_of = lambda rows: rows.float() / temperature  # noqa: E731
    logps = torch.zeros(mask.shape, dtype=token_logps.dtype, device=mask.device).masked_scatter(mask, token_logps)
    if not entropy:
        return logps
    with torch.no_grad():  # in chunks of rows: a 49k vocabulary's logits for every token are large
        total = states.new_zeros((), dtype=torch.float32)
        for start in range(0, len(states), 256):
            logp = torch.log_softmax(logits_of(states[start : start + 256]).float(), -1)
            total -= (logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum()  # 0 log 0 = 0
    return logps, total / max(1, len(states))


def shared_prompt_inputs(batch: dict, prompt_width: int, model=None) -> tuple[dict, torch.Tensor]:
    """The rollout rows as shared-prompt rows: each distinct prompt once, then its responses one
    after the other, each only as long as it is (up to and including eos); and the flat positions
    (row * width + column) whose outputs predict the response tokens, in the order of
    `out[:, prompt_width - 1 : -1][mask]` (row by row).

    A prompt's K samples then cost its P tokens once instead of K times (as collate_shared_prompt
    does for a preference pair's two responses), and no position is spent on a response's padding.
    A (G, 1, W, W) mask lets each response token see the prompt's tokens and its own response's
    earlier tokens, never another response, and its position ids continue from the prompt's:
    every token sees what it sees in its own row, so the log-probs are the plain layout's
    (tests/test_online.py checks it)."""
    from tasks.logps import model_attention_mask

    sequences, mask, p = batch["sequences"], batch["mask"], prompt_width
    n, t = mask.shape
    prompts, group = torch.unique(torch.cat([sequences[:, :p], batch["attention_mask"][:, :p]], 1), dim=0,
                                  return_inverse=True)
    lengths = mask.sum(1)
    totals = torch.zeros(len(prompts), dtype=lengths.dtype, device=lengths.device).index_add_(0, group, lengths)
    order = torch.argsort(group, stable=True)
    offset = torch.empty_like(lengths)  # where a response starts after its prompt: its prompt's earlier responses' tokens
    offset[order] = lengths[order].cumsum(0) - lengths[order] - (totals.cumsum(0) - totals)[group[order]]
    width = p + int(totals.max())
    steps = torch.arange(t, device=mask.device)
    cols = p + offset[:, None] + steps  # (N, T): where each response token sits in its prompt's row (where mask)
    rows = group[:, None].expand(-1, t)[mask]
    prompt_mask = prompts[:, p:]

    input_ids = sequences.new_zeros((len(prompts), width))  # unused places: token 0, seen by nothing
    input_ids[:, :p] = prompts[:, :p]
    input_ids[rows, cols[mask]] = sequences[:, p:][mask]
    positions = torch.zeros_like(input_ids)
    positions[:, :p] = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    positions[rows, cols[mask]] = (prompt_mask.sum(1)[group][:, None] + steps)[mask]
    segment = torch.full_like(input_ids, -1)  # 0: the prompt, i + 1: response i, -1: padding
    segment[:, :p] = torch.where(prompt_mask.bool(), 0, -1)
    segment[rows, cols[mask]] = (torch.arange(1, n + 1, device=mask.device)[:, None].expand(-1, t))[mask]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
    # Padding attends to itself only (a row with nothing to attend to would give NaN).
    attend = (causal & ((key == 0) | (key == query)) & (key != -1)) | torch.eye(width, dtype=torch.bool, device=causal.device)
    # token 0 is predicted at the prompt's last position, token s at the place of token s - 1
    predictors = torch.cat([torch.full_like(cols[:, :1], p - 1), cols[:, :-1]], 1)
    index = (group[:, None] * width + predictors)[mask]
    inputs = {"input_ids": input_ids, "attention_mask": model_attention_mask(model, attend[:, None]),
              "position_ids": positions}
    return inputs, index


def token_values(value_model, batch: dict, prompt_width: int):
    """The value model's estimate (N, T) of the state before each response token (0 past mask).

    A sequence-classification model scores only its last token; here its score head reads every
    position's hidden state."""
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    head = getattr(base, "score", None) or getattr(base, "classifier")
    mask = batch["attention_mask"]
    hidden = base.base_model(input_ids=batch["sequences"], attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    values = head(hidden[:, prompt_width - 1 : -1]).squeeze(-1).float()
    return values * batch["mask"]


def chunks(n: int, size: int):
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def select(rollout: dict, rows) -> dict:
    return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in rollout.items()}


# ---- checkpoints ---------------------------------------------------------------------------


class TrainedWeights:
    """What a checkpoint keeps of the models: the parameters that train (registered with
    accelerate's checkpointing, which saves it beside the optimizer, schedule and RNG states)."""

    def __init__(self, models: OnlineModels):
        self.modules = {role: m for role, m in (("policy", models.policy), ("value", models.value)) if m is not None}

    def state_dict(self) -> dict:
        return {role: {n: q.detach().cpu() for n, q in m.named_parameters() if q.requires_grad}
                for role, m in self.modules.items()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for role, weights in state.items():
                parameters = dict(self.modules[role].named_parameters())
                for name, value in weights.items():
                    parameters[name].copy_(value)


# ---- the loop -----------------------------------------------------------------------------

Prepare = Callable[[dict, OnlineModels, OnlineParams], dict]  # fills advantages; returns metrics
Loss = Callable[[OnlineModels, dict, OnlineParams], tuple[torch.Tensor, dict]]


def step_prompts(step: int, n_prompts: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of step `step`: consecutive slices of a seeded shuffle of the prompts, reshuffled
    each pass. A function of the step alone, so a resumed run takes the same prompts."""
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(i, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(order[position]))
    return rows


def load_models(ctx: StageContext, with_value: bool) -> tuple[OnlineModels, object, Callable]:
    """The policy (with fresh adapters under LoRA), the reference, the value model, and the scorer
    `score(prompts, texts) -> (N,) rewards`."""
    from tasks.models import batched_scores, load_causal_lm, load_reward_model
    from tasks.rewards import resolve_reward_fn
    from tasks.train.lora import add_lora, reference_context

    p: OnlineParams = ctx.params
    policy, tokenizer = load_causal_lm(ctx.inputs["policy"])
    reference = None
    if p.kl_coef > 0 and (p.lora is None or p.reference is not None):
        reference = load_causal_lm(ctx.inputs.get("reference", ctx.inputs["policy"]))[0].requires_grad_(False).eval()
    if p.lora is not None:
        policy = add_lora(policy, p.lora, ctx.seed)
    if p.gradient_checkpointing:  # it acts in train mode only, hence train mode without dropout
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    reward_model = value = None
    if p.reward_model is not None:
        reward_model, reward_tokenizer = load_reward_model(ctx.inputs["reward_model"])
        reward_model.requires_grad_(False).eval()
    if with_value:
        if reward_model is not None and p.lora is not None:  # one set of weights: see the module docstring
            reward_model.requires_grad_(True)
            value = reward_model = add_lora(reward_model, p.lora, ctx.seed, task_type="SEQ_CLS")
        else:
            value = load_reward_model(ctx.inputs.get("reward_model", ctx.inputs["policy"]))[0]
            if p.lora is not None:
                value = add_lora(value, p.lora, ctx.seed, task_type="SEQ_CLS")

    if reward_model is not None:
        def score(prompts, texts):
            with reference_context(reward_model):
                return torch.tensor(batched_scores(reward_model, reward_tokenizer, prompts, texts, p.max_length, 64))
    else:
        reward_fn = resolve_reward_fn(p.reward_fn, p.spec_dir)

        def score(prompts, texts):
            return torch.tensor([reward_fn(prompt, text) for prompt, text in zip(prompts, texts)], dtype=torch.float32)

    for module in (policy, value):
        if module is not None:
            disable_dropout(module)
    trainable = [q for m in (policy, value) if m is not None for q in m.parameters() if q.requires_grad]
    return OnlineModels(policy, reference, value, trainable), tokenizer, score


def disable_dropout(model) -> None:
    """Online RL trains without dropout (as trl does): the log-probs taken at sampling time and those
    of the first update must be the same, or the clipped ratio clips noise (LoRA's dropout too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@torch.no_grad()
def make_rollout(models: OnlineModels, tokenizer, prompt_ids: list, prompts: list, p: OnlineParams, score,
                 monitor=None, policy_pass: bool = True, rollouts=None, step: int = 0) -> tuple[dict, dict]:
    """Sample, score and take log-probs (see the rollout layout above); and the rollout's metrics.
    Without `policy_pass` the policy's log-probs (and the kl and entropy metrics) are left to the
    training forward (run_online's single-update path). `rollouts`: a vLLM engine that samples
    (rollout_backend: vllm, tasks/train/vllm_rollouts.py), else transformers' generate."""
    from tasks.train.lora import reference_context

    k = p.samples_per_prompt
    if rollouts is None:
        rollout = sample(models.policy, tokenizer, prompt_ids, k, p.temperature, p.top_p, p.max_new_tokens)
    else:
        rollout = rollouts.sample(prompt_ids, k, p.temperature, p.top_p, p.max_new_tokens, step)
    width = rollout.pop("prompt_width")
    n = len(rollout["sequences"])
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(rollout["sequences"][:, width:], rollout["mask"])],
                                   skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    repeated = [prompt for prompt in prompts for _ in range(k)]
    rollout["scores"] = score(repeated, texts).to(rollout["mask"].device, torch.float32)

    size = min(n // p.minibatches, p.micro_batch_size or n)
    logps, ref_logps, entropy = [], [], 0.0
    models.policy.eval()
    for rows in chunks(n, size):
        part = select(rollout, rows)
        if policy_pass:
            lp, ent = response_logps(models.policy, part, width, p.temperature, entropy=True)
            logps.append(lp.float())
            entropy += float(ent) * float(part["mask"].sum() / rollout["mask"].sum().clamp(min=1))  # ent: a token mean
        if p.kl_coef > 0:
            if models.reference is not None:
                ref_logps.append(response_logps(models.reference, part, width, p.temperature).float())
            else:
                with reference_context(models.policy):
                    ref_logps.append(response_logps(models.policy, part, width, p.temperature).float())
    if ref_logps:
        rollout["ref_logps"] = torch.cat(ref_logps)
    rollout["prompt_width"] = width

    scores, lengths = rollout["scores"], rollout["mask"].sum(1).float()
    metrics = {
        "reward": scores.mean().item(),
        "reward_std": scores.view(-1, k).std(1).mean().item(),  # within a prompt's samples
        "response_length": lengths.mean().item(),
        # Responses that ended (with eos) within max_new_tokens.
        "eos_fraction": ((rollout["sequences"][:, width:] == tokenizer.eos_token_id) & rollout["mask"]).any(1).float().mean().item(),
    }
    if monitor is not None:
        metrics["monitor_reward"] = float(np.mean([monitor(prompt, text) for prompt, text in zip(repeated, texts)]))
    if policy_pass:
        metrics.update(add_policy_logps(rollout, torch.cat(logps), entropy))
    return rollout, metrics


def add_policy_logps(rollout: dict, logps: torch.Tensor, entropy: float) -> dict:
    """Store the policy's log-probs (N, T) in the rollout (and the reference's, the same, when
    there is no KL term); the kl and entropy metrics."""
    rollout["logps"] = logps
    rollout.setdefault("ref_logps", logps.clone())
    return {"kl": ((logps - rollout["ref_logps"]) * rollout["mask"]).sum(1).mean().item(), "entropy": float(entropy)}


SINGLE_UPDATE_FORWARD = True  # False: always the rollout's own policy pass (tests compare the two)


def run_online(ctx: StageContext, prepare: Prepare, loss_fn: Loss, with_value: bool = False,
               loss_weight: Callable[[dict], object] = lambda batch: len(batch["mask"]),
               fused: bool = False) -> dict[str, float]:
    """Train ctx.params.policy online with one algorithm's `prepare` and `loss`; save it to ctx.out.

    fused: `loss_fn(models, batch, p, logps)` takes the policy's log-probs of the batch when given
    them (with gradients), so a single update per rollout can skip the rollout's policy pass.

    Each minibatch is one optimizer step, computed in micro-batches of `micro_batch_size` sampled
    responses (tasks.train.loop.accumulate), each weighted by `loss_weight(micro-batch)` over the
    minibatch's total: its responses for a loss that is a mean over responses (rloo, grpo), its
    tokens for a mean over tokens (ppo)."""
    from accelerate.utils import set_seed

    from tasks.base import BadInput
    from tasks.models import encode_prompts
    from tasks.rewards import resolve_reward_fn
    from tasks.tables import read_table
    from tasks.train.lora import save_trained
    from tasks.train.loop import (accumulate, fit_to_length, make_accelerator, make_optimizer, optimizer_step, resume,
                                  save_checkpoint, verify_fast_paths)

    p: OnlineParams = ctx.params
    set_seed(ctx.seed)
    table = read_table(ctx.inputs["prompts"], ["prompt"], what="prompts table")
    if not table.num_rows:
        raise BadInput(str(ctx.inputs["prompts"]), "rows", "at least one prompt")
    models, tokenizer, score = load_models(ctx, with_value)
    monitor = resolve_reward_fn(p.monitor_reward_fn, p.spec_dir) if p.monitor_reward_fn else None

    prompts = table.column("prompt").to_pylist()
    prompt_ids = encode_prompts(tokenizer, prompts)
    room = p.max_length - p.max_new_tokens  # a prompt over it loses its beginning (or is dropped)
    keep, data_metrics = fit_to_length([len(ids) for ids in prompt_ids], room, p.too_long, str(ctx.inputs["prompts"]))
    prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i][-room:] for i in keep]
    if not prompts:
        raise BadInput(str(ctx.inputs["prompts"]), "prompt", f"a prompt of at most {room} tokens (max_length - max_new_tokens)")

    total_steps = p.max_steps or max(1, math.ceil(p.epochs * len(prompts) / p.batch_size))
    updates = total_steps * p.updates_per_rollout * p.minibatches  # optimizer steps
    optimizer, scheduler = make_optimizer(models.trainable, lr=p.lr, weight_decay=p.weight_decay, lr_scheduler=p.lr_scheduler,
                                          warmup_ratio=p.warmup_ratio, total_steps=updates)
    accelerator = make_accelerator(p.dtype)
    optimizer = accelerator.prepare(optimizer)  # its step unscales float16's gradients; the models stay as they are
    accelerator.register_for_checkpointing(TrainedWeights(models), scheduler)
    setup = {"total_steps": total_steps}
    start, history = resume(accelerator, ctx.checkpoints, setup, ctx.log_metrics)

    # One update over the whole rollout in one forward pass: the log-probs the rollout would take
    # under the policy are that forward's, detached (the same weights, no dropout), so the
    # rollout's own policy pass is left out and the training forward gives them (as trl's GRPO
    # does with num_iterations = 1). The algorithm's loss then takes them as its `logps`.
    single = (SINGLE_UPDATE_FORWARD and fused and p.updates_per_rollout == 1 and p.minibatches == 1
              and (p.micro_batch_size or math.inf) >= p.batch_size * p.samples_per_prompt)

    def compute_loss(models, batch):
        return loss_fn(models, batch, p)

    def compute_single_update_loss(models, rollout):
        logps, entropy = response_logps(models.policy, rollout, rollout["prompt_width"], p.temperature, entropy=True)
        metrics.update(add_policy_logps(rollout, logps.detach().float(), entropy))
        metrics.update(prepare(rollout, models, p))
        return loss_fn(models, rollout, p, logps)

    rollouts = None  # rollout_backend: vllm: the stage's engine, the policy synced into it after every step's updates
    if p.rollout_backend == "vllm":
        from tasks.train.vllm_rollouts import VllmRollouts

        rollouts = VllmRollouts(models.policy, tokenizer, ctx.inputs["policy"], p.vllm, ctx.seed, p.max_length, start > 0)
    with rollouts or contextlib.nullcontext(), \
            ctx.progress("online training" + (f" (resumed after step {start})" if start else ""), total=total_steps) as bar:
        bar.advance(start)
        for step in range(start, total_steps):
            rows = step_prompts(step, len(prompts), p.batch_size, ctx.seed)
            rollout, metrics = make_rollout(models, tokenizer, [prompt_ids[i] for i in rows], [prompts[i] for i in rows],
                                            p, score, monitor, policy_pass=not single, rollouts=rollouts, step=step)
            if not single:
                metrics.update(prepare(rollout, models, p))
            n = len(rollout["sequences"])
            sums: dict[str, float] = {}
            for module in (models.policy, models.value):  # dropout is off: see disable_dropout
                if module is not None:
                    module.train()
            for _ in range(p.updates_per_rollout):
                order = torch.randperm(n)  # drawn on both paths: the same random stream
                if single:
                    values = accumulate(accelerator, models, [(rollout, 1.0)], compute_single_update_loss, step + 1)
                    lr = optimizer_step(accelerator, optimizer, scheduler, models.trainable, 1.0, step + 1)
                    sums.update(values)
                    continue
                for minibatch in chunks(n, n // p.minibatches):
                    parts = [select(rollout, order[minibatch][micro]) for micro in chunks(minibatch.stop - minibatch.start,
                                                                                          p.micro_batch_size or n)]
                    weights = [float(loss_weight(part)) for part in parts]
                    shares = [w / sum(weights) if sum(weights) > 0 else 1 / len(parts) for w in weights]
                    values = accumulate(accelerator, models, list(zip(parts, shares)), compute_loss, step + 1)
                    lr = optimizer_step(accelerator, optimizer, scheduler, models.trainable, 1.0, step + 1)
                    for key, value in values.items():
                        sums[key] = sums.get(key, 0.0) + value / (p.updates_per_rollout * p.minibatches)
            metrics.update(sums, learning_rate=lr)  # the step's last update's
            if rollouts is not None and step + 1 < total_steps:
                rollouts.sync()
            ctx.log_metrics(metrics, step + 1)
            history.append({"step": step + 1, **metrics})
            bar.advance()
            if ctx.checkpoints is not None and (step + 1) % p.checkpoint_every == 0 and step + 1 < total_steps:
                verify_fast_paths(accelerator, models.policy, f"training step {step + 1}")
                save_checkpoint(accelerator, ctx.checkpoints, step + 1, {"history": history, "setup": setup})
    verify_fast_paths(accelerator, models.policy, f"the end of training (step {total_steps})")

    if p.gradient_checkpointing:
        models.policy.gradient_checkpointing_disable()
    models.policy.eval()
    # The final metrics: the mean of the last tenth of the steps (one step is noisy).
    tail = history[-max(1, len(history) // 10):]
    final = {k: float(np.mean([row[k] for row in tail])) for k in tail[0] if k != "step"}
    final.update(data_metrics, steps=float(total_steps), prompts=float(len(prompts)), resumed_after_step=float(start))
    final.update(save_trained(models.policy, tokenizer, ctx.out, p.lora, ctx.inputs["policy"]))
    return final
