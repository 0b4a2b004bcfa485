"""Preference losses, side by side. Each maps a batch of log-probs to per-example losses (B,).

Notation (all summed response-token log-probs): pc, pr = policy on chosen / rejected;
rc, rr = reference on chosen / rejected; |c|, |r| = response token counts;
h = (pc - pr) - (rc - rr), the implicit reward margin.

    dpo    -(1-ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   DPO, Rafailov et al. 2023, eq. 7
                                                                  (ls > 0: cDPO, Mitchell 2023)
    ipo    (h - 1/(2 beta))^2                                     IPO, Azar et al. 2023, eq. 17
    hinge  relu(1 - beta h)                                       RSO hinge-norm, Liu et al. 2023
    slic   relu(delta - pc + pr)                                  SLiC-HF, Zhao et al. 2023 (L_cal)
    rrhf   relu(pr/|r| - pc/|c|)                                  RRHF, Yuan et al. 2023 (K = 2)

Every loss above also takes sft_weight (default 0) through `preference_loss`, which adds
sft_weight * (-pc / |c|): the chosen response's mean token NLL.

Beside them, with their own inputs:

    rrhf_listwise      sum_{r_i < r_k} relu(p_i - p_k)            RRHF, Yuan et al. 2023, L_rank
                       + sft_weight * (-logp_best / |best|)      (p = logp / tokens; K per prompt)
    bradley_terry_loss -log sigmoid(c - r - m) + cc (c + r)^2     Bradley-Terry 1952; margin m:
                                                                  Llama 2 (Touvron 2023); centering
                                                                  cc: Eisenstein et al. 2023, eq. 2
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairLogps:
    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def margin(self) -> Tensor:
        """h = (pc - pr) - (rc - rr): how much more the policy prefers chosen than the reference does."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs reference log-probs (ref_chosen, ref_rejected)")
        return (self.policy_chosen - self.policy_rejected) - (self.ref_chosen - self.ref_rejected)


