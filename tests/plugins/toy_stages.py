"""Stage kinds for engine tests, loaded through ALIGNFLOW_PLUGINS (as a user's own kinds are)."""
from __future__ import annotations

import json
import os
import time
from typing import Literal

from tasks.base import Ref, StageParams, stage_kind


class SlowCountParams(StageParams):
    kind: Literal["toy_slow_count"] = "toy_slow_count"
    data: Ref("table")
    seconds: float = 3.0
    counter: str  # a file that gets one line per execution, so a test can count them


@stage_kind("toy_slow_count", SlowCountParams, output="metrics")
def slow_count(ctx):
    with open(ctx.params.counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(ctx.params.seconds)
    (ctx.out / "metrics.json").write_text(json.dumps({"done": 1}))
    return {"done": 1.0}


class FailParams(StageParams):
    kind: Literal["toy_fail"] = "toy_fail"
    data: Ref("table")


@stage_kind("toy_fail", FailParams, output="metrics")
def fail(ctx):
    raise RuntimeError("toy stage failing on purpose")
