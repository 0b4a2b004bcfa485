"""Training stage kinds (sft, reward_model, dpo) and the plain functions they share (loop, losses)."""
from pydantic import Field

from tasks.base import StageParams


class TrainParams(StageParams):
    """The optimisation settings every training stage takes (tasks/train/loop.py uses them)."""

    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=2)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
