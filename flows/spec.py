"""The pipeline spec: YAML in, a validated `Spec` out, or a `SpecError` naming every problem.

A spec has three kinds of named nodes (`models`, `datasets`, `stages`), each a `kind` with its
parameters, and a `rounds` section saying which stages repeat and what carries from one round to
the next. Parameters that reference other nodes hold their names; two names are reserved inside
rounds: `policy` (round 1: `rounds.policy.start`; round r+1: round r's `rounds.policy.next`) and
`reference` (`fixed`: round 1's policy in every round; `previous`: the round's starting policy).
`rounds.fresh` gives each round its own slice of a table (new prompts every round), and
`rounds.serve` says how `alignflow serve` grows the iteration run after run. `sweep:` and `seeds:`
are checked here (each swept key names a value the spec can hold); flows/sweep.py expands them.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.errors import Problem, SpecError, did_you_mean
from tasks import load_stage_kinds
from tasks.base import StageParams, ref_fields
from tasks.sources import FileParams

# Inside rounds: the round's starting policy, its reference, and `previous`, the round's starting
# policy again, read as "the previous round's result" (evaluate's baseline: previous).
ROUND_NAMES = ("policy", "reference", "previous")
MIX_NAME = "reference_mix"  # the stage that computes rounds.reference: {mix: tau}'s reference
SECTIONS = {"models": ("model", "reward_model"), "datasets": ("table",), "stages": None}

# Node names become folder and file names (the index, MLflow run names, `name@round` ids), so
# they are plain identifiers: no path separators, no `@`, nothing invisible.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
NAME_RULE = "expected 1 to 64 letters, digits, '_' or '-', starting with a letter or '_'"

# Limits on what a spec may ask for: each is far above any real spec, and each keeps a hostile
# or mistaken one from exhausting memory before it is rejected.
MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 100  # YAML nesting
MAX_VALUES = 100_000  # values in the parsed spec, aliases expanded (no "billion laughs")
MAX_NODES = 1_000  # models + datasets + stages
MAX_EXECUTIONS = 10_000  # stage executions over all rounds
MAX_INT = 2**63 - 1  # what every integer field can hold (numpy, torch, sqlite)
MAX_SEED = 2**32 - 1  # numpy's seeds
MAX_VARIANTS = 1_000  # a sweep's variants, seeds included
MAX_SWEEP_EXECUTIONS = 100_000  # stage executions over all variants (before shared ones merge)
# What one sweep shares by construction: one experiment, one store, one MLflow, one task runner.
UNSWEPT = ("name", "store", "tracking", "runner", "sweep", "seeds")

# Keys trl, the alignment handbook and OpenRLHF users bring, and alignflow's names for them.
FOREIGN_KEYS = {
    "learning_rate": "use lr",
    "per_device_train_batch_size": "use micro_batch_size (examples per forward/backward) and batch_size (examples per optimizer step)",
    "gradient_accumulation_steps": "use micro_batch_size and batch_size (accumulation is batch_size / micro_batch_size)",
    "train_batch_size": "use batch_size",
    "num_train_epochs": "use epochs",
    "loss_type": "the stage kind is the loss (kind: dpo, ipo, ...), or use loss",
    "lora_r": "use lora: {r: ...}",
    "lora_alpha": "use lora: {alpha: ...}",
    "lora_dropout": "use lora: {dropout: ...}",
    "bf16": "use dtype: bfloat16",
    "fp16": "use dtype: float16",
    "torch_dtype": "use dtype",
    "max_seq_length": "use max_length",
    "model_name_or_path": "use a models entry (kind: pretrained, path: ...) and name it",
}


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a depth and size bound: its composer recurses per level, so a
    deeply nested document would end in a RecursionError instead of a message."""

    depth = values = 0

    def compose_node(self, parent, index):
        self.depth += 1
        self.values += 1
        if self.depth > MAX_DEPTH or self.values > MAX_VALUES:
            mark = self.peek_event().start_mark
            what = f"nested more than {MAX_DEPTH} deep" if self.depth > MAX_DEPTH else f"more than {MAX_VALUES} values"
            raise yaml.YAMLError(f"{what} at line {mark.line + 1}")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str):
    return yaml.load(text, Loader=_BoundedLoader)


