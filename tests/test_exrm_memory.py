"""A stage keeps no model alive once it returns (pipelines/exrm_vs_dporm_smollm2*.yaml run a dozen
model stages one after another in one process: a model kept per stage grew a CI run to 14 GB)."""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import run_stage_in


def live_modules() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.nn.Module) for o in gc.get_objects())


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_training_and_reward_accuracy_stages_keep_no_model_alive(tmp_path, tiny_demo_model, demo_table, lora):
    extra = {"lora": lora} if lora else {}
    prefs = demo_table("preferences", 64)
    stages = [
        ("rm", {"kind": "reward_model", "model": "m", "data": "d", "epochs": 1, "batch_size": 16, **extra},
         {"model": tiny_demo_model, "data": prefs}),
        ("dpo", {"kind": "dpo", "policy": "p", "pairs": "x", "beta": 0.1, "epochs": 1, "batch_size": 16, **extra},
         {"policy": tiny_demo_model, "pairs": prefs}),
        ("exrm_acc", {"kind": "reward_accuracy", "id": "i", "exrm": "e"}, {"id": prefs, "exrm": tmp_path / "rm"}),
        ("dporm_acc", {"kind": "reward_accuracy", "id": "i", "dporm_policy": "p", "dporm_reference": "r"},
         {"id": prefs, "dporm_policy": tmp_path / "dpo", "dporm_reference": tiny_demo_model}),
    ]
    before = live_modules()
    for name, params, inputs in stages:
        run_stage_in(tmp_path / name, params, inputs)
        assert live_modules() == before, f"{name}: {live_modules() - before} torch modules still alive after the stage"
