"""grpo: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4.1).

Each of a prompt's G samples gets the advantage (r - mean) / std over the group
(`group_advantages`), on every one of its tokens; the loss per token is PPO's clipped surrogate
plus kl_coef times the k3 estimate of the KL to the reference (in the loss, not the reward),
averaged over each response's tokens, then over responses (the paper's 1/G sum 1/|o| sum). No
value model. The loop, generation and checkpoints: tasks/train/online.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import StageContext, stage_kind
from tasks.logps_report import reports_logps
from tasks.train import OnlineParams


class GRPOParams(OnlineParams):
    kind: Literal["grpo"] = "grpo"
    scale_rewards: bool = Field(True, description="divide by the group's std (false: Dr. GRPO's centring only)")


def prepare(rollout: dict, models, p: GRPOParams) -> dict:
    from tasks.train.losses import group_advantages

    rollout["advantages"] = group_advantages(rollout["scores"].view(-1, p.samples_per_prompt), p.scale_rewards).flatten()
    return {}


def loss(models, batch: dict, p: GRPOParams, logps=None):
    from tasks.train.losses import clipped_policy_loss, kl_estimate, masked_mean
    from tasks.train.online import response_logps

    if logps is None:
        logps = response_logps(models.policy, batch, batch["prompt_width"], p.temperature)
    mask = batch["mask"]
    per_token, clipped = clipped_policy_loss(logps, batch["logps"], batch["advantages"][:, None], p.clip_eps)
    if p.kl_coef > 0:
        per_token = per_token + p.kl_coef * kl_estimate(logps, batch["ref_logps"], "k3")
    return masked_mean(per_token, mask, dim=1).mean(), {"clip_fraction": masked_mean(clipped.float(), mask)}


@stage_kind("grpo", GRPOParams, output="model")
@reports_logps
def grpo(ctx: StageContext) -> dict[str, float]:
    from tasks.train.online import run_online

    return run_online(ctx, prepare, loss, fused=True)
