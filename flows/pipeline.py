"""The pipeline flow: each stage execution is a cached Prefect task over the artifact store.

Prefect's cache is keyed on the stage key (flows/keys.py), its result is a small JSON reference
(uri, key, fingerprint, metrics), and SERIALIZABLE isolation with a file lock per key makes two
runs that need the same artifact compute it once. A cached result is only trusted while its
artifact is whole: the flow checks the store first and refreshes the cache entry otherwise.
MLflow is written from the flow (and, for live step metrics, through an explicit run id).

A sweep (flows/sweep.py) is one flow run over the union of its variants' graphs: one task per
stage key, so a stage that several variants need is computed once. In MLflow it is a parent run,
a child run per variant, and under each variant a stage run per execution, as a plain run has:
a shared stage is recorded under the first variant that needs it, and as a cache hit (with
`alignflow.original_run_id`) under the others. A variant whose stage fails stops there; the
others go on, and the flow raises SweepFailed at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from importlib import metadata

from prefect import flow, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.states import Cancelled as CancelledState
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.transactions import IsolationLevel

from flows import console as term
from flows import stopping
from flows.errors import StageFailed, SweepFailed
from flows.graph import Node, downstream
from flows.home import store_root, tracking_uri
from flows.locks import LABELS, CrashSafeLockManager, file_lock
from flows.report import headline_by_round, log_report
from flows.store import Store, pid_alive, plain
from flows.sweep import Variant, expand
from flows.tracking import (PIPELINE_RUN_TAG, StepLogger, Tracker, changed_settings, get_tracker, pipeline_run_name,
                            run_name)
from tasks import load_stage_kinds
from tasks.base import BadInput, StageContext

HISTORY = "metrics_history.jsonl"  # step metrics, kept with the artifact


@dataclass
class StageJob:
    node: Node
    store_root: str
    force: bool = False
    tracker: Tracker | None = None
    mlflow_run_id: str | None = None
    rows: tuple[int, int] | None = None  # a shard's rows of its kind's shard_input table



class StageKeyPolicy(CachePolicy):
    """Prefect's cache key is the stage key: config, inputs, code and seed; never the run id."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return inputs["job"].node.key


def cache_policy(root: str) -> CachePolicy:
    prefect_dir = Store(root).local_root / "_prefect"  # a remote store's: local (file locks)
    return StageKeyPolicy().configure(
        key_storage=str(prefect_dir / "records"),
        lock_manager=CrashSafeLockManager(prefect_dir / "locks"),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )


def forget_foreign_records(root: str, keys: list[str]) -> None:
    """Drop Prefect cache records this home cannot read back.

    A record names its result by absolute path, under the Prefect home that wrote it. A home
    copied or moved elsewhere, or a store shared by two homes, holds records naming results that
    are elsewhere or absent, and Prefect fails reading them. Such a record goes: the task then
    runs, finds its artifact whole in the store (the manifest is the truth), and is a hit, and
    Prefect writes a record this home can read."""
    from prefect.settings import get_current_settings

    records = Store(root).local_root / "_prefect" / "records"
    results = Path(get_current_settings().results.local_storage_path).expanduser().resolve()
    for key in keys:
        record = records / plain(key)
        try:
            storage_key = json.loads(record.read_text()).get("storage_key")  # the record is its metadata
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError):
            storage_key = None
        result = Path(storage_key) if isinstance(storage_key, str) else None
        if result is None or not result.is_relative_to(results) or not result.is_file():
            record.unlink(missing_ok=True)


def reference(store: Store, node: Node, manifest: dict, computed: bool, seconds: float = 0.0) -> dict:
    return {"uri": str(store.path(node.kind, node.key)), "key": node.key, "kind": node.kind,
            "fingerprint": manifest["fingerprint"], "metrics": manifest.get("metrics", {}),
            "mlflow_run_id": manifest.get("mlflow_run_id"), "computed": computed,
            "final_step": manifest.get("final_step", 0),
            "seconds": round(seconds, 3)}


