"""Stage kinds for engine tests, loaded through ALIGNFLOW_PLUGINS (as a user's own kinds are)."""
from __future__ import annotations

import json
import os
import time
from typing import Literal

from tasks.base import OptionalRef, Ref, StageParams, stage_kind


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


class ToyPolicyParams(StageParams):
    """A stand-in "model": a quality number that each round adds `gain` to."""

    kind: Literal["toy_policy"] = "toy_policy"
    previous: OptionalRef("model") = None
    gain: float = 0.0
    fail: bool = False  # raise instead (a sweep's failing variant)
    counter: str | None = None  # a file that gets one line per execution


@stage_kind("toy_policy", ToyPolicyParams, output="model")
def toy_policy(ctx):
    if ctx.params.counter:
        with open(ctx.params.counter, "a") as f:
            f.write(f"{ctx.params.gain} {ctx.seed}\n")
    if ctx.params.fail:
        raise RuntimeError("toy policy failing on purpose")
    quality = ctx.params.gain
    if ctx.params.previous:
        quality += json.loads((ctx.inputs["previous"] / "quality.json").read_text())["quality"]
    (ctx.out / "quality.json").write_text(json.dumps({"quality": quality}))
    return {"quality": quality}


class ToyMetricsParams(StageParams):
    """Returns the metrics it is given (reporting tests need no ML): plus, for the metrics named
    in `shift`, the quality of `policy` (so an evaluation improves round by round)."""

    kind: Literal["toy_metrics"] = "toy_metrics"
    metrics: dict[str, float] = {}
    policy: OptionalRef("model") = None
    shift: list[str] = []
    per_seed: dict[str, float] = {}  # metric -> added once per unit of the stage's seed
    reward: Literal["exrm", "dporm"] | None = None  # a stand-in for reward_accuracy: its run's tag

    def run_tags(self) -> dict[str, str]:
        return {"alignflow.reward": self.reward} if self.reward else {}


@stage_kind("toy_metrics", ToyMetricsParams, output="metrics")
def toy_metrics(ctx):
    metrics = dict(ctx.params.metrics)
    metrics.update({name: metrics[name] + step * ctx.seed for name, step in ctx.params.per_seed.items()})
    if ctx.params.policy:
        quality = json.loads((ctx.inputs["policy"] / "quality.json").read_text())["quality"]
        metrics.update({name: metrics[name] + quality for name in ctx.params.shift})
    (ctx.out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


class RendezvousParams(StageParams):
    """Writes `folder/<name>`, then waits (up to `timeout` seconds) until every stage named in
    `others` has written its own: it finishes only where those stages run at the same time."""

    kind: Literal["toy_rendezvous"] = "toy_rendezvous"
    name: str
    others: list[str]
    folder: str
    timeout: float = 120.0


@stage_kind("toy_rendezvous", RendezvousParams, output="metrics")
def rendezvous(ctx):
    from pathlib import Path

    folder = Path(ctx.params.folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ctx.params.name).write_text(f"{os.getpid()}\n")
    started = time.time()
    while not all((folder / other).exists() for other in ctx.params.others):
        if time.time() - started > ctx.params.timeout:
            raise RuntimeError(f"{ctx.params.name}: {ctx.params.others} never ran alongside")
        time.sleep(0.2)
    (ctx.out / "metrics.json").write_text(json.dumps({"waited": time.time() - started}))
    return {"waited": time.time() - started}
