"""evaluate: gold-judged win rate of a policy against a baseline on held-out prompts."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tasks.base import Ref, StageContext, StageParams, stage_kind


class EvaluateParams(StageParams):
    kind: Literal["evaluate"] = "evaluate"
    policy: Ref("model")
    baseline: Ref("model")
    prompts: Ref("table")
    judge: str = Field("demo_gold", description="a reward function name in tasks/rewards.py")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, name: str) -> str:
        from tasks.rewards import get_reward_fn

        get_reward_fn(name)
        return name


def win_rate(policy_rewards: list[float], baseline_rewards: list[float]) -> dict[str, float]:
    """Mean per-prompt outcome (win 1, tie 0.5, loss 0) with a 95% normal (Wald) interval.

    The interval is mean +- 1.96 * sample std / sqrt(n) over the outcomes in {0, 0.5, 1},
    clipped to [0, 1]; all ties give the zero-width interval [0.5, 0.5].
    """
    import math

    outcomes = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_rewards, baseline_rewards)]
    n = len(outcomes)
    mean = sum(outcomes) / n
    std = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    return {"win_rate": mean, "win_rate_ci_low": max(0.0, mean - half), "win_rate_ci_high": min(1.0, mean + half), "outcomes": outcomes}


@stage_kind("evaluate", EvaluateParams, output="metrics")
def evaluate(ctx: StageContext) -> dict[str, float]:
    import json
    import math

    from tasks.models import load_causal_lm, sample_responses
    from tasks.rewards import get_reward_fn
    from tasks.tables import read_table
    import pyarrow as pa
    import pyarrow.parquet as pq

    p: EvaluateParams = ctx.params
    prompts = read_table(ctx.inputs["prompts"], ["prompt"], what="prompts table").column("prompt").to_pylist()
    judge = get_reward_fn(p.judge)

    responses, rewards = {}, {}
    n_batches = math.ceil(len(prompts) / p.batch_size)
    with ctx.progress("evaluating", total=2 * n_batches) as bar:
        for name in ("policy", "baseline"):
            model, tokenizer = load_causal_lm(ctx.inputs[name])
            # The same seed for both: common random numbers make the comparison less noisy
            # (and a policy compared with itself ties on every prompt).
            responses[name] = [r[0] for r in sample_responses(
                model, tokenizer, prompts, n=1, temperature=p.temperature, top_p=p.top_p,
                max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, seed=ctx.seed, on_batch=bar.advance,
            )]
            rewards[name] = [judge(prompt, response) for prompt, response in zip(prompts, responses[name])]
            del model

    result = win_rate(rewards["policy"], rewards["baseline"])
    outcomes = result.pop("outcomes")
    metrics = {
        **result,
        "reward_policy": sum(rewards["policy"]) / len(prompts),
        "reward_baseline": sum(rewards["baseline"]) / len(prompts),
        "n": float(len(prompts)),
    }
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    samples = pa.table({
        "prompt": prompts,
        "policy_response": responses["policy"],
        "baseline_response": responses["baseline"],
        "policy_reward": rewards["policy"],
        "baseline_reward": rewards["baseline"],
        "outcome": outcomes,
    })
    pq.write_table(samples, ctx.out / "samples.parquet")
    return metrics