# Cached stages resolve concurrently, but one stage at a time computes in a process: two
# trainings sharing a GPU (or two cores) by surprise helps nobody.
COMPUTING = threading.Semaphore(1)


def build(job: StageJob, inputs: dict[str, dict], compute=None) -> dict:
    """Compute one stage's artifact unless it is already whole in the store; return its reference.
    `inputs` maps each reference parameter to its input artifact's reference; `compute(ctx)`
    replaces the kind's own function (merging shards)."""
    node, store = job.node, Store(job.store_root)
    if not job.force and store.check(node.kind, node.key, download=True) is None:  # remote: hashes too
        return reference(store, node, store.manifest(node.kind, node.key), computed=False)
    # One computation per key across processes, shards included (Prefect's own lock covers only
    # the cached tasks); the kernel frees it if this process dies.
    with file_lock(store.local_root / "_locks" / plain(f"{node.kind}.{node.key}.lock"),
                   what=f"{node.label} ({node.key[:12]}), which another run is computing"):
        if not job.force and store.check(node.kind, node.key) is None:  # another run just built it
            return reference(store, node, store.manifest(node.kind, node.key), computed=False)
        return _compute(job, inputs, compute)


def _compute(job: StageJob, inputs: dict[str, dict], compute=None) -> dict:
    node, store = job.node, Store(job.store_root)
    kind = load_stage_kinds()[node.kind]
    steps = StepLogger(job.tracker, job.mlflow_run_id)

    def log_step(metrics: dict[str, float], step: int) -> None:  # each step is a point to stop at
        stopping.check()
        steps(metrics, step)

    # Sources read files or the network, and run beside a training: a remote source's bad data
    # is then found (and the run stopped) without waiting for the training to finish.
    gate = contextlib.nullcontext() if node.section == "datasets" else COMPUTING
    with gate, stopping.checked(), store.build(node.kind, node.key) as tmp, stopping.computing(node.label):
        started = time.time()
        checkpoints = store.checkpoints(node.kind, node.key)
        # Inputs as local folders: on a remote store, verified copies in the local cache.
        local = {p: store.local_path(ref["kind"], ref["key"]) for p, ref in inputs.items()}
        ctx = StageContext(out=tmp, inputs=local,
                           params=node.params, seed=node.recipe["seed"],
                           log_metrics=log_step, progress=stoppable_progress, checkpoints=checkpoints, rows=job.rows)
        try:
            metrics = {k: float(v) for k, v in ((compute or kind.run)(ctx) or {}).items()}
        except BadInput as err:  # exit 2, which writes nothing: every stage still computing stops
            stopping.request(f"bad input data: {err}", 2, error=err)
            raise
        finally:
            if not stopping.requested():  # a stopping process exits next: no time to spend on this
                release_memory()
        stopping.check()
        steps.flush()
        if steps.history:
            (tmp / HISTORY).write_text("".join(json.dumps(row) + "\n" for row in steps.history))
        manifest = store.commit(tmp, node.kind, node.key, {
            "stage": node.name, "round": node.round, "config": node.recipe["config"],
            "seed": node.recipe["seed"], "code": node.recipe["code"], "metrics": metrics,
            "inputs": {p: {"key": r["key"], "fingerprint": r["fingerprint"]} for p, r in inputs.items()},
            "versions": _versions(), "mlflow_run_id": job.mlflow_run_id,
            # Final metrics go one step past the last training step, so that MLflow's "latest
            # value" of a metric is the stage's final summary, not its last minibatch.
            "final_step": steps.history[-1]["step"] + 1 if steps.history else 0,
        })
    shutil.rmtree(checkpoints, ignore_errors=True)  # the artifact is in place: nothing to resume
    if job.rows is None:  # a whole stage (not one shard of it)
        stopping.kept(node.label)
    return reference(store, node, manifest, computed=True, seconds=time.time() - started)


class _StoppableBar:
    def __init__(self, bar):
        self.bar = bar

    def advance(self, n: int = 1) -> None:  # each advance is a point to stop at, as each step is
        stopping.check()
        self.bar.advance(n)


