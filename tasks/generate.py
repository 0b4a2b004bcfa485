"""generate: n sampled responses per prompt from a policy (transformers `generate`, batched)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import Ref, StageContext, StageParams, stage_kind


class GenerateParams(StageParams):
    kind: Literal["generate"] = "generate"
    policy: Ref("model")
    prompts: Ref("table")
    n: int = Field(4, ge=1, description="candidates per prompt")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="prompts per generate call")


@stage_kind("generate", GenerateParams, output="table")
def generate(ctx: StageContext) -> dict[str, float]:
    import math

    from tasks.models import load_causal_lm, sample_responses
    from tasks.tables import read_table, write_table

    p: GenerateParams = ctx.params
    table = read_table(ctx.inputs["prompts"], ["prompt"], what="prompts table")
    prompts = table.column("prompt").to_pylist()
    prompt_ids = table.column("prompt_id").to_pylist() if "prompt_id" in table.column_names else list(range(len(prompts)))
    model, tokenizer = load_causal_lm(ctx.inputs["policy"])

    with ctx.progress("generating", total=math.ceil(len(prompts) / p.batch_size)) as bar:
        responses = sample_responses(
            model, tokenizer, prompts,
            n=p.n, temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens,
            batch_size=p.batch_size, seed=ctx.seed, on_batch=bar.advance,
        )

    rows = {"prompt_id": [], "prompt": [], "sample": [], "response": []}
    for prompt_id, prompt, candidates in zip(prompt_ids, prompts, responses):
        for sample, response in enumerate(candidates):
            for key, value in zip(rows, (prompt_id, prompt, sample, response)):
                rows[key].append(value)
    write_table(rows, ctx.out)
    lengths = [len(r.split()) for r in rows["response"]]
    return {
        "responses": float(len(lengths)),
        "mean_words": sum(lengths) / len(lengths),
        "distinct_fraction": len(set(zip(rows["prompt_id"], rows["response"]))) / len(lengths),
    }
