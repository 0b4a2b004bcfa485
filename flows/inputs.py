"""Local input files, read and validated before any stage runs.

A malformed data file is the user's to fix (exit 2), and the contract is that exit 2 writes
nothing. A source stage finds its file's problems only when it reads it, by which time other
branches of the graph may be computing and committing. So `alignflow run` first runs every local
file source whose artifact is not in the store into a throwaway folder: a BadInput there is a
spec error, before Prefect, MLflow or the store are touched. (A remote source can only fail
while running: the flow then stops scheduling and cancels what runs; see flows/pipeline.py.)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from flows.errors import Problem, SpecError
from flows.store import Store
from tasks import load_stage_kinds
from tasks.base import BadInput, StageContext


def local_sources(nodes) -> list:
    """The dataset executions that read only local files (jsonl, parquet, a local folder)."""
    return [n for n in nodes if n.section == "datasets" and not n.inputs
            and (files := n.params.source_files()) and all(Path(f).exists() for f in files)]


def check_local_inputs(nodes, store_root: str) -> None:
    """Raise SpecError naming the file and line of the first bad row of any local source that
    would run; sources already in the store were read before."""
    kinds = load_stage_kinds()
    store = Store(store_root)
    problems = []
    for node in local_sources(nodes):
        if store.check(node.kind, node.key) is None:
            continue
        with tempfile.TemporaryDirectory(prefix="alignflow-check-") as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            try:
                kinds[node.kind].run(StageContext(out=out, inputs={}, params=node.params, seed=node.recipe["seed"]))
            except BadInput as err:
                problems.append(Problem(err.file, err.field, err.expected))
    if problems:
        raise SpecError(problems)
