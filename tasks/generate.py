"""generate: n sampled responses per prompt from a policy.

backend `hf`: transformers `generate`, batched (tasks.models.sample_responses), anywhere.
backend `vllm`: a vLLM engine (tasks/vllm_backend.py; a CUDA GPU, or an x86 CPU with AVX-512), with
the `vllm` block's engine settings; the same table (prompt_id, prompt, sample, response), the same
prompt tokens, sampling settings and decoding.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tasks.base import Ref, StageContext, StageParams, shard_rows, stage_kind
from tasks.vllm_backend import VllmParams, vllm_problems, vllm_settings


class GenerateParams(StageParams):
    kind: Literal["generate"] = "generate"
    policy: Ref("model")
    prompts: Ref("table")
    n: int = Field(4, ge=1, description="candidates per prompt")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens only; 0: no cut")
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompts longer than this many tokens lose their beginning (a leading bos is kept)"
    )
    batch_size: int = Field(64, ge=1, description="prompts per generate call (hf backend)")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate; vllm: vLLM (a CUDA GPU, or an x86 CPU with AVX-512)"
    )
    vllm: VllmParams | None = Field(
        None, validate_default=True, description="vLLM's engine settings (backend: vllm; checked, then dropped, with hf)"
    )
    shards: int = Field(1, ge=1, description="split the prompts over this many task-runner workers (same result)")

    not_in_key = frozenset({"shards"})

    @field_validator("vllm")
    @classmethod
    def _vllm_settings(cls, value, info):
        return vllm_settings(value, info)

    def environment_problems(self):
        return vllm_problems(self.backend, self.vllm)


def candidates_metrics(rows: dict) -> dict[str, float]:
    """A candidates table's summary (its columns as lists); also what merged shards report."""
    lengths = [len(r.split()) for r in rows["response"]]
    return {
        "responses": float(len(lengths)),
        "mean_words": sum(lengths) / len(lengths),
        "distinct_fraction": len(set(zip(rows["prompt_id"], rows["response"]))) / len(lengths),
    }


@stage_kind("generate", GenerateParams, output="table", shard_input="prompts", summarize=candidates_metrics)
def generate(ctx: StageContext) -> dict[str, float]:
    import math

    from tasks.models import load_causal_lm, sample_responses
    from tasks.tables import read_table, write_table

    p: GenerateParams = ctx.params
    if p.backend == "vllm":  # before any model is loaded: can it run here at all?
        from tasks.vllm_backend import require_vllm

        require_vllm("generate stage", "backend", p.vllm)
    table, first = shard_rows(read_table(ctx.inputs["prompts"], ["prompt"], what="prompts table"), ctx)
    prompts = table.column("prompt").to_pylist()
    if "prompt_id" in table.column_names:
        prompt_ids = table.column("prompt_id").to_pylist()
    else:  # the row number in the whole table (a shard's rows keep theirs)
        prompt_ids = list(range(first, first + len(prompts)))
    if p.backend == "vllm":
        from tasks.vllm_backend import sample_responses as vllm_sample_responses

        samples = len(prompts) * (p.n if p.temperature > 0 else 1)  # what the engine counts as done
        with ctx.progress("generating (vllm)", total=samples) as bar:
            shown = [0]

            def advance(done, total):
                bar.advance(done - shown[0])
                shown[0] = done

            responses = vllm_sample_responses(
                ctx.inputs["policy"], prompts,
                n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens,
                seed=ctx.seed, engine=p.vllm, scratch=ctx.out, row_ids=prompt_ids, max_prompt_length=p.max_prompt_length,
                on_progress=advance,
            )
    else:
        model, tokenizer = load_causal_lm(ctx.inputs["policy"])
        with ctx.progress("generating", total=math.ceil(len(prompts) / p.batch_size)) as bar:
            responses = sample_responses(
                model, tokenizer, prompts,
                n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens,
                batch_size=p.batch_size, seed=ctx.seed, on_batch=bar.advance, prompt_ids=prompt_ids,
                max_prompt_length=p.max_prompt_length,
            )

    rows = {"prompt_id": [], "prompt": [], "sample": [], "response": []}
    for prompt_id, prompt, candidates in zip(prompt_ids, prompts, responses):
        for sample, response in enumerate(candidates):
            for key, value in zip(rows, (prompt_id, prompt, sample, response)):
                rows[key].append(value)
    write_table(rows, ctx.out)
    return candidates_metrics(rows)
