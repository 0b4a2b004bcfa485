"""score: a `reward` column for each candidate, from a reward model or a named reward function."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.base import OptionalRef, Ref, StageContext, StageParams, shard_rows, stage_kind


class ScoreParams(StageParams):
    kind: Literal["score"] = "score"
    candidates: Ref("table")
    reward_model: OptionalRef("reward_model") = None
    reward_fn: str | None = Field(None, description="a name in tasks/rewards.py, e.g. demo_gold")
    batch_size: int = Field(128, ge=1)
    max_length: int = Field(512, ge=2)
    shards: int = Field(1, ge=1, description="split the rows over this many task-runner workers (same result)")

    not_in_key = frozenset({"shards"})

    @model_validator(mode="after")
    def _one_scorer(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("score needs exactly one of reward_model (a reward model) or reward_fn (a function name)")
        if self.reward_fn is not None:
            from tasks.rewards import get_reward_fn  # pure Python: cheap

            get_reward_fn(self.reward_fn)  # an unknown name fails when the spec is checked
        return self


def scored_metrics(rows: dict) -> dict[str, float]:
    """A scored table's summary (its columns as lists); also what merged shards report."""
    import math

    rewards = rows["reward"]
    mean = sum(rewards) / len(rewards)
    return {"mean_reward": mean, "std_reward": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))}


@stage_kind("score", ScoreParams, output="table", shard_input="candidates", summarize=scored_metrics)
def score(ctx: StageContext) -> dict[str, float]:
    import math

    import pyarrow as pa

    from tasks.tables import read_table, write_table

    p: ScoreParams = ctx.params
    table, _ = shard_rows(read_table(ctx.inputs["candidates"], ["prompt", "response"], what="candidates table"), ctx)
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response").to_pylist()

    if p.reward_fn is not None:
        from tasks.rewards import get_reward_fn

        fn = get_reward_fn(p.reward_fn)
        rewards = [float(fn(prompt, response)) for prompt, response in zip(prompts, responses)]
    else:
        from tasks.models import batched_scores, load_reward_model

        model, tokenizer = load_reward_model(ctx.inputs["reward_model"])
        with ctx.progress("scoring", total=math.ceil(len(prompts) / p.batch_size)) as bar:
            rewards = batched_scores(model, tokenizer, prompts, responses, p.max_length, p.batch_size, bar.advance)

    if "reward" in table.column_names:
        table = table.drop_columns(["reward"])
    write_table(table.append_column("reward", pa.array(rewards, pa.float64())), ctx.out)
    return scored_metrics({"reward": rewards})
