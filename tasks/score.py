"""score: a `reward` column for each candidate, from a reward model (a reward_model stage or a
pretrained_reward_model) or a reward function (a built-in name or a user's "module:function")."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.base import OptionalRef, Ref, StageContext, StageParams, shard_rows, stage_kind
from tasks.rewards import RewardFnName, reward_code_files


class ScoreParams(StageParams):
    kind: Literal["score"] = "score"
    candidates: Ref("table")
    reward_model: OptionalRef("reward_model") = None
    reward_fn: RewardFnName | None = Field(
        None, description='a built-in name (tasks/rewards.py, e.g. demo_gold) or "module:function" (beside the spec)'
    )
    batch_size: int = Field(128, ge=1)
    max_length: int = Field(512, ge=2)
    shards: int = Field(1, ge=1, description="split the rows over this many task-runner workers (same result)")

    not_in_key = frozenset({"shards"})

    @model_validator(mode="after")
    def _one_scorer(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("score needs exactly one of reward_model (a reward model) or reward_fn (a function name)")
        return self

    def code_files(self):
        return reward_code_files([self.reward_fn], self.spec_dir)


def reward_model_prompts(tokenizer, prompts: list) -> list:
    """Prompts as a reward model reads them, with its own tokenizer: a conversation goes through
    its chat template; when it has none (a model trained on plain text), the conversation as text."""
    from tasks.rewards import conversation_text

    if getattr(tokenizer, "chat_template", None):
        return prompts
    return [x if isinstance(x, str) else conversation_text(x) for x in prompts]


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
        from tasks.rewards import resolve_reward_fn

        fn = resolve_reward_fn(p.reward_fn, p.spec_dir)
        rewards = [float(fn(prompt, response)) for prompt, response in zip(prompts, responses)]
    else:
        from tasks.models import batched_scores, load_reward_model

        # The reward model's own tokenizer re-tokenizes the text: any policy's vocabulary will do.
        model, tokenizer = load_reward_model(ctx.inputs["reward_model"])
        with ctx.progress("scoring", total=math.ceil(len(prompts) / p.batch_size)) as bar:
            rewards = batched_scores(model, tokenizer, reward_model_prompts(tokenizer, prompts), responses,
                                     p.max_length, p.batch_size, bar.advance)

    if "reward" in table.column_names:
        table = table.drop_columns(["reward"])
    write_table(table.append_column("reward", pa.array(rewards, pa.float64())), ctx.out)
    return scored_metrics({"reward": rewards})
