"""Expand a spec into the concrete stage executions of every round, in the order they run.

One-off nodes (models, datasets, stages outside `rounds.repeat`) run once, as round 0; each
repeated stage runs once per round 1..count. Round names resolve here: `policy` in round 1 is
`rounds.policy.start`, in round r > 1 it is round r-1's `rounds.policy.next`; a table named in
`rounds.fresh` resolves, inside round r, to that round's slice of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flows.spec import Spec, slice_name
from tasks.base import StageParams


@dataclass
class Node:
    name: str
    round: int
    section: str
    params: StageParams
    inputs: dict[str, str]  # parameter -> id of the node it reads
    key: str = ""
    recipe: dict = field(default_factory=dict)  # what the key hashes; kept to explain staleness

    @property
    def id(self) -> str:
        return node_id(self.name, self.round)

    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def label(self) -> str:
        return f"{self.name} (round {self.round})" if self.round else self.name


def node_id(name: str, round: int) -> str:
    return f"{name}@{round}" if round else name


def expand(spec: Spec) -> list[Node]:
    """All executions, topologically ordered (spec order within a round where free)."""
    repeated = spec.repeated
    order = _topological(spec, [n for n in spec.nodes if n not in repeated]) 
    nodes = [_node(spec, name, 0) for name in order]
    inner = _topological(spec, repeated)
    for r in range(1, spec.rounds.count + 1):
        nodes += [_slice_node(table, rows, r) for table, rows in spec.rounds.fresh.items()]
        nodes += [_node(spec, name, r) for name in inner]
    return nodes


def _slice_node(table: str, rows: int, round: int) -> Node:
    """Round `round`'s own rows of `table` (rounds.fresh): a `slice` stage execution."""
    from tasks.slices import SliceParams

    params = SliceParams(table=table, start=(round - 1) * rows, rows=rows)
    return Node(name=slice_name(table), round=round, section="stages", params=params, inputs={"table": node_id(table, 0)})


def _node(spec: Spec, name: str, round: int) -> Node:
    d = spec.nodes[name]
    inputs = {param: _resolve(spec, target, round) for param, target in d.refs.items()}
    return Node(name=name, round=round, section=d.section, params=d.params, inputs=inputs)


def _resolve(spec: Spec, target: str, round: int) -> str:
    carry = spec.rounds.policy
    if target == "policy":
        return node_id(carry.start, 0) if round == 1 else node_id(carry.next, round - 1)
    if target == "reference":
        if spec.rounds.reference == "fixed" or round == 1:
            return node_id(carry.start, 0)
        return node_id(carry.next, round - 1)
    if round and target in spec.rounds.fresh:
        return node_id(slice_name(target), round)
    return node_id(target, round if target in spec.repeated else 0)


def _topological(spec: Spec, names: list[str]) -> list[str]:
    """Depth-first order over references among `names` (cycles were rejected by the spec)."""
    wanted, done, order = set(names), set(), []

    def visit(name):
        if name in done:
            return
        done.add(name)
        for target in spec.nodes[name].refs.values():
            if target in wanted:
                visit(target)
        order.append(name)

    for name in names:
        visit(name)
    return order


def downstream(nodes: list[Node], stage_names: set[str]) -> set[str]:
    """Ids of every execution of `stage_names` and of everything that reads from them."""
    hit: set[str] = set()
    for node in nodes:  # topological order: inputs come first
        if node.name in stage_names or any(i in hit for i in node.inputs.values()):
            hit.add(node.id)
    return hit
