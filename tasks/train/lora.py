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
    with _quiet_peft():
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
    """Save a trained model into the artifact folder `out`; `base` is the artifact it started from.
    (Not through tasks.models, which loads adapter artifacts with this module: no import circle.)"""
    if lora is None:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        return {}
    trainable = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    if lora.merge:
        model.save_pretrained(str(out / ADAPTER_DIR))
        model.merge_and_unload().save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        # peft records the base by path; make it the input artifact's absolute path.
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(Path(base).resolve())
        config_path.write_text(json.dumps(config, indent=2))
    return {"trainable_parameters": trainable}


def is_adapter_artifact(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").exists() and not (Path(folder) / "config.json").exists()


def load_adapter_merged(folder: Path, model_class, **kwargs) -> torch.nn.Module:
    """An adapter-only artifact loaded onto its base and merged (inference and further training)."""
    from peft import PeftModel

    base_path = json.loads((Path(folder) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base_path).exists():
        raise FileNotFoundError(f"{folder}: the adapter's base model {base_path} is gone (was the store moved or swept?)")
    base = model_class.from_pretrained(base_path, **kwargs)
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


@contextlib.contextmanager
def _quiet_peft():
    """peft reads a transformers property that warns it is deprecated in v5: noise to our users."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
