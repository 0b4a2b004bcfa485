"""Stage kinds for the hostile-input tests (ALIGNFLOW_PLUGINS=hostile_stages)."""
from __future__ import annotations

import json
import os
import time
from typing import Literal

from tasks.base import BadInput, OptionalRef, Ref, StageParams, stage_kind


class LateBadInputParams(StageParams):
    """A stand-in for a remote source whose data turns out malformed only once it is read."""

    kind: Literal["toy_late_bad_input"] = "toy_late_bad_input"
    seconds: float = 1.0


@stage_kind("toy_late_bad_input", LateBadInputParams, output="table")
def late_bad_input(ctx):
    time.sleep(ctx.params.seconds)
    raise BadInput("hub://someone/data", "row 7", "a value for 'chosen'")


class StepsParams(StageParams):
    """A "training" of `steps` steps, each logged (a step is where a run can stop it)."""

    kind: Literal["toy_steps"] = "toy_steps"
    data: Ref("table")
    steps: int = 20
    seconds: float = 0.1
    counter: str | None = None  # a file that gets one line per execution
    after: OptionalRef("metrics") = None  # a stage that must finish first (its output is not read)


@stage_kind("toy_steps", StepsParams, output="metrics")
def steps(ctx):
    if ctx.params.counter:
        with open(ctx.params.counter, "a") as f:
            f.write(f"{os.getpid()} {ctx.rows}\n")
    for step in range(ctx.params.steps):
        time.sleep(ctx.params.seconds)
        ctx.log_metrics({"loss": 1.0 / (step + 1)}, step)
    (ctx.out / "metrics.json").write_text(json.dumps({"done": 1}))
    return {"done": 1.0}


class ShardCountParams(StageParams):
    """A row-parallel stage that counts its executions (one line per shard or whole run)."""

    kind: Literal["toy_shard_count"] = "toy_shard_count"
    data: Ref("table")
    shards: int = 1
    batch_size: int = 1
    seconds: float = 0.5
    counter: str


@stage_kind("toy_shard_count", ShardCountParams, output="table", shard_input="data")
def shard_count(ctx):
    from tasks.base import shard_rows
    from tasks.tables import read_table, write_table

    part, _ = shard_rows(read_table(ctx.inputs["data"]), ctx)
    with open(ctx.params.counter, "a") as f:
        f.write(f"{os.getpid()} {ctx.rows}\n")
    time.sleep(ctx.params.seconds)
    write_table(part, ctx.out)
    return {"rows": float(part.num_rows)}


class WriteParams(StageParams):
    """A stage that writes `mib` MiB into its artifact, a step per 256 KiB (a full disk's test)."""

    kind: Literal["toy_write"] = "toy_write"
    data: Ref("table")
    mib: float = 1.0


@stage_kind("toy_write", WriteParams, output="metrics")
def write(ctx):
    chunk = os.urandom(256 << 10)
    with open(ctx.out / "data.bin", "wb") as f:
        for step in range(int(ctx.params.mib * 4)):
            f.write(chunk)
            f.flush()
            ctx.log_metrics({"written": float(step)}, step)
    return {"mib": ctx.params.mib}
