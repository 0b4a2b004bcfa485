"""Training stage kinds (sft, reward_model, dpo) and the plain functions they share (loop, losses, lora)."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.base import StageParams


class LoraParams(BaseModel):
    """Low-rank adapters through peft (Hu et al. 2021): only the adapters train, the base stays frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]) or every linear layer"
    )
    merge: bool = Field(
        True, description="save the adapter merged into the weights (a plain model); false: the adapter alone, on top of the input model"
    )


class TrainParams(StageParams):
    """The optimisation settings every training stage takes (tasks/train/loop.py uses them)."""

    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=2)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="examples over max_length: cut the response's tail, drop them (counted), or stop with an error"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length together: less padding")
    lora: LoraParams | None = Field(None, description="train low-rank adapters instead of every weight")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more time")
