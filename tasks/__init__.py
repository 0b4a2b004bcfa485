"""Stage kinds. Each module registers its kinds in `tasks.base.STAGE_KINDS` on import.

Stage modules stay light at import time (parameters and a thin `run`); the heavy ML code lives in
plain-function modules (tasks/models.py, tasks/train/loop.py, ...) that `run` imports when it runs,
so planning or a fully cached run never pays for importing torch.
"""
from tasks.base import STAGE_KINDS, StageContext, StageKind, StageParams  # noqa: F401

STAGE_MODULES = (
    "tasks.sources",
    "tasks.generate",
    "tasks.score",
    "tasks.reject",
    "tasks.pairs",
    "tasks.slices",
    "tasks.round_data",
    "tasks.mix_models",
    "tasks.train.sft",
    "tasks.train.reward_model",
    "tasks.train.dpo",
    "tasks.train.rrhf",
    "tasks.train.rloo",
    "tasks.train.grpo",
    "tasks.train.ppo",
    "tasks.evaluate",
    "tasks.ref_logps",
    "tasks.reward_accuracy",
)


def load_stage_kinds() -> dict[str, StageKind]:
    """The built-in kinds, plus those of the modules named in ALIGNFLOW_PLUGINS (comma-separated
    importable module names): a user's own stage kinds, registered with `@stage_kind`."""
    import importlib
    import os

    plugins = [m.strip() for m in os.environ.get("ALIGNFLOW_PLUGINS", "").split(",") if m.strip()]
    for module in (*STAGE_MODULES, *plugins):
        importlib.import_module(module)
    return STAGE_KINDS
