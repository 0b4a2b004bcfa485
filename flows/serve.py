"""Scheduled runs: `alignflow serve` puts a pipeline on a Prefect server's schedule.

Each scheduled run looks in the store for the rounds already finished (every stage execution of
round r whole in the store) and runs the pipeline with `rounds.serve.add` more, up to
`rounds.serve.max` (default: rounds.count). Finished rounds are cache hits, so a run computes only
its new rounds; a run that finds every round done is all hits. The count comes from the store,
not from a counter kept somewhere, so a failed or cancelled run simply leaves its round to the
next one.

Schedules need a Prefect server (its scheduler creates the runs; the ephemeral API that
`alignflow run` starts cannot): `alignflow server` starts one. `serve` registers a deployment on
it and executes its runs in this process, at most one at a time: a run due while another is still
going is cancelled (the next one picks up the work, as above).
"""
from __future__ import annotations

from prefect import flow

from flows.graph import Node
from flows.home import store_root
from flows.keys import resolve
from flows.spec import Spec, load_spec
from flows.store import Store


def finished_rounds(nodes: list[Node], store: Store) -> int:
    """How many rounds, from round 1 on, have every stage execution whole in the store."""
    last = max((n.round for n in nodes), default=0)
    for r in range(1, last + 1):
        if any(store.check(n.kind, n.key) is not None for n in nodes if n.round == r):
            return r - 1
    return last


def next_rounds(spec_file: str, overrides: list[str]) -> tuple[Spec, int, int]:
    """(the spec, rounds finished, rounds the next scheduled run covers) under its serve rule."""
    spec = load_spec(spec_file, overrides)
    most = spec.rounds.serve_max
    done = finished_rounds(resolve(load_spec(spec_file, overrides, most)), Store(store_root(spec.store)))
    return spec, done, min(most, done + spec.rounds.serve.add)


@flow(name="alignflow-scheduled", validate_parameters=False)
def scheduled_pipeline(spec_file: str, overrides: list[str] | None = None) -> dict:
    """One scheduled run: the pipeline with one more step of iteration than the store holds."""
    from flows.console import console
    from flows.pipeline import pipeline

    spec, done, rounds = next_rounds(spec_file, overrides or [])
    console.print(f"[bold]{spec.name}[/]: {done} round(s) finished; this run covers {rounds}")
    return pipeline(spec_file, overrides or [], rounds)


def serve(spec_file: str, overrides: list[str], cron: str | None, interval: float | None) -> None:
    """Register the schedule on the Prefect server at PREFECT_API_URL and execute its runs here."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    spec = load_spec(spec_file, overrides)
    scheduled_pipeline.serve(
        name=spec.name,
        cron=cron,
        interval=interval,
        parameters={"spec_file": spec_file, "overrides": list(overrides)},
        # Never two runs of one pipeline at once; one due meanwhile is dropped, not queued.
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,  # runs from any folder, wherever alignflow is installed
        description=f"alignflow pipeline {spec.name} ({spec_file}), one more round per run",
        tags=["alignflow"],
    )
