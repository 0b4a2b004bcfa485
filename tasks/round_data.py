"""round_data: what a round's trainer learns from under `rounds.data` (flows/graph.py adds one per
round r > 1): round r's table joined with a seeded uniform `fraction` of the earlier rounds' rows
(cumulative: fraction 1, all of them; replay: a part).

Earlier rounds' reference log-probs were computed under their own round's reference. While the
reference is fixed they hold; when it moves (rounds.reference: previous or mix), `reference` is
round r's, and the earlier rows' log-probs are computed again under it (tasks/pairs.py's
add_reference_logps, as the pairs stage computes them), so every row of a batch compares the
policy with one reference.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import OptionalRef, Ref, StageContext, StageParams, stage_kind


class RoundDataParams(StageParams):
    kind: Literal["round_data"] = "round_data"
    current: Ref("table") = "pairs"  # earlier rounds' tables are the inputs round_1, round_2, ...
    reference: OptionalRef("model") = None
    fraction: float = Field(1.0, gt=0, le=1, description="the share of the earlier rounds' rows kept")
    batch_size: int = Field(64, ge=1, description="for the reference log-probs")
    max_length: int = Field(512, ge=2, description="as the stage that computed the current round's")
    max_prompt_length: int | None = Field(None, ge=1)
    strict: bool = False


def earlier_rounds(inputs: dict) -> list:
    """The inputs round_1, round_2, ... in round order."""
    return [inputs[name] for name in sorted((n for n in inputs if n.startswith("round_")), key=lambda n: int(n[6:]))]


def pick_rows(count: int, fraction: float, seed: int) -> list[int]:
    """A seeded uniform round(fraction * count) of range(count), in order (all of them at 1)."""
    import numpy as np

    if fraction >= 1:
        return list(range(count))
    keep = round(fraction * count)
    return sorted(np.random.default_rng(seed).choice(count, keep, replace=False).tolist())


@stage_kind("round_data", RoundDataParams, output="table")
def round_data(ctx: StageContext) -> dict[str, float]:
    import pyarrow as pa

    from tasks.pairs import add_reference_logps
    from tasks.tables import read_table, write_table

    p: RoundDataParams = ctx.params
    current = read_table(ctx.inputs["current"], what="this round's table")
    tables = [read_table(folder, what="an earlier round's table") for folder in earlier_rounds(ctx.inputs)]
    earlier = pa.concat_tables(tables, promote_options="permissive") if tables else current.slice(0, 0)
    earlier = earlier.take(pick_rows(earlier.num_rows, p.fraction, ctx.seed))
    metrics = {}
    if p.reference is not None and earlier.num_rows:
        rows = earlier.to_pydict()
        metrics = add_reference_logps(rows, ctx.inputs["reference"], p.max_length, p.batch_size, ctx.progress,
                                      "the earlier rounds' pairs", p.strict, p.max_prompt_length)
        earlier = pa.table(rows)
    joined = pa.concat_tables([earlier.select(current.column_names).cast(current.schema), current])
    write_table(joined, ctx.out)
    return {"rows": float(joined.num_rows), "rows_current": float(current.num_rows),
            "rows_earlier": float(earlier.num_rows), **metrics}