def dpo(logps: PairLogps, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    # DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h).
    # cDPO (Mitchell 2023): the label is flipped with probability label_smoothing; ls = 0 is plain DPO.
    logits = beta * logps.margin()
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo(logps: PairLogps, beta: float = 0.1) -> Tensor:
    # IPO (Azar et al. 2023, eq. 17, tau = beta): regresses the margin to 1/(2 beta) instead of pushing
    # it to infinity. On summed log-probs, as the contract says (trl divides by token counts first).
    return (logps.margin() - 1 / (2 * beta)) ** 2


def hinge(logps: PairLogps, beta: float = 0.1) -> Tensor:
    # RSO's hinge-norm (Liu et al. 2023, "Statistical Rejection Sampling", gamma = beta).
    return torch.relu(1 - beta * logps.margin())


def slic(logps: PairLogps, delta: float = 1.0) -> Tensor:
    # SLiC-HF's calibration loss (Zhao et al. 2023) on raw sequence log-probs; no reference model.
    # Its regulariser is the SFT term (sft_weight).
    return torch.relu(delta - logps.policy_chosen + logps.policy_rejected)


def rrhf(logps: PairLogps) -> Tensor:
    # RRHF (Yuan et al. 2023) on length-normalised log-probs; `rrhf_listwise` with K = 2.
    chosen = logps.policy_chosen / logps.chosen_tokens.clamp(min=1)
    rejected = logps.policy_rejected / logps.rejected_tokens.clamp(min=1)
    return torch.relu(rejected - chosen)


LOSSES = {"dpo": dpo, "ipo": ipo, "hinge": hinge, "slic": slic, "rrhf": rrhf}


def loss_params(name: str) -> set[str]:
    """The parameters loss `name` accepts (sft_weight included)."""
    fn = _get(name)
    return {p for p in inspect.signature(fn).parameters if p != "logps"} | {"sft_weight"}


def _get(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def preference_loss(name: str, logps: PairLogps, sft_weight: float = 0.0, **params) -> Tensor:
    """Per-pair losses (B,) of loss `name` (see the module docstring) plus the optional SFT term."""
    fn = _get(name)
    unknown = set(params) - loss_params(name)
    if unknown:
        raise ValueError(f"loss {name!r} takes {sorted(loss_params(name))}, not {sorted(unknown)}")
    loss = fn(logps, **params)
    if sft_weight:
        loss = loss + sft_weight * (-logps.policy_chosen / logps.chosen_tokens.clamp(min=1))
    return loss


def rrhf_listwise(
    logps: Tensor, tokens: Tensor, rewards: Tensor, mask: Tensor | None = None, sft_weight: float = 0.0
) -> Tensor:
    """RRHF over K candidates per prompt (Yuan et al. 2023): L_rank + sft_weight * L_ft, per prompt (B,).

    logps, tokens, rewards: (B, K) summed response log-probs, response token counts, rewards.
    mask: (B, K) bool, True for real candidates (ragged groups); None means all are real.
    L_rank = sum over pairs (i, k) with r_i < r_k of relu(p_i - p_k), p = logps / tokens; equal
    rewards rank nothing. L_ft = -logps[best] / tokens[best], the mean token NLL of the highest-reward
    candidate (the first one on a tie). A prompt with no real candidate has loss 0.
    """
    valid = torch.ones_like(logps, dtype=torch.bool) if mask is None else mask.bool()
    rewards = rewards if rewards.is_floating_point() else rewards.double()  # ranks only; -inf below
    # Masked-out entries may hold padding (even inf/nan): replace them so nothing leaks into values or grads.
    p = torch.where(valid, logps / tokens.clamp(min=1), torch.zeros_like(logps))
    # worse[b, i, k]: candidate i has a strictly lower reward than k, both real.
    worse = (rewards.unsqueeze(2) < rewards.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    ranking = torch.where(worse, torch.relu(p.unsqueeze(2) - p.unsqueeze(1)), torch.zeros_like(p).unsqueeze(2))
    loss = ranking.sum(dim=(1, 2))
    if sft_weight:
        best = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf)).argmax(dim=1, keepdim=True)
        nll = -p.gather(1, best).squeeze(1)
        loss = loss + sft_weight * torch.where(valid.any(dim=1), nll, torch.zeros_like(nll))
    return loss


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> Tensor:
    """-log sigmoid(chosen - rejected - margin) + center_coefficient * (chosen + rejected)^2, per pair.

    Bradley-Terry 1952; margin as in Llama 2 (Touvron et al. 2023); the centering term pulls the
    scores towards mean zero (Eisenstein et al. 2023, eq. 2). The batch mean of these per-pair losses
    is trl's RewardTrainer loss with `center_rewards_coefficient`.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return loss


# ---- online RL: advantages and policy-gradient losses ----------------------------------------
#
# Shapes: (B, K) for one value per sampled response, K responses per prompt; (N, T) for one value
# per response token, with `mask` (N, T) marking real tokens (a prefix of each row).
#
#   rloo_advantages     A_i = r_i - mean_{j != i} r_j                      RLOO, Kool et al. 2019;
#                                                                         Ahmadian et al. 2024, eq. 7
#   group_advantages    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)      GRPO, Shao et al. 2024, 4.1.2
#   kl_estimate         k1 = log pi - log pi_ref;                         Schulman 2020, "Approximating
#                       k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1     KL divergence"
#   clipped_policy_loss max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),      PPO, Schulman et al. 2017,
#                       rho = exp(log pi - log pi_old)                    eq. 7 (negated: a loss)
#   gae                 delta_t = r_t + gamma V_{t+1} - V_t,              GAE, Schulman et al. 2016,
#                       A_t = delta_t + gamma lambda A_{t+1}; returns A + V          eq. 16
#   clipped_value_loss  0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)
#                                                                         PPO2 (baselines), as in
#                                                                         Huang et al. 2024 ("N+")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is true (over `dim`, or all); 0 where nothing is masked in."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values - mean) / std over the masked-in entries (PPO's advantage normalisation); 0 elsewhere."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return torch.where(mask.bool(), (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out: each response's baseline is the mean reward of the other K - 1
    responses to its prompt. rewards: (B, K), K >= 2."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage: the reward minus its group's mean, divided by the group's
    (unbiased) standard deviation when `scale`. rewards: (B, G). A group of equal rewards gives 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + eps)


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    k1 (log-ratio) is unbiased but can be negative; k3 is unbiased and never negative (GRPO's)."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k3")


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, negated, elementwise; and where the clipped term was taken.

    Elementwise over any shape: per token (GRPO, PPO) or per sequence (RLOO: summed log-probs). At
    logps == old_logps its gradient is -A * grad(logps), the plain policy gradient."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns (advantages + values), both (N, T).

    rewards, values: (N, T) per response token; mask: (N, T), True on each row's real tokens (a
    prefix). The state after a row's last real token is terminal (its value is 0)."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip_eps: float) -> Tensor:
    """The value head's loss, elementwise: the worse of the plain and the clipped squared error."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