@contextlib.contextmanager
def stoppable_progress(description: str, total: int | None = None):
    with term.progress(description, total) as bar:
        yield _StoppableBar(bar)


def cancellable(fn):
    """A task whose stage stopped (stopping.Cancelled) ends Cancelled in Prefect, not Failed."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except stopping.Cancelled as err:
            return CancelledState(message=str(err))
    return wrapper


def release_memory() -> None:
    """Give what a finished stage freed back to the system, so that stages run one after another
    in one process hold one stage's memory, not the sum of all.

    Stages run in Prefect's worker threads, and glibc gives each thread its own malloc arena; a
    model's freed tensors (most below glibc's 32 MB mmap threshold) stay in those arenas, mapped.
    Measured on pipelines/exrm_vs_dporm_smollm2_ci.yaml (SmolLM2-135M, float32): without this the
    process grew by about one model per model stage, to 14 GB and an OOM kill (README, "EXRM vs
    DPORM"). gc first: a reference cycle can hold a model until the collector runs. (On a GPU,
    torch's own cache keeps freed blocks for the next stage, which is what it is for.)
    """
    import ctypes
    import gc

    gc.collect()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # every arena, not only the main one's top


@task(persist_result=True, result_serializer="json")
@cancellable
def run_stage(job: StageJob, inputs: dict[str, dict]) -> dict:
    return build(job, inputs)


# ---- sharded executions: a row-parallel stage split over the task runner's workers ----------
#
# A stage whose kind maps over a table's rows (StageKind.shard_input: generate's prompts, score's
# candidates) and whose params ask for `shards` runs as that many shard tasks, each its own
# artifact (key `<key>-shard<i>of<n>`, so a failed run keeps the finished shards), then a merge
# task that concatenates them, in order, into the stage's artifact. Shard boundaries fall on
# multiples of the stage's batch_size: every batch is the one an unsharded run computes (and
# generation seeds each batch by its first prompt), so the merged table is the unsharded one.


def shard_ranges(n_rows: int, shards: int, multiple: int) -> list[tuple[int, int]]:
    """Up to `shards` consecutive row ranges covering n_rows, each starting on a multiple of `multiple`."""
    size = max(1, math.ceil(math.ceil(n_rows / shards) / multiple)) * multiple
    return [(start, min(n_rows, start + size)) for start in range(0, n_rows, size)]


def shard_job(job: StageJob, index: int, count: int, rows: tuple[int, int] | None = None) -> StageJob:
    node = dataclasses.replace(job.node, key=f"{job.node.key}-shard{index}of{count}")
    return dataclasses.replace(job, node=node, rows=rows)


@task(persist_result=True, result_serializer="json")
@cancellable
def run_shard(job: StageJob, inputs: dict[str, dict], index: int, count: int) -> dict | None:
    """Shard `index` of `count`: None when the table has too few batches to give it any rows."""
    from tasks.tables import read_table

    node, store = job.node, Store(job.store_root)
    if not job.force and store.check(node.kind, node.key) is None:
        return None  # the merged artifact is whole: the merge returns it
    param = load_stage_kinds()[node.kind].shard_input
    ref = inputs[param]
    n_rows = read_table(store.local_path(ref["kind"], ref["key"]), []).num_rows
    ranges = shard_ranges(n_rows, count, getattr(node.params, "batch_size", 1))
    if index >= len(ranges):
        return None
    return build(shard_job(job, index, count, ranges[index]), inputs)


@task(persist_result=True, result_serializer="json")
@cancellable
def merge_shards(job: StageJob, inputs: dict[str, dict], shards: list[dict | None]) -> dict:
    """The stage's artifact: its shards' tables, concatenated in order."""

    def concatenate(ctx: StageContext) -> dict[str, float]:
        import pyarrow as pa

        from tasks.tables import read_table, write_table

        store = Store(job.store_root)
        parts = [read_table(store.local_path(s["kind"], s["key"]), []) for s in shards if s]
        table = pa.concat_tables(parts)
        write_table(table, ctx.out)
        summarize = load_stage_kinds()[job.node.kind].summarize  # the metrics an unsharded run reports
        return {**(summarize(table.to_pydict()) if summarize else {}), "shards": float(len(parts))}

    return build(job, inputs, compute=concatenate)


# Which process runs a pipeline run: a later run can tell a run whose owner died (SIGKILL, the
# OOM killer) from one still going, and end the dead one's runs as KILLED.
OWNER_TAG = "alignflow.owner"
OWNER = f"{platform.node()}|{os.getpid()}"


def close_orphaned_runs(tracker: Tracker) -> None:
    """End as KILLED the runs of this experiment left RUNNING by a dead process of this host."""
    host = platform.node()
    for run in tracker.client.search_runs([tracker.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=5000):
        owner_host, _, pid = run.data.tags.get(OWNER_TAG, "").partition("|")
        if owner_host == host and pid.isdigit() and not pid_alive(int(pid)):
            tracker.end(run.info.run_id, "KILLED")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("alignflow", "torch", "transformers", "accelerate", "peft", "datasets"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


@flow(name="alignflow", validate_parameters=False, task_runner=ThreadPoolTaskRunner(max_workers=8))
def pipeline(spec_file: str, overrides: list[str] | None = None, rounds: int | None = None,
             force: list[str] | None = None, sweep: list[str] | None = None, seeds: int | None = None) -> dict:
    """Run a spec, or every variant of a sweep: its stages on this flow's threads (runner: local),
    or in a subflow on Ray workers (runner: ray). Parameters are the spec file and options, not
    objects, so a deployment can run it as well."""
    args = (spec_file, overrides, rounds, force, sweep, seeds)
    spec = expand(spec_file, overrides or [], rounds, sweep or [], seeds).spec
    try:
        if spec.runner.kind == "local":
            return run_stages(*args)
        on_ray = flow(run_stages, name="alignflow-stages", validate_parameters=False)
        return on_ray.with_options(task_runner=ray_task_runner(spec.runner))(*args)
    except stopping.Stopped as stopped:  # Prefect records the run as Cancelled; the caller gets `stopped`
        return CancelledState(message=str(stopped), data=stopped)


def ray_task_runner(runner):
    """prefect-ray's task runner for the spec's `runner` block: a cluster's address, or a Ray
    instance started here (its workers use this Python environment, where alignflow is installed)."""
    from prefect_ray import RayTaskRunner

    if runner.address:
        return RayTaskRunner(address=runner.address)
    return RayTaskRunner(init_kwargs={"num_cpus": runner.num_cpus} if runner.num_cpus else {})


@dataclass
class VariantRecord:
    """One variant's MLflow runs as the flow fills them: its pipeline run (a plain run's parent, or
    the variant's child of the sweep's parent) and a stage run per execution."""

    variant: Variant
    run_id: str
    stage_runs: dict[str, str] = dataclasses.field(default_factory=dict)  # node id -> MLflow run id
    refs: dict[str, dict] = dataclasses.field(default_factory=dict)  # node id -> its artifact's reference
    summary: list[dict] = dataclasses.field(default_factory=list)
    headline: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    failure: StageFailed | None = None


def run_stages(spec_file: str, overrides: list[str] | None = None, rounds: int | None = None,
               force: list[str] | None = None, sweep: list[str] | None = None, seeds: int | None = None) -> dict:
    """Submit every stage execution, one task per key, with its inputs as upstream futures
    (Prefect orders them and resolves cached ones concurrently), then record each in MLflow, in
    order, as it finishes."""
    from prefect.runtime import flow_run

    expanded = expand(spec_file, overrides or [], rounds, sweep or [], seeds)
    spec, is_sweep = expanded.spec, expanded.is_sweep
    unique = expanded.unique()
    stopping.reset()
    stopping.reassert_signal_handlers()  # Prefect's flow engine put its own SIGTERM handler in place
    forced = {n.key for v in expanded.variants for n in v.nodes if n.id in downstream(v.nodes, set(force or []))}
    root = store_root(spec.store)
    store = Store(root)
    store.claim()  # checked by the CLI: an empty or new folder, or a store
    kinds = load_stage_kinds()
    store.sweep(kinds)
    LABELS.update({node.key: node.label for node in unique})
    forget_foreign_records(root, [node.key for node in unique])
    policy = cache_policy(root)
    tracker = get_tracker(tracking_uri(spec.tracking_uri), spec.name)
    close_orphaned_runs(tracker)
    tags = {"alignflow.spec": spec.file, "alignflow.spec_hash": spec.hash,
            "alignflow.flow_run_id": str(flow_run.id), "alignflow.rounds": str(spec.rounds.count), OWNER_TAG: OWNER}
    variants = expanded.variants
    changed = changed_settings(overrides or [], rounds)
    parent = tracker.start_run(pipeline_run_name(spec.name, variants=len(variants) if is_sweep else 0, changed=changed),
                               {**tags, "alignflow.sweep": str(len(variants))} if is_sweep else tags)
    tracker.log_text(parent, _dump_yaml(spec.resolved), "spec.yaml")
    records = [VariantRecord(v, parent if not is_sweep else _start_variant(tracker, parent, v)) for v in variants]
    needers: dict[str, list[tuple[VariantRecord, Node]]] = {}  # key -> (variant, execution), in variant order
    for record in records:
        for node in record.variant.nodes:
            needers.setdefault(node.key, []).append((record, node))
    futures, failed, computed, recorded, current = {}, set(), set(), set(), None
    flow_run_id = flow_run.id  # read here: the hard stop's thread has no flow run context

    def end_in_mlflow() -> None:  # a hard stop's records: what has not finished was killed
        for record in records:
            for run_id in list(record.stage_runs.values()):
                tracker.end(run_id, "KILLED")
            if record.run_id != parent:
                tracker.end(record.run_id, "KILLED")
        tracker.end(parent, "KILLED")

    def end_in_prefect() -> None:
        _cancel_in_prefect(flow_run_id, list(futures.values()), stopping.requested().reason)

    def finished(node: Node, ref: dict) -> None:
        """A key's stage is done: record it in every variant that needs it."""
        users = needers[node.key]
        if ref["computed"]:
            computed.add(node.key)
        for i, (record, execution) in enumerate(users):  # the first computed it; the rest share it
            mine = ref if i == 0 else {**ref, "computed": False}
            line = _log_stage(execution, mine, record.refs, tracker, record.stage_runs.pop(execution.id))
            if i == 0:
                term.console.print(line + _shared(users, records))
            if (store.last_recipe(record.variant.recipes, execution.id) or {}).get("key") != execution.key:
                store.record_recipe(record.variant.recipes, execution.id, execution.key, execution.recipe)
            record.refs[execution.id] = mine
            record.summary.append(_summary_row(execution, "hit" if i or not ref["computed"] else "miss", mine))
        recorded.add(node.key)
        stopping.kept(node.label)

    stopping.on_hard_stop(end_in_mlflow)
    stopping.on_hard_stop(end_in_prefect)
    try:
        by_id = {record.run_id: {n.id: n for n in record.variant.nodes} for record in records}
        for node in unique:
            for record, execution in needers[node.key]:
                name, labels = _stage_run(execution, by_id[record.run_id])
                record.stage_runs[execution.id] = tracker.start_run(name, {
                    "alignflow.stage": execution.name, "alignflow.round": str(execution.round),
                    "alignflow.key": execution.key, "alignflow.kind": execution.kind, OWNER_TAG: OWNER, **labels,
                    PIPELINE_RUN_TAG: parent,
                }, parent=record.run_id)
            first, _ = needers[node.key][0]
            damaged = store.check(node.kind, node.key, download=True) is not None  # never trust a cached reference to it
            name = node.label.replace(" ", "-")
            job = StageJob(node=node, store_root=str(store.root), force=node.key in forced,
                           tracker=tracker, mlflow_run_id=first.stage_runs[node.id])  # live steps: the first's run
            inputs = {p: futures[node.recipe["inputs"][p]] for p in node.inputs}
            shards = getattr(node.params, "shards", 1)
            if shards > 1 and kinds[node.kind].shard_input:  # see run_shard
                parts = [run_shard.with_options(name=f"{node.kind}-shard", task_run_name=f"{name}-shard{i}",
                                                cache_policy=NO_CACHE).submit(job, inputs, i, shards)
                         for i in range(shards)]
                task_, args = merge_shards, (job, inputs, parts)
            else:
                task_, args = run_stage, (job, inputs)
            futures[node.key] = task_.with_options(
                name=node.kind, task_run_name=name, cache_policy=policy, refresh_cache=node.key in forced or damaged,
            ).submit(*args)
        for node in unique:
            current = node.key
            users = needers[node.key]
            if any(k in failed for k in node.recipe["inputs"].values()):  # an input failed: never ran
                futures[node.key].wait()
                failed.add(node.key)
                for record, execution in users:
                    tracker.end(record.stage_runs.pop(execution.id), "KILLED")
                    record.summary.append(_summary_row(execution, "killed"))
                term.console.print(f"[yellow]-[/] {node.label:<24} not run: an input failed{_shared(users, records)}")
                continue
            try:
                ref = _outcome(node, futures[node.key], store)
            except StageFailed as err:
                if not is_sweep:
                    raise
                failed.add(node.key)
                for record, execution in users:
                    tracker.end(record.stage_runs.pop(execution.id), "FAILED")
                    record.summary.append(_summary_row(execution, "failed"))
                    record.failure = record.failure or err
                continue
            finished(node, ref)
    except stopping.Stopped as stopped:
        for node in unique:  # stages that finished meanwhile are kept: recorded as such
            future = futures.get(node.key)
            if node.key in recorded or future is None or not _finished(future) or \
                    any(k not in recorded for k in node.recipe["inputs"].values()):
                continue
            finished(node, _outcome(node, future, store))
        end_in_mlflow()
        _cancel_in_prefect(None, futures.values(), stopped.request.reason)
        raise
    except BaseException:
        for record in records:
            for node_id, run_id in record.stage_runs.items():  # the stage that failed, and those that never finished
                node = next(n for n in record.variant.nodes if n.id == node_id)
                tracker.end(run_id, "FAILED" if node.key == current else "KILLED")
            if record.run_id != parent:
                tracker.end(record.run_id, "FAILED")
        tracker.end(parent, "FAILED")
        raise
    finally:
        stopping.forget_hard_stop(end_in_mlflow)
        stopping.forget_hard_stop(end_in_prefect)
    reports = store.local_root / "_reports"
    for record in records:  # each variant's (or the plain run's) own metrics, headline and report
        done = [row for row in record.summary if row["cache"] in ("hit", "miss")]
        hits = sum(row["cache"] == "hit" for row in done)
        # Counts as tags: as metrics, MLflow's chart view drew them beside the win rate.
        tracker.log(record.run_id, tags={"alignflow.stages_run": len(done) - hits, "alignflow.stages_cached": hits})
        spec_nodes = record.variant.spec.nodes
        versus_previous = [name for name, d in spec_nodes.items() if "previous" in d.refs.values()]
        record.headline = headline_by_round(done, versus_previous)
        name = pipeline_run_name(spec.name, variant=record.variant.label if is_sweep else None,
                                 changed=[] if is_sweep else changed, headline=record.headline,
                                 cached=bool(done) and hits == len(done))
        signals = headline_by_round(done, versus_previous, signals=True)  # MLflow draws them by round
        rewards = not is_sweep and any(row.get("reward") for row in done)  # a sweep's: on its parent, all seeds
        tracker.log_headline(record.run_id, signals, rewards=rewards, name=name)
        log_report(tracker, record.run_id, done, cache_dir=reports)  # table and plots
        if not is_sweep:  # a variant keeps its name, what differs: the sweep's tables find it by it
            tracker.rename(record.run_id, name)
        if is_sweep:
            tracker.end(record.run_id, "FAILED" if record.failure else "FINISHED")
    if not is_sweep:
        tracker.end(parent)
        only = records[0]
        return {"parent_run_id": parent, "stages": only.summary, "headline": only.headline}
    return _finish_sweep(tracker, parent, expanded, records, unique, computed, reports)


