"""rloo: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

Each response is one action. Its reward is the score minus kl_coef times its KL to the
reference (summed over tokens, the k1 estimate); its advantage is that reward minus the mean
reward of the other samples of its prompt (`rloo_advantages`); the loss is -advantage times the
response's log-prob, clipped PPO-style when a rollout is reused (updates_per_rollout > 1 or
minibatches > 1). No value model. The loop, generation and checkpoints: tasks/train/online.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import StageContext, stage_kind
from tasks.logps_report import reports_logps
from tasks.train import OnlineParams


class RLOOParams(OnlineParams):
    kind: Literal["rloo"] = "rloo"
    normalize_advantages: bool = Field(False, description="divide the advantages by their std over the rollout")


def prepare(rollout: dict, models, p: RLOOParams) -> dict:
    from tasks.train.losses import rloo_advantages

    kl = ((rollout["logps"] - rollout["ref_logps"]) * rollout["mask"]).sum(1)
    rewards = rollout["scores"] - p.kl_coef * kl
    advantages = rloo_advantages(rewards.view(-1, p.samples_per_prompt)).flatten()
    if p.normalize_advantages:
        advantages = advantages / (advantages.std() + 1e-8)
    rollout["advantages"] = advantages
    return {"rlhf_reward": rewards.mean().item()}


def loss(models, batch: dict, p: RLOOParams, logps=None):
    from tasks.train.losses import clipped_policy_loss
    from tasks.train.online import response_logps

    if logps is None:
        logps = response_logps(models.policy, batch, batch["prompt_width"], p.temperature)
    mask = batch["mask"]
    # The whole response is one action: its log-prob is the sum over its tokens.
    losses, clipped = clipped_policy_loss((logps * mask).sum(1), (batch["logps"] * mask).sum(1), batch["advantages"], p.clip_eps)
    return losses.mean(), {"clip_fraction": clipped.float().mean()}


@stage_kind("rloo", RLOOParams, output="model")
@reports_logps
def rloo(ctx: StageContext) -> dict[str, float]:
    from tasks.train.online import run_online

    return run_online(ctx, prepare, loss, fused=True)
