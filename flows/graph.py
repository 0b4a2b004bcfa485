"""Expand a spec into the concrete stage executions of every round, in the order they run.

One-off nodes (models, datasets, stages outside `rounds.repeat`) run once, as round 0; each
repeated stage runs once per round 1..count. Round names resolve here: `policy` (and `previous`)
in round 1 is `rounds.policy.start`, in round r > 1 it is round r-1's `rounds.policy.next`; a table
named in `rounds.fresh` resolves, inside round r, to that round's slice of it.

Two round settings add stages of their own to a round r > 1:
- rounds.reference: {mix: tau}: a `mix_models` stage `reference_mix`, round r's reference, from
  round r-1's reference and round r-1's trained policy;
- rounds.data: cumulative | {replay: f}: a `round_data` stage `<table>_rounds` per table the
  trainer (rounds.policy.next) reads from a repeated stage, joining round r's rows with the
  earlier rounds' (all, or a fraction); where the reference moves, it recomputes the earlier
  rows' reference log-probs under round r's reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flows.spec import MIX_NAME, MixReference, Spec, round_data_name, slice_name
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
        if r > 1 and isinstance(spec.rounds.reference, MixReference):
            nodes.append(_mix_node(spec, r))
        for name in inner:
            node = _node(spec, name, r)
            if r > 1 and spec.rounds.data != "fresh" and spec.rounds.policy and name == spec.rounds.policy.next:
                for param, target in spec.nodes[name].refs.items():
                    if target in repeated and spec.nodes[target].output == "table":
                        nodes.append(_round_data_node(spec, target, r))
                        node.inputs[param] = node_id(round_data_name(target), r)
            nodes.append(node)
    return nodes


def _mix_node(spec: Spec, round: int) -> Node:
    """Round `round`'s reference under rounds.reference: {mix: tau}."""
    from tasks.mix_models import MixModelsParams

    params = MixModelsParams(weight=spec.rounds.reference.mix)
    inputs = {"first": _resolve(spec, "reference", round - 1), "second": node_id(spec.rounds.policy.next, round - 1)}
    return Node(name=MIX_NAME, round=round, section="stages", params=params, inputs=inputs)


def _round_data_node(spec: Spec, table: str, round: int) -> Node:
    """What round `round`'s trainer reads in place of `table` under rounds.data (cumulative, replay)."""
    from tasks.round_data import RoundDataParams

    data, made_by = spec.rounds.data, spec.nodes[table].params
    # Earlier rounds' reference log-probs hold only while the reference does not move.
    recompute = spec.rounds.reference != "fixed" and getattr(made_by, "reference", None) is not None
    params = RoundDataParams(
        current=table, reference="reference" if recompute else None,
        fraction=1.0 if data == "cumulative" else data.replay,
        **{k: getattr(made_by, k) for k in ("max_length", "max_prompt_length", "batch_size", "strict") if recompute},
    )
    inputs = {"current": node_id(table, round)}
    inputs |= {f"round_{r}": node_id(table, r) for r in range(1, round)}
    if recompute:
        inputs["reference"] = _resolve(spec, "reference", round)
    return Node(name=round_data_name(table), round=round, section="stages", params=params, inputs=inputs)


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
    if target in ("policy", "previous"):
        return node_id(carry.start, 0) if round == 1 else node_id(carry.next, round - 1)
    if target == "reference":
        if spec.rounds.reference == "fixed" or round == 1:
            return node_id(carry.start, 0)
        if isinstance(spec.rounds.reference, MixReference):
            return node_id(MIX_NAME, round)
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
