"""What a stage reports of its log-prob fast paths, and its recompute when one stops agreeing.

tasks/logps.py decides which fast paths are right for a model (its probe); this module keeps the
record of one stage execution, so that every stage kind that computes log-probs reports the same
way: a stage function decorated with `reports_logps` runs with a `StageReport` open, every fast
path refused for any model it scores with is warned about once in that stage's log, and its
metrics get `logps_fallback` (the number of refusals), from which flows tag the MLflow run
`alignflow.logps_fallback`.

A verdict holds for the weights it was made on. Training re-probes at every checkpoint and when it
ends (tasks/logps.py's `recheck`); a fast path that disagrees then raises `FastPathDrift`, before
the checkpoint or the artifact is written. `reports_logps` then runs the stage again with that path
off (the plain full-logits computation): from the last checkpoint, which was verified when it was
taken, or from the start. Nothing computed on the wrong path is committed.

Torch-free, so that stage modules import it at no cost (`alignflow plan` imports them all).
"""
from __future__ import annotations

import contextvars
import functools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tasks.logps")
INSTEAD = "the plain computation is used instead"  # the end of every refusal's warning


class FastPathDrift(RuntimeError):
    """A fast path accepted on a model's earlier weights disagrees with the plain path on its
    current ones. Outside `reports_logps` it fails the stage (exit 1), naming the path."""

    def __init__(self, paths: dict[str, str], when: str):
        self.paths, self.when = paths, when  # path -> how it disagrees now (a sentence naming it)
        super().__init__(f"{when}: a fast path verified on the earlier weights is wrong now: {'; '.join(paths.values())}")


@dataclass
class StageReport:
    """One stage execution's record of refused fast paths (see the module docstring)."""

    kind: str
    refused: dict[str, None] = field(default_factory=dict)  # the messages, in order, once each
    plain: set[str] = field(default_factory=set)  # paths turned off after a drift, for the rest of the stage

    def refuse(self, message: str) -> None:
        if message not in self.refused:
            self.refused[message] = None
            log.warning("%s: %s; %s", self.kind, message, INSTEAD)

    def metrics(self) -> dict[str, float]:
        return {"logps_fallback": float(len(self.refused))} if self.refused else {}


_CURRENT: contextvars.ContextVar[StageReport | None] = contextvars.ContextVar("logps_report", default=None)


def current() -> StageReport | None:
    """The report of the stage running in this context, if any."""
    return _CURRENT.get()


def reports_logps(run):
    """Decorate a stage function that computes log-probs (see the module docstring)."""

    @functools.wraps(run)
    def stage(ctx):
        report = StageReport(getattr(ctx.params, "kind", run.__name__))
        token = _CURRENT.set(report)
        try:
            while True:
                try:
                    metrics = run(ctx)
                    break
                except FastPathDrift as drift:
                    if set(drift.paths) <= report.plain:  # already off: nothing left to turn off
                        raise
                    report.plain |= set(drift.paths)
                    for why in drift.paths.values():
                        report.refuse(f"{drift.when}: {why}; the stage is recomputed from its last verified "
                                      "checkpoint (or its start)")
                    _empty(Path(ctx.out))
        finally:
            _CURRENT.reset(token)
        return {**(metrics or {}), **report.metrics()}

    return stage


def _empty(folder: Path) -> None:
    """Remove whatever a stopped attempt wrote into the stage's output folder."""
    for child in folder.iterdir() if folder.is_dir() else ():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
