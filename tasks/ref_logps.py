"""ref_logps: reference log-probs for an existing preference table, so `dpo` can train on it offline.

The `pairs` stage builds pairs from scored candidates and adds the reference log-probs; this stage
adds the same columns (ref_chosen_logp, ref_rejected_logp, chosen_tokens, rejected_tokens; the
same code, tasks/pairs.py's `add_reference_logps`) to a table that already holds prompt, chosen and
rejected, e.g. the gold-labelled pairs a reward model trains on. DPO then learns from exactly the
data the explicit reward model learned from (pipelines/exrm_vs_dporm.yaml).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import BadInput, Ref, StageContext, StageParams, stage_kind
from tasks.logps_report import reports_logps
from tasks.pairs import add_reference_logps


class RefLogpsParams(StageParams):
    kind: Literal["ref_logps"] = "ref_logps"
    pairs: Ref("table")  # prompt, chosen, rejected (other columns are kept)
    reference: Ref("model")
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(512, ge=2, description="must match the trainer's max_length")
    strict: bool = Field(False, description="a text that tokenizes to nothing is an error, not a dropped pair")


@stage_kind("ref_logps", RefLogpsParams, output="table")
@reports_logps
def ref_logps(ctx: StageContext) -> dict[str, float]:
    from tasks.tables import read_table, write_table

    p: RefLogpsParams = ctx.params
    rows = read_table(ctx.inputs["pairs"], ["prompt", "chosen", "rejected"], what="pairs table").to_pydict()
    if not rows["prompt"]:
        raise BadInput(str(ctx.inputs["pairs"] / "data.parquet"), "rows", "at least one pair")
    logps_metrics = add_reference_logps(rows, ctx.inputs["reference"], p.max_length, p.batch_size, ctx.progress,
                                        str(ctx.inputs["pairs"] / "data.parquet"), p.strict)
    write_table(rows, ctx.out)
    n = len(rows["prompt"])
    return {
        "pairs": float(n),
        "mean_ref_chosen_logp": sum(rows["ref_chosen_logp"]) / n,
        "mean_ref_rejected_logp": sum(rows["ref_rejected_logp"]) / n,
        **logps_metrics,
    }
