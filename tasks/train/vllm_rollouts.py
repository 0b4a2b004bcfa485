"""rollout_backend: vllm: the online stages (rloo, grpo, ppo) sample their rollouts with a vLLM
engine, one per stage, kept for the stage, holding the policy as it trains.

After every update the policy's new weights go into the engine (`sync`), as trl's colocated vLLM,
OpenRLHF and verl do:
- LoRA (the stage's `lora`): the adapter alone, saved (peft) to a folder in /dev/shm and served
  as a new LoRA adapter (a new id each time; the old one is dropped). A few MB per update.
- full fine-tuning, or LoRA that vLLM does not serve: every weight (LoRA deltas merged), saved as
  safetensors in the engine's dtype to /dev/shm and loaded in place (vLLM's reload_weights).
vLLM 0.32's weight-transfer engines (NCCL, CUDA IPC) are GPU paths; a shared-memory file works on
a CPU and a GPU alike.

The rollout has the layout tasks/train/online.py's `sample` gives (prompt left-padded, response
up to and including eos, then padding), so everything after sampling is the same for both
backends. Each prompt's request is seeded from the stage's seed, the step and the prompt's place
in it, so a resumed run draws the samples it would have drawn. The log-probs the losses use are
still the policy's own (transformers), taken over vLLM's tokens; vLLM samples in its dtype
(bfloat16 by default), so its sampling distribution is the policy's up to that rounding.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ADAPTER = "policy"  # the LoRA name the engine serves the training adapter as


def shm_folder(prefix: str) -> Path:
    """A fresh folder in /dev/shm (memory, no disk writes) where there is one, else in the temp folder."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))


def plain_base(folder: Path) -> Path:
    """The plain model folder at the bottom of a chain of adapter-only artifacts (or `folder` itself)."""
    from tasks.models import base_folder, is_adapter_artifact

    while is_adapter_artifact(folder):
        folder = base_folder(folder)
    return Path(folder)


