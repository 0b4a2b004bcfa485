"""LoRA through peft: wrap a model for training, and save what it learned.

A model artifact is always loadable by tasks.models.load_causal_lm. With `merge: true` (the
default) the adapter is merged into the weights and the artifact is a plain model, with the
adapter alone kept beside it under `adapter/`. With `merge: false` the artifact is the adapter
alone (small), and names the input model it sits on.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tasks.models import base_reference, quiet_peft, save_model
from tasks.train import LoraParams

ADAPTER_DIR = "adapter"


def add_lora(model, lora: LoraParams, seed: int, task_type: str = "CAUSAL_LM"):
    """`model` wrapped with fresh adapters (peft initialises B = 0, so it starts equal to `model`;
    A's random init follows `seed`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,  # SEQ_CLS also trains the fresh score head in full
    )
    torch.manual_seed(seed)
    with quiet_peft():
        return get_peft_model(model, config)


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def reference_context(model):
    """Inside it, a LoRA model computes as its base: the reference with no second copy in memory."""
    if is_lora(model):
        return model.disable_adapter()
    return contextlib.nullcontext()


def save_trained(model, tokenizer, out: Path, lora: LoraParams | None, base: Path) -> dict[str, float]:
    """Save a trained model into the artifact folder `out`; `base` is the artifact it started from."""
    if lora is None:
        save_model(model, tokenizer, out)
        return {}
    trainable = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    if lora.merge:
        model.save_pretrained(str(out / ADAPTER_DIR))
        save_model(model.merge_and_unload(), tokenizer, out)
    else:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        # peft records the base by path; a path is this machine's: name the base by its store key.
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_reference(Path(base))
        config_path.write_text(json.dumps(config, indent=2))
    return {"trainable_parameters": trainable}