def _start_variant(tracker: Tracker, parent: str, variant: Variant) -> str:
    """A variant's child run of the sweep's parent: named by what differs, its values as params."""
    spec = variant.spec
    run_id = tracker.start_run(pipeline_run_name(spec.name, variant=variant.label), {
        "alignflow.variant": variant.label, "alignflow.variant_group": variant.group,
        **({"alignflow.seed": str(variant.seed)} if variant.seed is not None else {}),
        "alignflow.spec": spec.file, "alignflow.rounds": str(spec.rounds.count), OWNER_TAG: OWNER,
    }, parent=parent)
    tracker.log(run_id, params=variant.values)
    tracker.log_text(run_id, _dump_yaml(spec.resolved), "spec.yaml")  # this variant alone, as a plain spec
    return run_id


def _finish_sweep(tracker: Tracker, parent: str, expanded, records: list[VariantRecord], unique: list[Node],
                  computed: set[str], reports: Path) -> dict:
    """The sweep's parent: its counts, its report over every variant (the headline by round, a
    mean over seeds, when the seeds are all that varies), and SweepFailed if a variant failed."""
    rows = [{**row, "variant": r.variant.group, "seed": r.variant.seed} for r in records for row in r.summary]
    failures = [(r.variant.label, r.failure) for r in records if r.failure]
    tracker.log(parent, tags={"alignflow.stages_run": len(computed), "alignflow.stages_cached": len(unique) - len(computed),
                              "alignflow.variants": len(records), "alignflow.variants_failed": len(failures)})
    headline = headline_by_round(rows) if len(expanded.groups()) == 1 else {}
    if headline:
        tracker.log_headline(parent, headline, rewards=any(row.get("reward") for row in rows))
    log_report(tracker, parent, rows, cache_dir=reports)
    tracker.end(parent, "FAILED" if failures else "FINISHED")
    seconds = {row["key"]: row["seconds"] for r in records for row in r.summary if row["cache"] == "miss"}
    result = {"parent_run_id": parent, "headline": headline, "failed": failures, "summary": rows,
              "stages": [{"stage": n.name, "round": n.round, "key": n.key, "seconds": seconds.get(n.key, 0.0),
                          "cache": "miss" if n.key in computed else "hit"} for n in unique],
              "variants": [{"label": r.variant.label, "run_id": r.run_id, "headline": r.headline,
                            "failed": r.failure is not None} for r in records]}
    if failures:
        raise SweepFailed(result, failures)
    return result


