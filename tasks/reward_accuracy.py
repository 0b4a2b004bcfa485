"""reward_accuracy: how often a reward ranks chosen above rejected, in distribution and under shift.

Lin et al. 2024, "On the limited generalization capability of the implicit reward model induced by
DPO": compare an explicitly trained Bradley-Terry reward model (EXRM, a `reward_model` artifact)
with DPO's implicit reward (DPORM) r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), on preference
pairs from the training distribution (`id`), with shifted prompts (`prompt_shift`) and with
shifted responses (`response_shift`).

One stage measures one reward, and logs the same names whichever it is: `acc_<set>` with `_ci_low`
/ `_ci_high` (acc_id, acc_prompt_shift_ci_low, ...), its MLflow run tagged `alignflow.reward` =
`exrm` or `dporm`; so MLflow's Compare lines an EXRM run and a DPORM run up metric by metric, and
flows/report.py pairs them by seed. The artifact: metrics.json and pairs.parquet (every pair with
the reward of chosen and of rejected, `<reward>_chosen` / `<reward>_rejected`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.base import OptionalRef, Ref, StageContext, StageParams, stage_kind
from tasks.logps_report import reports_logps

SETS = ("id", "prompt_shift", "response_shift")


class RewardAccuracyParams(StageParams):
    kind: Literal["reward_accuracy"] = "reward_accuracy"
    id: Ref("table")  # preference pairs (prompt, chosen, rejected) from the training distribution
    prompt_shift: OptionalRef("table") = None
    response_shift: OptionalRef("table") = None
    exrm: OptionalRef("reward_model") = None
    dporm_policy: OptionalRef("model") = None  # the DPO policy ...
    dporm_reference: OptionalRef("model") = None  # ... and the reference it was trained against
    beta: float = Field(0.1, gt=0, description="DPORM's scale (as in the dpo stage); the ranking ignores it")
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(512, ge=2)

    @model_validator(mode="after")
    def _rewards(self):
        if (self.dporm_policy is None) != (self.dporm_reference is None):
            raise ValueError("DPORM needs both dporm_policy and dporm_reference")
        if (self.exrm is None) == (self.dporm_policy is None):
            raise ValueError("reward_accuracy measures one reward: exrm, or dporm_policy and dporm_reference "
                             "(a stage for each, e.g. exrm_acc and dporm_acc, so both log acc_id, ... "
                             "and MLflow's Compare lines them up)")
        return self

    @property
    def reward(self) -> str:
        """Which reward: `exrm` or `dporm`."""
        return "exrm" if self.exrm is not None else "dporm"

    @property
    def reward_input(self) -> str:
        """The input that is the reward being measured (its seed is the one a run is named by)."""
        return "exrm" if self.exrm is not None else "dporm_policy"

    def run_tags(self) -> dict[str, str]:
        return {"alignflow.reward": self.reward}


def wilson_interval(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The 95% Wilson score interval for a proportion (statsmodels' proportion_confint), the one
    interval alignflow reports: reward accuracies and the win rate. Successes may be fractional:
    a tie counts half.

    Wilson rather than the normal (Wald) interval: it stays inside [0, 1] without clipping and
    keeps its coverage near 0 and 1, where accuracies on easy pairs and good win rates live
    (Brown, Cai and DasGupta 2001, "Interval Estimation for a Binomial Proportion").
    """
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def ranking_accuracy(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Fraction of pairs with chosen rewarded above rejected (a tie counts half), and its interval."""
    n = len(chosen)
    correct = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    low, high = wilson_interval(correct, n)
    return {"acc": correct / n, "ci_low": low, "ci_high": high}


@stage_kind("reward_accuracy", RewardAccuracyParams, output="metrics")
@reports_logps
def reward_accuracy(ctx: StageContext) -> dict[str, float]:
    import json
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.tables import read_table

    p: RewardAccuracyParams = ctx.params
    tables = {
        name: read_table(ctx.inputs[name], ["prompt", "chosen", "rejected"], what=f"{name} table").to_pydict()
        for name in SETS if getattr(p, name) is not None
    }
    reward = p.reward

    # Every (set, side) sequence in one list, scored by each model in one pass, in batches of
    # similar length: padding is compute, and chosen and rejected differ in length by design
    # (the brevity judge's pairs are a prompt's shortest sample against its longest).
    keys = [(name, side) for name in tables for side in ("chosen", "rejected")]
    prompts = [x for name, side in keys for x in tables[name]["prompt"]]
    responses = [x for name, side in keys for x in tables[name][side]]
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])) + len(str(responses[i])))
    prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]

    def by_set(values: list[float]) -> dict[str, dict[str, list[float]]]:
        """Scores in `order` back to {set: {side: scores in the table's order}}."""
        flat = [0.0] * len(values)
        for i, value in zip(order, values):
            flat[i] = value
        out, at = {name: {} for name in tables}, 0
        for name, side in keys:
            n = len(tables[name]["prompt"])
            out[name][side], at = flat[at : at + n], at + n
        return out

    batches = math.ceil(len(prompts) / p.batch_size)
    with ctx.progress("scoring pairs", total=batches * (1 if reward == "exrm" else 2)) as bar:
        if reward == "exrm":
            from tasks.models import batched_scores, load_reward_model

            model, tokenizer = load_reward_model(ctx.inputs["exrm"])
            scores = by_set(batched_scores(model, tokenizer, prompts, responses, p.max_length, p.batch_size,
                                           bar.advance))
            del model
        else:
            from tasks.logps import batched_logps
            from tasks.models import load_causal_lm

            logps = {}
            for role in ("dporm_policy", "dporm_reference"):
                model, tokenizer = load_causal_lm(ctx.inputs[role])
                logps[role], _ = batched_logps(model, tokenizer, prompts, responses, p.max_length, p.batch_size,
                                               bar.advance)
                del model
            scores = by_set([p.beta * (lp - ref) for lp, ref in zip(logps["dporm_policy"], logps["dporm_reference"])])

    metrics = {}
    for name in tables:
        result = ranking_accuracy(scores[name]["chosen"], scores[name]["rejected"])
        metrics[f"acc_{name}"] = result["acc"]
        metrics[f"acc_{name}_ci_low"] = result["ci_low"]
        metrics[f"acc_{name}_ci_high"] = result["ci_high"]
    for name, t in tables.items():
        metrics[f"n_{name}"] = float(len(t["prompt"]))
    (ctx.out / "metrics.json").write_text(json.dumps({**metrics, "beta": p.beta}, indent=2))

    columns = {"set": [], "prompt": [], "chosen": [], "rejected": [], f"{reward}_chosen": [], f"{reward}_rejected": []}
    for name, t in tables.items():
        columns["set"] += [name] * len(t["prompt"])
        for column in ("prompt", "chosen", "rejected"):
            columns[column] += t[column]
        for side in ("chosen", "rejected"):
            columns[f"{reward}_{side}"] += scores[name][side]
    pq.write_table(pa.table(columns), ctx.out / "pairs.parquet")
    return metrics
