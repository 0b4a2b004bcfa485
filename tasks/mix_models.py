"""mix_models: a weight-wise average of two models of one architecture,
(1 - weight) * first + weight * second.

`rounds.reference: {mix: tau}` adds one per round r > 1, with first = round r-1's reference and
second = round r-1's trained policy: TR-DPO's soft update of the reference (Gorbatovski et al.
2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656). An adapter-only
LoRA artifact is merged into its base first (tasks.models.load_causal_lm), so the result is a full
model either way. The average is taken in float32 and stored in the first model's dtype.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import BadInput, Ref, StageContext, StageParams, stage_kind


class MixModelsParams(StageParams):
    kind: Literal["mix_models"] = "mix_models"
    first: Ref("model") = "reference"
    second: Ref("model") = "policy"
    weight: float = Field(ge=0, le=1, description="the second model's share of every weight")


def mix_state(first: dict, second: dict, weight: float) -> dict:
    """(1 - weight) * first + weight * second, tensor by tensor (float32), in first's dtypes.
    Raises KeyError or ValueError naming the first tensor whose name or shape differs."""
    mixed = {}
    for name, a in first.items():
        b = second[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} against {tuple(b.shape)}")
        if not a.is_floating_point():
            mixed[name] = a  # buffers such as position ids
            continue
        mixed[name] = ((1 - weight) * a.float() + weight * b.float()).to(a.dtype)
    extra = set(second) - set(first)
    if extra:
        raise KeyError(f"{sorted(extra)[0]} (in the second model only)")
    return mixed


@stage_kind("mix_models", MixModelsParams, output="model")
def mix_models(ctx: StageContext) -> dict[str, float]:
    import torch

    from tasks.models import load_causal_lm, save_model

    p: MixModelsParams = ctx.params
    first, tokenizer = load_causal_lm(ctx.inputs["first"], device="cpu")
    second, _ = load_causal_lm(ctx.inputs["second"], device="cpu")
    a, b = first.state_dict(), second.state_dict()
    try:
        mixed = mix_state(a, b, p.weight)
    except (KeyError, ValueError) as err:
        raise BadInput(f"{ctx.inputs['first']} and {ctx.inputs['second']}", "weights",
                       f"two models of one architecture to mix; {err.args[0]}") from None
    # How far apart the two were: the reference's step toward the policy is weight times this.
    distance = torch.sqrt(sum(((x.float() - b[n].float()) ** 2).sum() for n, x in a.items() if x.is_floating_point()))
    del second, b
    first.load_state_dict(mixed)
    save_model(first, tokenizer, ctx.out)
    return {"weight": p.weight, "distance": float(distance)}
