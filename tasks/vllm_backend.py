"""The `vllm` sampling backend of the generate and evaluate stages: the same responses' format as
the `hf` backend (tasks.models.sample_responses), computed by vLLM on CUDA GPUs.

What is the same as the hf backend, so that both write the same artifact:
- the prompts' tokens: tasks.models.encode_prompts ([bos] + prompt tokens, or the chat
  template's rendering), handed to vLLM as token ids, so both backends condition on the same
  tokens (vLLM never tokenizes the text itself);
- stopping: at the tokenizer's eos only (vLLM's `generation_config="vllm"`, so a model's
  generation_config.json adds no stop tokens, as `generate(eos_token_id=...)` adds none), or after
  max_new_tokens;
- n samples per prompt; temperature 0 is greedy, computed once per prompt and repeated n times;
  top_p as given, no top-k cut;
- the responses: the generated ids decoded by the artifact's own tokenizer with
  skip_special_tokens, then stripped.
What differs: the numbers (vLLM's kernels, and the dtype: `vllm.dtype: auto` runs a float32
artifact in half precision, the hf backend in float32), hence the random draws; results are
seeded but not equal to the hf backend's, except where greedy decoding ties no argmax. Sampled
results do not depend on batching: each prompt's request has its own seed, derived from the
stage's seed and the prompt's index (request_seed); vLLM seeds the prompt's i-th sample with
that seed + i.

How vLLM runs: in a child process (`python -m tasks.vllm_backend REQUEST RESULT`), one per model.
A pipeline runs its stages in one long process, in Prefect's worker threads, and trains on the same
GPU between generations; in-process vLLM engines have not reliably given their GPU memory back on
deletion (vllm issues #1908, #3281, #21073), and some vLLM versions refuse to start outside the
main thread. A child that exits frees everything, starts in its main thread, and sees no CUDA
state of the parent's. The cost is the child's start (imports, a few seconds) on top of vLLM's
own engine start.

A LoRA artifact saved as the adapter alone (merge: false) is merged into a full model folder
first, as load_causal_lm merges it for the hf backend: vLLM then samples from exactly the weights
the hf backend samples from, whatever modules the adapter targets (vLLM's own LoRA serving supports
a subset of modules, no modules_to_save, and runs the adapter as extra kernels); the price is one
write of the model, inside the stage's output folder (removed before the artifact is committed, and
by the store's cleanup if the process dies).

Nothing here imports vllm or torch at import time: stage modules import this one for VllmParams.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

INSTALL_HINT = "pip install 'alignflow[vllm]'"
MERGED_DIR = "vllm-merged-model"  # inside the scratch folder (a stage's output folder), removed after


class VllmParams(BaseModel):
    """vLLM's engine settings (backend: vllm). Every one is in the stage's key: vLLM's results may
    depend on any of them (batch composition and parallelism change its floating-point sums)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split across")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of each GPU's memory vLLM may take (weights, activations, KV cache)"
    )
    max_num_seqs: int = Field(256, ge=1, description="sequences decoded together at most")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="vLLM's dtype; auto: the checkpoint's, half precision for a float32 one"
    )


def vllm_settings(value: VllmParams | None, info) -> VllmParams | None:
    """A params model's field validator for `vllm` (declared after `backend`, validate_default=True):
    with backend hf the block is checked, then dropped (it cannot change the result, so it stays out
    of the key); with backend vllm and no block, vLLM's defaults are written out, so the key and
    `plan` show what ran."""
    backend = info.data.get("backend")
    if backend == "hf":
        return None
    if backend == "vllm" and value is None:
        return VllmParams()
    return value


# ---- before anything is loaded: can vLLM run here? ---------------------------------------------


def check_available(kind: str, engine: VllmParams | None = None) -> None:
    """Raise BadInput (the CLI's exit code 2) naming the stage's `backend` field, what is missing
    and the fix, when vLLM cannot run in this environment. Loads no model and does not import vllm."""
    import importlib.util

    import torch

    from tasks.base import BadInput

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("vllm") is None:
        missing.append(f"the vllm package (not installed in {sys.executable})")
    if missing:
        raise BadInput(
            f"{kind} stage", "backend",
            f"'vllm' runs on a CUDA GPU with the vllm package installed; this machine lacks {' and '.join(missing)}. "
            f"Run it on a CUDA machine after `{INSTALL_HINT}`, or set backend: hf",
        )
    if engine is not None and engine.tensor_parallel_size > torch.cuda.device_count():
        raise BadInput(
            f"{kind} stage", "vllm.tensor_parallel_size",
            f"at most the {torch.cuda.device_count()} CUDA GPU(s) visible here, got {engine.tensor_parallel_size}",
        )