def checkpoint_weights(policy, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The policy's weights under the checkpoint names vLLM loads (LoRA deltas merged in, peft's
    wrappers' names undone), in `dtype`; a tensor shared by two names (tied embeddings) once."""
    from peft.tuners.lora import LoraLayer

    from tasks.train.lora import is_lora

    model = policy.get_base_model() if is_lora(policy) else policy
    weights, seen = {}, set()
    with torch.no_grad():
        merged = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and module.active_adapters and not module.merged:
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                merged[f"{name}.weight"] = module.get_base_layer().weight + delta
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            tensor = merged.get(name, tensor)
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            weights[name] = tensor.detach().to("cpu", dtype).contiguous()
    return weights


class VllmRollouts:
    """The stage's engine: `sample` a rollout, `sync` the policy after an update; a context manager
    (the engine and its shared-memory folders go at the end)."""

    def __init__(self, policy, tokenizer, policy_dir: str | Path, engine, seed: int, max_length: int,
                 resumed: bool = False):
        self.policy, self.tokenizer, self.engine_params, self.seed = policy, tokenizer, engine, seed
        self.policy_dir, self.max_length, self.resumed = Path(policy_dir), max_length, resumed
        self.engine = None
        self.folders: list[Path] = []
        self.syncs = 0
        self.sync_seconds = 0.0

    def __enter__(self):
        from tasks.train.lora import is_lora
        from tasks.vllm_backend import lora_obstacle, start_engine
        from tasks.vllm_engine import VllmEngineError

        self.work = shm_folder("alignflow-rollouts-")
        base = plain_base(self.policy_dir)
        self.adapter_mode = is_lora(self.policy)
        loras = {}
        if self.adapter_mode:
            adapter = self._save_adapter()
            reason = lora_obstacle(adapter)
            if reason is None:
                loras = {ADAPTER: adapter}
            else:
                self.adapter_mode = False
                log.warning("vLLM cannot serve this LoRA as an adapter (%s): the merged weights go into the engine "
                            "after every update instead", reason)
        try:
            self.engine = start_engine(base, self.engine_params, self.seed, self.work / "engine", self.max_length, loras)
        except VllmEngineError as e:
            if not (loras and e.lora):
                raise
            log.warning("vLLM refused the policy's LoRA adapter (%s): the merged weights go into the engine after every "
                        "update instead", str(e).splitlines()[0])
            self.adapter_mode = False
            self.engine = start_engine(base, self.engine_params, self.seed, self.work / "engine", self.max_length)
        self.start_seconds = self.engine.start_seconds
        # The engine holds the plain base; what differs from it goes in before the first rollout: an
        # adapter artifact the policy started from (merged by load_causal_lm), a resumed run's weights.
        if base != self.policy_dir and self.adapter_mode:
            self._load_full_base()
        elif (base != self.policy_dir or self.resumed) and not self.adapter_mode:
            self.sync()
        return self

    def __exit__(self, *exc):
        if self.engine is not None:
            self.engine.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- weights --

    def _save_adapter(self) -> Path:
        folder = self.work / f"adapter-{self.syncs}"
        self.policy.save_pretrained(str(folder))
        config_path = folder / "adapter_config.json"  # peft wrote the base's path: vLLM serves it on the engine's
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(plain_base(self.policy_dir))
        config_path.write_text(json.dumps(config))
        return folder

    def _load_full_base(self) -> None:
        """The LoRA policy's base (an adapter artifact merged by load_causal_lm) into the engine, once."""
        from tasks.train.lora import reference_context

        with reference_context(self.policy):
            self._load_weights(checkpoint_weights(self.policy, self._dtype()))

    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.engine.dtype or "float32")

    def _load_weights(self, weights: dict) -> None:
        from safetensors.torch import save_file

        folder = self.work / f"weights-{self.syncs}"
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
        try:
            self.sync_seconds += self.engine.load_weights(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def sync(self) -> None:
        """The policy's current weights into the engine (after an update)."""
        import time

        started = time.perf_counter()
        self.syncs += 1
        if self.adapter_mode:
            folder = self._save_adapter()
            self.engine.add_lora(ADAPTER, folder)
            for old in [f for f in self.work.glob("adapter-*") if f != folder]:
                shutil.rmtree(old, ignore_errors=True)
            self.sync_seconds += time.perf_counter() - started
        else:
            self._load_weights(checkpoint_weights(self.policy, self._dtype()))

    # -- sampling --

    def sample(self, prompt_ids: list[list[int]], k: int, temperature: float, top_p: float, max_new_tokens: int,
               step: int) -> dict:
        """k sampled responses to each prompt, in tasks/train/online.py's rollout layout."""
        from tasks.models import pad
        from tasks.vllm_backend import request_seed, sampling_options

        tokenizer = self.tokenizer
        sampling = sampling_options(k, temperature, top_p, 0, max_new_tokens, tokenizer.eos_token_id)
        seeds = [request_seed(self.seed, f"rollout/{step}/{i}") for i in range(len(prompt_ids))]
        token_ids = self.engine.generate(prompt_ids, sampling, seeds, lora=ADAPTER if self.adapter_mode else None)
        responses = [ids for samples in token_ids for ids in samples]  # prompt-major: row b * k + j
        device = next(self.policy.parameters()).device
        input_ids = pad(prompt_ids, tokenizer.pad_token_id, left=True)
        prompt_mask = pad([[1] * len(ids) for ids in prompt_ids], 0, left=True)
        width = max(1, max(len(r) for r in responses))
        response = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=input_ids.dtype)
        mask = torch.zeros((len(responses), width), dtype=torch.bool)
        for row, ids in enumerate(responses):
            response[row, : len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
            mask[row, : len(ids)] = True  # up to and including eos (vLLM stops there)
        repeated_mask = prompt_mask.repeat_interleave(k, 0)
        return {
            "sequences": torch.cat([input_ids.repeat_interleave(k, 0), response], 1).to(device),
            "attention_mask": torch.cat([repeated_mask, mask.long()], 1).to(device),
            "mask": mask.to(device),
            "prompt_width": input_ids.shape[1],
        }

    def response_logprobs(self, rollout: dict) -> list[list[float]]:
        """The engine's log-probs of each rollout response's tokens (what the sync test compares)."""
        width = rollout["prompt_width"]
        sequences, starts = [], []
        for row, attention, mask in zip(rollout["sequences"], rollout["attention_mask"], rollout["mask"]):
            prompt = row[:width][attention[:width].bool()].tolist()
            response = row[width:][mask].tolist()
            sequences.append(prompt + response)
            starts.append(len(prompt))
        return self.engine.prompt_logprobs(sequences, starts, lora=ADAPTER if self.adapter_mode else None)