def _summary_row(node: Node, cache: str, ref: dict | None = None) -> dict:
    return {"stage": node.name, "round": node.round, "key": node.key, "cache": cache,
            "seconds": ref["seconds"] if ref else 0.0, "metrics": ref["metrics"] if ref else {}, **_labels(node)}


def _labels(node: Node) -> dict[str, str]:
    """What the stage's run measures, from its params' `run_tags` (reward_accuracy: `reward`), as
    summary columns (`reward`); its run's tags are `alignflow.<column>`."""
    tags = getattr(node.params, "run_tags", dict)()
    return {name.removeprefix("alignflow."): value for name, value in tags.items()}


def _stage_run(node: Node, by_id: dict[str, Node]) -> tuple[str, dict[str, str]]:
    """A stage execution's MLflow run name and its own tags. A reward's accuracy run is named by
    the reward and the seed it was trained with (`EXRM · seed 1`: the seed of its `reward_input`)."""
    labels = _labels(node)
    tags = {f"alignflow.{column}": value for column, value in labels.items()}
    if "reward" not in labels:
        return run_name(node.name, node.round), tags
    measured = by_id.get(node.inputs.get(getattr(node.params, "reward_input", ""), ""))
    seed = (measured or node).recipe["seed"]
    return run_name(node.name, node.round, reward=labels["reward"], seed=seed), tags