def _check_values(raw, file: str, problems: list) -> None:
    """Every number finite and within an integer's range; no more than MAX_VALUES values (counted
    with aliases expanded). Iterative: a deep --set value cannot recurse."""
    seen, stack = 0, [("", raw, 0)]
    while stack:
        path, value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            problems.append(Problem(file, "", f"expected at most {MAX_VALUES} values (aliases expanded)"))
            return
        if depth > MAX_DEPTH:
            problems.append(Problem(file, path, f"expected at most {MAX_DEPTH} levels of nesting"))
            return
        if isinstance(value, dict):
            stack += [(f"{path}.{k}" if path else str(k), v, depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(file, path, f"expected a finite number, got {value}"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append(Problem(file, path, f"expected an integer within +-(2^63-1), got {value}"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyCarry(_Strict):
    start: str = Field(description="the node whose output is round 1's policy")
    next: str = Field(description="the repeated stage whose output is the next round's policy")


class ServeRule(_Strict):
    """How `alignflow serve` grows the iteration: each scheduled run covers `add` more rounds than
    are finished in the store, up to `max` (default: rounds.count)."""

    add: int = Field(default=1, ge=1, le=1000)
    max: int | None = Field(default=None, ge=1, le=1000)


class MixReference(_Strict):
    """A soft reference update (TR-DPO: Gorbatovski et al. 2024, "Learn Your Reference Model for
    Real Good Alignment", arXiv:2404.09656): reference_r = (1 - mix) reference_(r-1) + mix
    policy_(r-1), weight by weight. mix 1 is `previous`; a small mix moves the reference slowly."""

    mix: float = Field(gt=0, le=1, description="tau, the weight of the previous round's policy")


class ReplayData(_Strict):
    """This round's pairs plus a seeded uniform `replay` fraction of every earlier round's pairs."""

    replay: float = Field(gt=0, le=1, description="the fraction of the earlier rounds' pairs trained on again")


class Rounds(_Strict):
    count: int = Field(default=1, ge=0, le=1000)
    repeat: list[str] = Field(default_factory=list)
    policy: PolicyCarry | None = None
    # The reference each round's pairs and trainer compare against: round 1's policy in every round
    # (fixed), the round's starting policy (previous), or a soft update between the two (mix).
    reference: Literal["fixed", "previous"] | MixReference = "fixed"
    # What the trainer (policy.next) learns from in round r: this round's pairs only (fresh), all
    # rounds' pairs so far (cumulative), or this round's plus a fraction of the earlier (replay).
    data: Literal["fresh", "cumulative"] | ReplayData = "fresh"
    # table -> rows per round: inside the rounds, the table reads as round r's own slice of it,
    # rows (r-1)*n .. r*n-1 (fresh prompts every round; a `slice` stage per round).
    fresh: dict[str, int] = Field(default_factory=dict)
    serve: ServeRule = Field(default_factory=ServeRule)

    @property
    def serve_max(self) -> int:
        return self.serve.max or self.count


class Tracking(_Strict):
    uri: str | None = None  # default: sqlite under ALIGNFLOW_HOME


class Runner(_Strict):
    """Where the stages execute. `local`: threads in this process. `ray`: Ray workers through
    prefect-ray (`address` of a cluster, e.g. ray://head:10001; none: a Ray instance started here
    with `num_cpus` workers); stages with `shards` map over their rows there."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)


class Seeds(_Strict):
    """`seeds: N`: every variant N times, with the spec's `seed` + 0 .. N-1. With `stages`, only
    those stages take the variant's seed; every other stage keeps its own, so the seeds share it."""

    count: int = Field(ge=1, le=MAX_VARIANTS)
    stages: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _count_alone(cls, value):
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value


class SpecFile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    description: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    store: str | None = None  # default: $ALIGNFLOW_HOME/store
    tracking: Tracking = Field(default_factory=Tracking)
    runner: Runner = Field(default_factory=Runner)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rounds: Rounds = Field(default_factory=Rounds)
    # dotted key -> values (a grid); `zip`: one mapping (or a list of them) of lists that go together
    sweep: dict[str, Any] = Field(default_factory=dict)
    seeds: Seeds | None = None


@dataclass
class NodeDef:
    name: str
    section: str  # models | datasets | stages
    params: StageParams
    refs: dict[str, str]  # parameter -> referenced name (a node or a round name)
    output: str

    @property
    def kind(self) -> str:
        return self.params.kind


@dataclass
class Spec:
    file: str
    name: str
    seed: int
    store: str | None
    tracking_uri: str | None
    runner: Runner
    nodes: dict[str, NodeDef]
    rounds: Rounds
    resolved: dict[str, Any]  # the spec after overrides, as run
    overridden: dict[str, str] = field(default_factory=dict)  # dotted path -> where it was set (--set, ...)
    sweep: dict[str, Any] = field(default_factory=dict)  # as validated; flows/sweep.py expands it
    seeds: Seeds | None = None

    @property
    def repeated(self) -> list[str]:
        return list(self.rounds.repeat) if self.rounds.count > 0 else []

    @property
    def hash(self) -> str:
        text = json.dumps(self.resolved, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_override(item: str, file: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise SpecError(Problem(file, "", f"--set {item!r}: expected dotted.key=value"))
    path, _, text = item.partition("=")
    try:
        value = _load_yaml(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise SpecError(Problem(file, path, f"--set value {text!r} is not valid YAML: {exc}"))
    keys = path.strip().split(".")
    if not all(keys):
        raise SpecError(Problem(file, path, "--set: expected a dotted key like stages.dpo.beta"))
    return keys, value


def apply_override(raw: dict, keys: list[str], value: Any, file: str) -> None:
    """Set raw[k1][k2]...[kn] = value. Every parent must exist: a typo must not create a stage."""
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key) if isinstance(node, dict) else None
        if child is None and depth >= 2:  # e.g. stages.dpo.lora.r where lora is not set yet
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            choices = node.keys() if isinstance(node, dict) else []
            raise SpecError(Problem(
                file, ".".join(keys),
                f"--set: there is no '{where}' in the spec{did_you_mean(key, choices)}",
            ))
        node = child
    node[keys[-1]] = value


def load_spec(path: str | Path, overrides: list[str] = (), rounds: int | None = None) -> Spec:
    """Read, override and validate a spec. Raises SpecError listing every problem found."""
    raw = read_spec(path)
    return validate_spec(raw, str(path), apply_options(raw, str(path), overrides, rounds))


def read_spec(path: str | Path) -> dict:
    """The spec file's YAML mapping, or a SpecError (missing, too big, not UTF-8, not YAML)."""
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise SpecError(Problem(file, "", "spec file not found" if not p.exists() else "expected a regular file"))
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(Problem(file, "", f"expected a spec of at most {MAX_SPEC_BYTES >> 20} MiB, got {p.stat().st_size} bytes"))
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise SpecError(Problem(file, "", f"expected UTF-8 text; line {line} has the byte {exc.object[exc.start]:#04x}"))
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(Problem(file, "", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"))
    if not isinstance(raw, dict):
        raise SpecError(Problem(file, "", "expected a mapping with name, stages, ..."))
    return raw


def apply_options(raw: dict, file: str, overrides: list[str] = (), rounds: int | None = None) -> dict[str, str]:
    """Apply `--set` overrides and `--rounds` to `raw` in place; return what they set (path -> option)."""
    overridden = {}
    for item in overrides:
        keys, value = parse_override(item, file)
        apply_override(raw, keys, value, file)
        overridden[".".join(keys)] = "--set"
    if rounds is not None:
        raw.setdefault("rounds", {})
        if not isinstance(raw["rounds"], dict):
            raise SpecError(Problem(file, "rounds", "expected a mapping"))
        raw["rounds"]["count"] = rounds
        overridden["rounds.count"] = "--rounds"
    return overridden


def validate_spec(raw: dict, file: str, overridden: dict[str, str] | None = None) -> Spec:
    """Validate a spec's mapping (`file` names it in messages; relative paths are relative to its
    folder). Raises SpecError listing every problem found."""
    overridden = overridden or {}
    p = Path(file)
    value_problems: list[Problem] = []
    _check_values(raw, file, value_problems)
    if value_problems:
        raise SpecError(value_problems)
    try:
        top = SpecFile.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(pydantic_problems(exc, file, "", SpecFile, overridden))

    problems: list[Problem] = []
    if top.runner.kind == "ray" and importlib.util.find_spec("prefect_ray") is None:
        problems.append(Problem(file, "runner.kind", "'ray' needs prefect-ray and ray: pip install 'alignflow[ray]'"))
    count = sum(len(getattr(top, section)) for section in SECTIONS)
    if count > MAX_NODES:
        raise SpecError(Problem(file, "", f"expected at most {MAX_NODES} models, datasets and stages, got {count}"))
    if len(top.rounds.repeat) * top.rounds.count > MAX_EXECUTIONS:
        raise SpecError(Problem(file, "rounds.count", f"expected at most {MAX_EXECUTIONS} stage executions over all "
                                f"rounds, got {len(top.rounds.repeat)} x {top.rounds.count}"))
    failed: set[str] = set()  # names whose own definition is wrong: references to them say nothing more
    # Relative paths resolve against the folder's absolute path: a path is in its node's key, and
    # `alignflow run pipelines/x.yaml` must find the artifacts `alignflow run /abs/pipelines/x.yaml` made.
    nodes = _validate_nodes(top, file, p.parent.resolve(), overridden, problems, failed)
    _check_names_and_refs(top, nodes, file, problems, failed)
    _check_reference_lengths(nodes, file, problems)
    _check_sweep(top, raw, nodes, file, problems, failed, overridden)
    if not problems:
        _check_cycles(top, nodes, file, problems)
        _check_combinations(nodes, top, file, problems)
    if problems:
        raise SpecError(problems)
    return Spec(
        file=file, name=top.name, seed=top.seed, store=top.store, tracking_uri=top.tracking.uri, runner=top.runner,
        nodes=nodes, rounds=top.rounds, resolved=copy.deepcopy(raw), overridden=overridden,
        sweep=copy.deepcopy(top.sweep), seeds=top.seeds,
    )


def sweep_axes(sweep: dict[str, Any]) -> list[dict[str, list]]:
    """A validated `sweep:` as its axes, in order: each a mapping of dotted keys to equally long
    lists that vary together (a grid key alone; a `zip` group together)."""
    axes = []
    for key, values in sweep.items():
        if key != "zip":
            axes.append({key: list(values)})
        else:
            axes += [dict(group) for group in (values if isinstance(values, list) else [values])]
    return axes


def _check_sweep(top: SpecFile, raw: dict, nodes: dict[str, NodeDef], file, problems, failed: set, overridden) -> None:
    """Each swept key names a value the spec can hold (a field of its node's kind, or of the spec);
    its values are a non-empty list; a zip's lists are equally long; seeds name stages."""
    seen: dict[str, str] = {}
    axes: list[int] = []
    for key, values in top.sweep.items():
        if key != "zip":
            groups, where = [({key: values}, "sweep")], "sweep"
        elif isinstance(values, dict) or (isinstance(values, list) and values and all(isinstance(v, dict) for v in values)):
            groups = [(g, "sweep.zip" if isinstance(values, dict) else f"sweep.zip[{i}]")
                      for i, g in enumerate(values if isinstance(values, list) else [values])]
        else:
            problems.append(Problem(file, "sweep.zip", "expected a mapping of dotted keys to lists of values that go "
                                    "together (or a list of such mappings)"))
            continue
        for group, where in groups:
            lengths = {}
            for dotted, listed in group.items():
                path = f"{where}.{dotted}"
                if not isinstance(listed, list) or not listed:
                    problems.append(Problem(file, path, f"expected a non-empty list of values, got {listed!r}"))
                    continue
                lengths[dotted] = len(listed)
                if dotted in seen:
                    problems.append(Problem(file, path, f"'{dotted}' is swept twice (also in {seen[dotted]})"))
                seen[dotted] = where
                if (problem := _sweep_key_problem(dotted, top, raw, nodes, failed)) is not None:
                    via = f" (from {overridden[f'sweep.{dotted}']})" if f"sweep.{dotted}" in overridden else ""
                    problems.append(Problem(file, path, problem + via))
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
                problems.append(Problem(file, where, f"expected lists of one length, zipped together; got {shown}"))
            if lengths:
                axes.append(max(lengths.values()))
    if top.seeds is not None:
        for i, name in enumerate(top.seeds.stages or []):
            if name not in top.stages:
                problems.append(Problem(file, f"seeds.stages[{i}]", f"no stage named '{name}'{did_you_mean(name, top.stages)}"))
        if "seed" in seen:
            problems.append(Problem(file, "sweep.seed", "seeds: varies the seed already; expected one of the two"))
    variants = math.prod(axes) * (top.seeds.count if top.seeds else 1)
    executions = len(nodes) + len(top.rounds.repeat) * top.rounds.count
    if variants > MAX_VARIANTS:
        problems.append(Problem(file, "sweep", f"expected at most {MAX_VARIANTS} variants (seeds included), got {variants}"))
    elif variants * executions > MAX_SWEEP_EXECUTIONS:
        problems.append(Problem(file, "sweep", f"expected at most {MAX_SWEEP_EXECUTIONS} stage executions over all "
                                f"variants, got {variants} x {executions}"))


def _sweep_key_problem(dotted: str, top: SpecFile, raw: dict, nodes: dict[str, NodeDef], failed: set) -> str | None:
    """Why a swept dotted key cannot name a value of this spec (None: it can)."""
    keys = dotted.split(".")
    if not all(keys):
        return "expected a dotted key like stages.dpo.beta"
    if keys[0] in UNSWEPT:
        return f"'{keys[0]}' is one for the whole sweep (one experiment, store, tracking store and runner); it cannot vary"
    if keys[0] not in SpecFile.model_fields:
        return f"unknown key '{keys[0]}'{did_you_mean(keys[0], SpecFile.model_fields)}"
    if keys[0] in SECTIONS and len(keys) > 1:
        section = getattr(top, keys[0])
        if keys[1] not in section:
            return f"no {keys[0][:-1]} named '{keys[1]}'{did_you_mean(keys[1], section)}"
        if len(keys) == 2 or keys[1] in failed:
            return None  # a whole definition, or one whose own error is reported
        owner = _model_at(type(nodes[keys[1]].params), keys[2:-1])
    else:
        owner = _model_at(SpecFile, keys[:-1])
    if owner is not None and keys[-1] not in owner.model_fields:
        return (f"unknown key '{keys[-1]}'{did_you_mean(keys[-1], owner.model_fields)}; "
                f"known keys: {', '.join(owner.model_fields)}")
    node = raw
    for depth, key in enumerate(keys[:-1]):  # as --set: the parents exist (below a node's own fields, they may not)
        if not isinstance(node, dict) or (key not in node and depth < 2):
            return f"there is no '{'.'.join(keys[:depth + 1])}' in the spec"
        node = node.get(key, {})
    return None


def slice_name(table: str) -> str:
    """The stage name of a rounds.fresh table's per-round slice."""
    return f"{table}_slice"


def round_data_name(table: str) -> str:
    """The stage name of what the trainer reads in a round under rounds.data: cumulative or replay
    (the repeated table `table`, joined with its earlier rounds' rows)."""
    return f"{table}_rounds"


def name_problem(name: str, rounds: Rounds | None = None) -> str | None:
    """Why `name` cannot name a model, dataset or stage (None: it can)."""
    rounds = rounds or Rounds()
    if not NAME.fullmatch(name):
        return f"name {ascii(name)} is not allowed: {NAME_RULE}"
    if name in ROUND_NAMES:
        return f"'{name}' is reserved inside rounds (policy, reference, previous)"
    if any(name == slice_name(table) for table in rounds.fresh):
        return f"'{name}' is reserved for the per-round slices of rounds.fresh"
    if name == MIX_NAME and isinstance(rounds.reference, MixReference):
        return f"'{name}' is reserved for the mixed reference of rounds.reference: {{mix: ...}}"
    if rounds.data != "fresh" and any(name == round_data_name(table) for table in rounds.repeat):
        return f"'{name}' is reserved for the per-round training data of rounds.data"
    return None


def _validate_nodes(top: SpecFile, file, base_dir: Path, overridden, problems, failed: set) -> dict[str, NodeDef]:
    kinds = load_stage_kinds()
    nodes: dict[str, NodeDef] = {}
    for section, allowed_outputs in SECTIONS.items():
        for name, body in getattr(top, section).items():
            failed.add(name)  # until it validates
            bad_name = name_problem(name, top.rounds)
            where = f"{section}.{name}" if bad_name is None else f"{section}.{ascii(name)}"
            if bad_name:
                problems.append(Problem(file, where, bad_name))
                continue
            if name in nodes:
                problems.append(Problem(file, where, f"name '{name}' is already used in {nodes[name].section}"))
                continue
            if not isinstance(body, dict):
                problems.append(Problem(file, where, "expected a mapping with a 'kind'"))
                continue
            kind_name = body.get("kind")
            choices = sorted(k for k, v in kinds.items() if not allowed_outputs or v.output in allowed_outputs)
            if kind_name is None:
                problems.append(Problem(file, f"{where}.kind", f"required: one of {', '.join(choices)}"))
                continue
            if kind_name not in choices:
                problems.append(Problem(
                    file, f"{where}.kind",
                    f"unknown {section[:-1]} kind '{kind_name}'{did_you_mean(kind_name, choices)}; "
                    f"expected one of {', '.join(choices)}",
                ))
                continue
            kind = kinds[kind_name]
            try:
                params = kind.params.model_validate(body, context={"base_dir": base_dir})
            except ValidationError as exc:
                problems.extend(pydantic_problems(exc, file, where, kind.params, overridden))
                continue
            for source in params.source_files():
                field_name = _field_holding(params, source)
                source = Path(source)
                if not source.exists():
                    problems.append(Problem(file, f"{where}.{field_name}", f"file not found: {source}"))
                elif isinstance(params, FileParams) and not source.is_file():
                    problems.append(Problem(file, f"{where}.{field_name}", f"expected a regular file: {source} is "
                                            f"{'a folder' if source.is_dir() else 'a special file'}"))
                elif not (source.is_file() or source.is_dir()):  # /dev/zero, a fifo: never ends, or blocks
                    problems.append(Problem(file, f"{where}.{field_name}", f"expected a file or folder: {source} is a special file"))
            for field_name, message in params.environment_problems():
                problems.append(Problem(file, f"{where}.{field_name}", message))
            refs = {k: getattr(params, k) for k in ref_fields(kind.params) if getattr(params, k) is not None}
            nodes[name] = NodeDef(name=name, section=section, params=params, refs=refs, output=kind.output)
            failed.discard(name)
    return nodes


def _field_holding(params: StageParams, value) -> str:
    for name in type(params).model_fields:
        if str(getattr(params, name)) == str(value):
            return name
    return "path"


def _check_names_and_refs(top: SpecFile, nodes: dict[str, NodeDef], file, problems, failed: set) -> None:
    rounds = top.rounds
    repeated = set(rounds.repeat)
    for i, name in enumerate(rounds.repeat):
        if name not in top.stages:
            problems.append(Problem(file, f"rounds.repeat[{i}]", f"no stage named '{name}'{did_you_mean(name, top.stages)}"))
    if rounds.policy is not None:
        start, nxt = rounds.policy.start, rounds.policy.next
        if start in failed:
            pass  # its own error says what is wrong
        elif start not in nodes:
            problems.append(Problem(file, "rounds.policy.start", f"no model or stage named '{start}'{did_you_mean(start, nodes)}"))
        elif start in repeated:
            problems.append(Problem(file, "rounds.policy.start", f"'{start}' repeats every round; expected a stage or model outside rounds.repeat"))
        elif nodes[start].output != "model":
            problems.append(Problem(file, "rounds.policy.start", f"'{start}' outputs a {nodes[start].output}; expected a model"))
        if nxt not in repeated:
            problems.append(Problem(file, "rounds.policy.next", f"'{nxt}' is not in rounds.repeat{did_you_mean(nxt, repeated)}; expected the stage that trains the next round's policy"))
        elif nxt in nodes and nodes[nxt].output != "model":
            problems.append(Problem(file, "rounds.policy.next", f"'{nxt}' outputs a {nodes[nxt].output}; expected a model"))

    if rounds.data != "fresh" and rounds.policy is not None and rounds.policy.next in nodes:
        trainer = nodes[rounds.policy.next]
        if not any(target in repeated and target in nodes and nodes[target].output == "table"
                   for target in trainer.refs.values()):
            problems.append(Problem(file, "rounds.data", f"'{trainer.name}' (rounds.policy.next) reads no table made in "
                                    "rounds.repeat; expected pairs made every round to accumulate, or data: fresh"))
    for field_name, moves in (("data", rounds.data != "fresh"), ("reference", isinstance(rounds.reference, MixReference))):
        if moves and rounds.policy is None:
            problems.append(Problem(file, f"rounds.{field_name}", "needs rounds.policy (start and next): it follows the "
                                    "policy from round to round"))

    for name, rows in rounds.fresh.items():
        where = f"rounds.fresh.{name}"
        if name in failed:
            pass
        elif name not in nodes:
            problems.append(Problem(file, where, f"no dataset or stage named '{name}'{did_you_mean(name, nodes)}"))
        elif nodes[name].output != "table":
            problems.append(Problem(file, where, f"'{name}' outputs a {nodes[name].output}; expected a table"))
        elif name in repeated:
            problems.append(Problem(file, where, f"'{name}' repeats every round; expected a one-off table to slice"))
        elif not any(name in nodes[r].refs.values() for r in repeated if r in nodes):
            problems.append(Problem(file, where, f"no stage in rounds.repeat reads '{name}'"))
        if not isinstance(rows, int) or rows < 1:
            problems.append(Problem(file, where, f"expected a number of rows per round (at least 1), got {rows!r}"))

    kinds = load_stage_kinds()
    for node in nodes.values():
        accepted = ref_fields(kinds[node.kind].params)
        for param, target in node.refs.items():
            where = f"{node.section}.{node.name}.{param}"
            if target in ROUND_NAMES:
                if node.name not in repeated:
                    problems.append(Problem(file, where, f"'{target}' exists only inside rounds; add '{node.name}' to rounds.repeat or name a model or stage"))
                elif rounds.policy is None:
                    problems.append(Problem(file, where, f"'{target}' needs rounds.policy (start and next)"))
                elif "model" not in accepted[param]:
                    problems.append(Problem(file, where, f"'{target}' is a model; expected a {' or '.join(accepted[param])}"))
                continue
            if target in failed:
                continue  # one root cause, one message
            if target not in nodes:
                problems.append(Problem(file, where, f"no model, dataset or stage named '{target}'{did_you_mean(target, list(nodes) + list(ROUND_NAMES))}"))
                continue
            if target == node.name:
                problems.append(Problem(file, where, "a stage cannot use its own output"))
                continue
            out = nodes[target].output
            if out not in accepted[param]:
                problems.append(Problem(file, where, f"'{target}' outputs a {out}; expected a {' or '.join(accepted[param])}"))
            if target in repeated and node.name not in repeated:
                problems.append(Problem(file, where, f"'{target}' repeats every round, '{node.name}' does not; a one-off stage cannot pick one round's output"))


def _check_reference_lengths(nodes: dict[str, NodeDef], file, problems) -> None:
    """A trainer that reads a table's reference log-probs must cut sequences where they were cut:
    its max_length equals that of the pairs / ref_logps stage that computed them."""
    for node in nodes.values():
        target = nodes.get(node.refs.get("pairs", ""))
        if target is None or not hasattr(node.params, "max_length") or getattr(node.params, "loss", "dpo") in ("slic", "rrhf"):
            continue
        computes = target.kind == "ref_logps" or (target.kind == "pairs" and target.params.reference is not None)
        if computes and target.params.max_length != node.params.max_length:
            problems.append(Problem(file, f"{node.section}.{node.name}.max_length",
                                    f"{node.params.max_length} differs from {target.section}.{target.name}.max_length "
                                    f"({target.params.max_length}), which computed the reference log-probs it reads; "
                                    "expected the same value"))


def _check_combinations(nodes: dict[str, NodeDef], top: SpecFile, file, problems) -> None:
    """Combinations each field allows alone but that cannot run together."""
    for node in nodes.values():
        if node.kind != "pairs":
            continue
        # A pair needs two candidates of one prompt: every generate feeding it must make >= 2.
        seen, todo = set(), list(node.refs.values())
        while todo:
            name = todo.pop()
            if name in seen or name not in nodes:
                continue
            seen.add(name)
            upstream = nodes[name]
            if upstream.kind == "generate" and getattr(upstream.params, "n", 2) < 2:
                problems.append(Problem(file, f"stages.{name}.n", f"expected at least 2 candidates per prompt: "
                                        f"'{node.name}' pairs two of them; got {upstream.params.n}"))
            if upstream.section == "stages":
                todo += upstream.refs.values()


def _check_cycles(top: SpecFile, nodes: dict[str, NodeDef], file, problems) -> None:
    # Round names point to the previous round or to round 0, so only direct references can loop.
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, stack: list[str]) -> bool:
        if state.get(name) == 2:
            return False
        if state.get(name) == 1:
            loop = stack[stack.index(name):] + [name]
            first = nodes[loop[0]]
            param = next(k for k, v in first.refs.items() if v == loop[1])
            problems.append(Problem(file, f"{first.section}.{first.name}.{param}", f"cycle: {' -> '.join(loop)}"))
            return True
        state[name] = 1
        for target in nodes[name].refs.values():
            if target in nodes and visit(target, stack + [name]):
                return True
        state[name] = 2
        return False

    for name in nodes:
        if visit(name, []):
            return


def pydantic_problems(exc: ValidationError, file: str, prefix: str, model: type[BaseModel], overridden) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        path = ".".join([prefix] + loc if prefix else loc)
        via = f" (from {overridden[path]})" if path in overridden else ""
        if err["type"] == "extra_forbidden" and loc[-1] in FOREIGN_KEYS:
            problems.append(Problem(file, path, f"unknown key '{loc[-1]}'{via}: {FOREIGN_KEYS[loc[-1]]}"))
        elif err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            hint = did_you_mean(loc[-1], owner.model_fields) if owner else ""
            known = f"; known keys: {', '.join(owner.model_fields)}" if owner else ""
            problems.append(Problem(file, path, f"unknown key '{loc[-1]}'{via}{hint}{known}"))
        elif err["type"] == "missing":
            problems.append(Problem(file, path, "required key is missing"))
        else:
            got = err.get("input")
            got_text = f"; got {got!r}" if not isinstance(got, (dict, list)) else ""
            msg = err["msg"][0].lower() + err["msg"][1:]
            problems.append(Problem(file, path, f"expected: {msg}{got_text}{via}"))
    return problems


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    for part in loc:
        info = model.model_fields.get(part)
        ann = getattr(info, "annotation", None) if info else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model
