"""slice: consecutive rows of a table. `rounds.fresh` adds one per round (round r reads rows
(r-1)*n .. r*n-1 of its table), so each round of an iterative pipeline trains on new prompts.
With `shuffle`, the rows are first put in an order drawn from the stage's seed: two slices with
the same seed and table are disjoint, so they split it (a seeded train / held-out split)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import BadInput, Ref, StageContext, StageParams, stage_kind


class SliceParams(StageParams):
    kind: Literal["slice"] = "slice"
    table: Ref("table")
    start: int = Field(0, ge=0, description="first row (0-based)")
    rows: int = Field(ge=1)
    shuffle: bool = Field(False, description="slice the rows in an order drawn from the stage's seed")


@stage_kind("slice", SliceParams, output="table")
def slice_rows(ctx: StageContext) -> dict[str, float]:
    from tasks.tables import read_table, write_table

    p: SliceParams = ctx.params
    table = read_table(ctx.inputs["table"], [], what="table")
    end = p.start + p.rows
    if end > table.num_rows:
        raise BadInput(str(ctx.inputs["table"]), f"{p.table} rows {p.start + 1}-{end}",
                       f"the table has {table.num_rows} rows; a slice of {p.rows} from row {p.start + 1} needs "
                       f"{end} (with rounds.fresh: enlarge the table, or fewer rows or rounds)")
    if p.shuffle:
        import numpy as np

        order = np.random.default_rng(ctx.seed).permutation(table.num_rows)
        write_table(table.take(order[p.start:end]), ctx.out)
    else:
        write_table(table.slice(p.start, p.rows), ctx.out)
    return {"rows": float(p.rows), "start": float(p.start)}