# ---- sampling ----------------------------------------------------------------------------------


def request_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`'s request: a hash of the stage's seed and the index, so a prompt's
    samples do not depend on which other prompts share its batch. 62 bits: vLLM seeds sample i of
    a request with seed + i, which must stay within int64."""
    digest = hashlib.sha256(f"alignflow-vllm/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def build_request(
    model_dir: str | Path,
    prompt_ids: list[list[int]],
    eos_token_id: int | None,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    engine: VllmParams,
    row_ids: list | None = None,
) -> dict:
    """What the child passes to vLLM: LLM(**request["llm"]), one SamplingParams(**request["sampling"],
    seed=s) per prompt with s in request["seeds"], and the prompts as token ids."""
    greedy = temperature == 0
    needed = max(len(ids) for ids in prompt_ids) + max_new_tokens
    llm = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_num_seqs": engine.max_num_seqs,
        "dtype": engine.dtype,
        "seed": seed,
        # vLLM's defaults only: no stop tokens or sampling defaults from generation_config.json
        # (the hf backend passes eos_token_id to generate, which replaces the model's list).
        "generation_config": "vllm",
    }
    limit = _model_max_length(model_dir)
    if limit is not None and needed <= limit:  # room for the longest prompt and its response, no more:
        llm["max_model_len"] = needed          # a long-context model needs no KV cache for 128k tokens
    sampling = {
        "n": 1 if greedy else n,  # greedy: one answer per prompt, repeated n times by the caller
        "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p,
        "max_tokens": max_new_tokens,
        "stop_token_ids": [] if eos_token_id is None else [eos_token_id],
        "detokenize": False,  # the caller decodes with the artifact's tokenizer, as the hf backend does
    }
    return {
        "llm": llm,
        "sampling": sampling,
        "prompts": [list(map(int, ids)) for ids in prompt_ids],
        # By the prompt's id (default: its position): a shard's prompts keep the whole run's seeds.
        "seeds": [request_seed(seed, i) for i in (row_ids if row_ids is not None else range(len(prompt_ids)))],
    }


def _model_max_length(model_dir: str | Path) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(name), int):
            return config[name]
    return None


def run_request(request: dict) -> dict:
    """Run one request with vLLM in this process (the child's work): the generated token ids, per
    prompt a list of its samples (eos included when reached), and timings."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**request["llm"])
    loaded = time.perf_counter()
    params = [SamplingParams(**request["sampling"], seed=seed) for seed in request["seeds"]]
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]  # vllm.inputs.TokensPrompt
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    token_ids = []
    for output in outputs:  # in the order of the prompts
        samples = sorted(output.outputs, key=lambda c: getattr(c, "index", 0))
        token_ids.append([[int(t) for t in sample.token_ids] for sample in samples])
    return {
        "token_ids": token_ids,
        "generated_tokens": sum(len(s) for samples in token_ids for s in samples),
        "load_seconds": loaded - started,
        "generate_seconds": done - loaded,
    }


def run_in_child(request: dict, workdir: Path) -> dict:
    """run_request in a fresh Python process (see the module's docstring); vLLM's log goes to a
    file, whose tail is in the error when the child fails."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # what this process's allocator caches, vLLM cannot have
    request_file, result_file, log_file = (workdir / name for name in ("request.json", "result.json", "vllm.log"))
    request_file.write_text(json.dumps(request))
    root = str(Path(__file__).resolve().parent.parent)  # this `tasks` package, whatever the child's cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with open(log_file, "wb") as log:
        code = subprocess.run(
            [sys.executable, "-m", "tasks.vllm_backend", str(request_file), str(result_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        ).returncode
    if code != 0 or not result_file.exists():
        tail = log_file.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"vLLM failed (child process exit code {code}); the end of its log:\n" + "\n".join(tail))
    return json.loads(result_file.read_text())


@contextmanager
def full_model(model_dir: str | Path, scratch: Path):
    """`model_dir` itself, or for an adapter-only LoRA artifact, its base with the adapter merged,
    saved under `scratch` for the time of the block (in the base's stored dtype: merged in float32
    as load_causal_lm merges it, then rounded once)."""
    from tasks.models import is_adapter_artifact

    if not is_adapter_artifact(model_dir):
        yield Path(model_dir)
        return
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.models import load_tokenizer, save_model
    from tasks.models import load_adapter_merged

    base = json.loads((Path(model_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    try:
        base_config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        base_config = {}
    stored = base_config.get("dtype") or base_config.get("torch_dtype")
    folder = Path(scratch) / MERGED_DIR
    try:
        model = load_adapter_merged(model_dir, AutoModelForCausalLM, dtype=torch.float32)
        if stored in ("bfloat16", "float16"):
            model = model.to(getattr(torch, stored))
        save_model(model, load_tokenizer(model_dir), folder)
        del model
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sample_token_ids(
    model_dir: str | Path,
    prompt_ids: list[list[int]],
    eos_token_id: int | None,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    engine: VllmParams | None = None,
    scratch: Path | None = None,
    row_ids: list | None = None,
) -> tuple[list[list[list[int]]], dict]:
    """n samples' generated token ids per prompt (greedy: one, repeated), and the child's stats."""
    engine = engine or VllmParams()
    if not prompt_ids:
        return [], {"generated_tokens": 0, "load_seconds": 0.0, "generate_seconds": 0.0}
    with _scratch_folder(scratch) as work, full_model(model_dir, work) as folder:
        request = build_request(folder, prompt_ids, eos_token_id, n, temperature, top_p, max_new_tokens, seed, engine,
                                row_ids)
        with tempfile.TemporaryDirectory(prefix="alignflow-vllm-") as exchange:
            result = run_in_child(request, Path(exchange))
    token_ids = result.pop("token_ids")
    if len(token_ids) != len(prompt_ids) or any(len(s) != request["sampling"]["n"] for s in token_ids):
        raise RuntimeError(f"vLLM returned {[len(s) for s in token_ids][:8]}... samples for {len(prompt_ids)} prompts, "
                           f"expected {request['sampling']['n']} each")
    if temperature == 0:
        token_ids = [samples * n for samples in token_ids]
    return token_ids, result


@contextmanager
def _scratch_folder(scratch: Path | None):
    if scratch is not None:
        yield Path(scratch)
        return
    with tempfile.TemporaryDirectory(prefix="alignflow-vllm-scratch-") as folder:
        yield Path(folder)


def sample_responses(
    model_dir: str | Path,
    prompts: list,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    engine: VllmParams | None = None,
    scratch: Path | None = None,
    stats: dict | None = None,
    row_ids: list | None = None,
    max_prompt_length: int | None = None,
) -> list[list[str]]:
    """tasks.models.sample_responses' contract (n responses per prompt, as text) through vLLM, for
    the model artifact in `model_dir`. `stats`, when given, receives the child's numbers
    (generated_tokens, load_seconds, generate_seconds) and this process's encode_seconds and
    decode_seconds."""
    from tasks.models import encode_prompts, load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # as load_causal_lm loads it for the hf backend
    started = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, list(prompts), max_prompt_length)
    encoded = time.perf_counter()
    token_ids, result = sample_token_ids(
        model_dir, prompt_ids, tokenizer.eos_token_id, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, engine=engine, scratch=scratch, row_ids=row_ids,
    )
    decoding = time.perf_counter()
    flat = [ids for samples in token_ids for ids in samples]
    texts = [t.strip() for t in tokenizer.batch_decode(flat, skip_special_tokens=True)] if flat else []
    if stats is not None:
        stats.update(result, encode_seconds=encoded - started, decode_seconds=time.perf_counter() - decoding)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompt_ids))]


def main(argv: list[str]) -> int:
    """The child: python -m tasks.vllm_backend REQUEST.json RESULT.json"""
    request_file, result_file = map(Path, argv)
    result = run_request(json.loads(request_file.read_text()))
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
