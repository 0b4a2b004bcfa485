"""Preference losses, side by side. Each maps a batch of pair log-probs to per-pair losses (B,).

Notation (all summed response-token log-probs): pc, pr = policy on chosen / rejected;
rc, rr = reference on chosen / rejected; h = (pc - pr) - (rc - rr), the implicit reward margin.

    dpo    -(1-ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   DPO, Rafailov et al. 2023
                                                                  (ls > 0: cDPO, Mitchell 2023)
    ipo    (h - 1/(2 beta))^2                                     IPO, Azar et al. 2023, eq. 17
    hinge  relu(1 - beta h)                                       RSO hinge-norm, Liu et al. 2023
    slic   relu(delta - pc + pr)                                  SLiC-HF, Zhao et al. 2023
    rrhf   relu(pr/|r| - pc/|c|)                                  RRHF, Yuan et al. 2023 (pairwise)

Every loss also takes sft_weight (default 0), which adds sft_weight * (-pc / |c|): the chosen
response's mean token NLL.
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
    logits = beta * logps.margin()
    # cDPO: the label is flipped with probability label_smoothing; ls = 0 is plain DPO.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo(logps: PairLogps, beta: float = 0.1) -> Tensor:
    # Regresses the margin to 1/(2 beta) instead of pushing it to infinity.
    return (logps.margin() - 1 / (2 * beta)) ** 2


def hinge(logps: PairLogps, beta: float = 0.1) -> Tensor:
    return torch.relu(1 - beta * logps.margin())


def slic(logps: PairLogps, delta: float = 1.0) -> Tensor:
    # Calibration hinge on raw sequence log-probs; no reference model.
    return torch.relu(delta - logps.policy_chosen + logps.policy_rejected)


def rrhf(logps: PairLogps) -> Tensor:
    # Ranking on length-normalised log-probs; the pairwise case of RRHF's sum over ranked pairs.
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


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """-log sigmoid(chosen - rejected - margin), per pair (Bradley-Terry 1952; Llama 2's margin)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