def _shared(users: list, records: list) -> str:
    """Which variants an execution serves, where the run is a sweep: ` [all 4]`, ` [beta=0.1 +1]`."""
    from rich.markup import escape

    if len(records) == 1 or not users[0][0].variant.label:
        return ""
    if len(users) == len(records):
        return f" [dim]{escape(f'[all {len(records)}]')}[/]"
    more = f" +{len(users) - 1}" if len(users) > 1 else ""
    return f" [dim]{escape(f'[{users[0][0].variant.label}{more}]')}[/]"


def _outcome(node: Node, future, store: Store) -> dict:
    """Wait for one stage; its artifact's reference, or raise if it failed."""
    future.wait()
    state = future.state
    if not state.is_completed():
        cause = _exception(state)
        stop = stopping.requested()
        if stop is not None and stop.error is not None and not isinstance(cause, BadInput):
            raise stop.error  # the root cause: bad input data somewhere else in the graph
        if stop is not None and stop.error is None:  # whatever this stage died of, the run was stopping
            raise stopping.Stopped(stop)
        term.console.print(f"[red]✗ {node.label}[/] failed")
        if isinstance(cause, BadInput):
            raise cause
        raise StageFailed(node.name, node.round, cause)
    ref = dict(state.result())
    ref["computed"] = ref["computed"] and state.name != "Cached"  # a cache record replays the original
    ref["uri"] = str(store.path(ref["kind"], ref["key"]))  # where it is now: the home may have moved
    return ref


