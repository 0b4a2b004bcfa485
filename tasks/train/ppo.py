"""ppo: PPO with a value model, GAE and a per-token KL penalty (Schulman et al. 2017; for language
models Stiennon et al. 2020 and Ouyang et al. 2022; details as in Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO").

Per token t of a response: reward r_t = -kl_coef * (log pi - log pi_ref), plus the score on the
last token; the value model estimates V_t; GAE (`gae`, gamma, lam) gives advantages, whitened
over the rollout, and returns. The loss is PPO's clipped surrogate plus vf_coef times the clipped
value loss, each averaged over the rollout's tokens. The value model starts from the reward model
(or the policy when the reward is a function). The loop, generation and checkpoints:
tasks/train/online.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import StageContext, stage_kind
from tasks.logps_report import reports_logps
from tasks.train import OnlineParams


class PPOParams(OnlineParams):
    kind: Literal["ppo"] = "ppo"
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    value_clip_eps: float = Field(0.2, gt=0, description="the value update's clip range")
    updates_per_rollout: int = Field(4, ge=1, description="PPO epochs over each rollout")
    minibatches: int = Field(1, ge=1)


def prepare(rollout: dict, models, p: PPOParams) -> dict:
    import torch

    from tasks.train.losses import gae, masked_mean, masked_whiten
    from tasks.train.online import token_values

    mask = rollout["mask"]
    models.value.eval()
    with torch.no_grad():
        rollout["values"] = token_values(models.value, rollout, rollout["prompt_width"])
    rewards = -p.kl_coef * (rollout["logps"] - rollout["ref_logps"]) * mask
    last = mask.sum(1) - 1  # the score is the reward of the response's last token
    rewards[torch.arange(len(last)), last] += rollout["scores"]
    advantages, rollout["returns"] = gae(rewards, rollout["values"], mask, p.gamma, p.lam)
    rollout["advantages"] = masked_whiten(advantages, mask)
    return {"rlhf_reward": (rewards * mask).sum(1).mean().item(), "value_mean": masked_mean(rollout["values"], mask).item()}


def loss(models, batch: dict, p: PPOParams):
    from tasks.train.losses import clipped_policy_loss, clipped_value_loss, masked_mean
    from tasks.train.online import response_logps, token_values

    mask, width = batch["mask"], batch["prompt_width"]
    logps = response_logps(models.policy, batch, width, p.temperature)
    policy_loss, clipped = clipped_policy_loss(logps, batch["logps"], batch["advantages"], p.clip_eps)
    values = token_values(models.value, batch, width)
    value_loss = clipped_value_loss(values, batch["values"], batch["returns"], p.value_clip_eps)
    policy_loss, value_loss = masked_mean(policy_loss, mask), masked_mean(value_loss, mask)
    return policy_loss + p.vf_coef * value_loss, {
        "policy_loss": policy_loss, "value_loss": value_loss, "clip_fraction": masked_mean(clipped.float(), mask),
    }


@stage_kind("ppo", PPOParams, output="model")
@reports_logps
def ppo(ctx: StageContext) -> dict[str, float]:
    from tasks.train.online import run_online

    # The loss is a mean over the minibatch's tokens: micro-batches weigh by their tokens.
    return run_online(ctx, prepare, loss, with_value=True, loss_weight=lambda batch: batch["mask"].sum())
