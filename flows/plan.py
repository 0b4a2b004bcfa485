"""`plan`: what a run would do, stage by stage and round by round, without running anything.

fresh   - the artifact for this key is in the store and whole: the stage will be skipped.
stale   - it was run before with a different key: the reason says what changed.
missing - never run here, or its artifact is gone or damaged: the reason says which.
"""
from __future__ import annotations

from dataclasses import dataclass

from flows.graph import Node
from flows.keys import explain_change
from flows.store import Store


@dataclass
class PlanRow:
    node: Node
    status: str  # fresh | stale | missing
    reason: str


def plan(spec_name: str, nodes: list[Node], store: Store) -> list[PlanRow]:
    labels = {n.id: n.label for n in nodes}
    rows = []
    for node in nodes:
        problem = store.check(node.kind, node.key)
        if problem is None:
            rows.append(PlanRow(node, "fresh", "up to date"))
            continue
        last = store.last_recipe(spec_name, node.id)
        if last is not None and last["key"] != node.key:
            inputs = {p: labels[i] for p, i in node.inputs.items()}
            rows.append(PlanRow(node, "stale", "; ".join(explain_change(last["recipe"], node.recipe, inputs))))
        elif problem == "not built":
            rows.append(PlanRow(node, "missing", "artifact deleted" if last else "never run"))
        else:
            rows.append(PlanRow(node, "missing", f"artifact {problem}"))
    return rows