def _log_stage(node: Node, ref: dict, refs: dict, tracker: Tracker, run_id: str) -> str:
    """Log one finished stage to its MLflow run and end it; return its line for the terminal."""
    hit = not ref["computed"]
    tags = {"alignflow.cache": "hit" if hit else "miss", "alignflow.uri": ref["uri"]}
    if hit and ref.get("mlflow_run_id"):  # the run that computed it holds the step curves
        tags["alignflow.original_run_id"] = ref["mlflow_run_id"]
    if ref["metrics"].get("logps_fallback"):  # a log-prob fast path failed its check: see tasks/logps.py
        tags["alignflow.logps_fallback"] = "plain full-logits path"
    params = {"kind": node.kind, **_labels(node), "seed": node.recipe["seed"], **node.recipe["config"],
              **{f"input.{p}": refs[i]["key"] for p, i in node.inputs.items()}}
    tracker.log(run_id, metrics=ref["metrics"], params=params, tags=tags, step=ref.get("final_step", 0))
    tracker.end(run_id)
    shown = ", ".join(f"{k}={v:.3g}" for k, v in list(ref["metrics"].items())[:4])
    mark = "[dim]cached[/]" if hit else f"[green]ran[/] {ref['seconds']:6.1f}s"
    return f"[green]✓[/] {node.label:<24} {mark:<22} {shown}"


def _done_state(future):
    """A task's final state once its thread is done, else None (never asks the Prefect server)."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is None or not wrapped.done():
        return None
    future.wait(0)
    return future.state


def _finished(future) -> bool:
    state = _done_state(future)
    return state is not None and state.is_completed()


def _cancel_in_prefect(flow_run_id, futures, reason: str) -> None:
    """Mark as Cancelled, in Prefect, the task runs a stopped run left unfinished (waiting on a
    stopped stage), and, on a hard stop (`flow_run_id` given: the flow is not ending through
    Prefect's engine), the flow run and the task runs still going."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for future in futures:
            state = _done_state(future)
            if (state is None and flow_run_id is not None) or (state is not None and not state.is_final()):
                client.set_task_run_state(future.task_run_id, CancelledState(message=reason), force=True)
        if flow_run_id is not None:
            client.set_flow_run_state(flow_run_id, CancelledState(message=reason), force=True)


def _exception(state) -> BaseException:
    try:
        state.result()
    except BaseException as exc:  # the task's own exception
        return exc
    return RuntimeError(f"ended in state {state.name}")


def _dump_yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
