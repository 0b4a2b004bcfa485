"""rrhf: RRHF on ranked candidates, list-wise (Yuan et al. 2023, "RRHF: Rank Responses to Align
Language Models with Human Feedback without tears").

Each step takes a batch of prompts with all their scored candidates (a `score` or `reject`
table: prompt, response, reward), scores every candidate by its length-normalised log-prob under
the policy, and applies `rrhf_listwise` (tasks/train/losses.py): a hinge for every pair ranked
the wrong way, plus sft_weight times the best candidate's NLL. No reference model. For RRHF on
pairs, use the `dpo` stage with `loss: rrhf` (the K = 2 case of the same loss).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import BadInput, Ref, StageContext, stage_kind
from tasks.logps_report import reports_logps
from tasks.train import TrainParams
from tasks.train.launch import multiprocess


class RRHFParams(TrainParams):
    kind: Literal["rrhf"] = "rrhf"
    policy: Ref("model")
    candidates: Ref("table")  # prompt, response, reward; grouped by prompt_id when present, else prompt
    sft_weight: float = Field(1.0, ge=0, description="the paper's L = L_rank + L_ft has weight 1")
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(8, ge=1, description="prompts per step (each with all its candidates)")


def candidate_groups(table) -> list[dict]:
    """One group per prompt: its prompt, responses and rewards (groups of one are kept: SFT only)."""
    columns = table.to_pydict()
    keys = columns["prompt_id"] if "prompt_id" in columns else [str(p) for p in columns["prompt"]]
    groups: dict = {}
    for i, key in enumerate(keys):
        group = groups.setdefault(key, {"prompt": columns["prompt"][i], "responses": [], "rewards": []})
        group["responses"].append(columns["response"][i])
        group["rewards"].append(float(columns["reward"][i]))
    return list(groups.values())


def collate_groups(groups: list[dict], pad_id: int) -> dict:
    """Every candidate of every group in one batch of sequences; `group` maps each to its prompt."""
    import torch

    from tasks.models import collate

    sequences = [e for g in groups for e in g["examples"]]
    batch = collate(sequences, pad_id)
    batch["group"] = torch.tensor([b for b, g in enumerate(groups) for _ in g["examples"]])
    batch["slot"] = torch.tensor([k for g in groups for k in range(len(g["examples"]))])
    batch["rewards"] = torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float32)
    return batch


def rrhf_step(model, batch, sft_weight: float):
    import torch

    from tasks.logps import sequence_logps
    from tasks.train.losses import rrhf_listwise

    logps, n_tokens = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    # Scatter the flat candidates into (prompts, K) tensors; `mask` marks the real ones.
    shape = (int(batch["group"].max()) + 1, int(batch["slot"].max()) + 1)
    index = (batch["group"], batch["slot"])
    grid_logps = logps.new_zeros(shape).index_put(index, logps)
    grid_tokens = torch.ones(shape, dtype=n_tokens.dtype, device=logps.device).index_put(index, n_tokens)
    grid_rewards = logps.new_zeros(shape).index_put(index, batch["rewards"].to(logps.device))
    mask = torch.zeros(shape, dtype=torch.bool, device=logps.device).index_put(index, torch.ones_like(n_tokens, dtype=torch.bool))
    loss = rrhf_listwise(grid_logps, grid_tokens, grid_rewards, mask, sft_weight=sft_weight).mean()

    normalised = torch.where(mask, grid_logps / grid_tokens.clamp(min=1), torch.full_like(grid_logps, -torch.inf))
    best_by_reward = torch.where(mask, grid_rewards, torch.full_like(grid_rewards, -torch.inf)).argmax(1)
    metrics = {
        # How often the policy's top-scored candidate is the highest-reward one.
        "rank_accuracy": (normalised.argmax(1) == best_by_reward).float().mean(),
        "logps/best": grid_logps.detach().gather(1, best_by_reward[:, None]).mean(),
    }
    return loss, metrics


@stage_kind("rrhf", RRHFParams, output="model")
@multiprocess
@reports_logps
def rrhf(ctx: StageContext) -> dict[str, float]:
    import sys
    from functools import partial

    from tasks.models import encode_examples, load_causal_lm
    from tasks.tables import read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, is_main_process, train, truncate

    p: RRHFParams = ctx.params
    table = read_table(ctx.inputs["candidates"], ["prompt", "response", "reward"], what="candidates table")
    groups = candidate_groups(table)
    if not groups:
        raise BadInput(str(ctx.inputs["candidates"]), "rows", "at least one scored candidate")
    model, tokenizer = load_causal_lm(ctx.inputs["policy"])
    for g in groups:
        g["examples"] = encode_examples(tokenizer, [g["prompt"]] * len(g["responses"]), g["responses"], sys.maxsize)
    lengths = [max(len(e["input_ids"]) for e in g["examples"]) for g in groups]
    keep, data_metrics = fit_to_length(lengths, p.max_length, p.too_long, str(ctx.inputs["candidates"]))
    groups = [{**groups[i], "examples": [truncate(e, p.max_length) for e in groups[i]["examples"]]} for i in keep]

    if p.lora is not None:
        model = add_lora(model, p.lora, ctx.seed)
    model, metrics = train(
        model, groups, partial(collate_groups, pad_id=tokenizer.pad_token_id), partial(rrhf_step, sft_weight=p.sft_weight),
        **p.loop_options(), seed=ctx.seed,
        lengths=[lengths[i] for i in keep] if p.group_by_length else None,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
        checkpoints=ctx.checkpoints, checkpoint_every=p.checkpoint_every,
    )
    metrics.update(data_metrics, prompts=float(len(groups)), candidates=float(sum(len(g["examples"]) for g in groups)))
    if is_main_process():
        metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["policy"]))
    return metrics
