"""Sweeps: many variants of one spec, expanded above the pipeline.

A spec's `sweep:` maps dotted keys to lists of values, and every combination is a variant (a
grid); under `zip:` lists go together instead (the i-th values of each in one variant).
`seeds: N` repeats every variant with the spec's `seed` + 0 .. N-1 (`seeds: {count: N, stages:
[...]}`: only those stages take the variant's seed, so the other stages are shared by the seeds).
On the command line, `--sweep KEY=V1,V2` adds a grid key (or replaces the spec's values for it)
and `--seeds N` sets the count. flows/spec.py checks all of it.

Each variant is a plain spec, as if its values had been given with --set, validated and resolved
into its own node graph (the file is read once; an expansion is made once per process). Keys are
content hashes, so stages whose inputs and config agree across variants have one key, and the
pipeline (flows/pipeline.py) runs the union of the graphs, one task per key.
"""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass
from typing import Any

import yaml

from flows.errors import Problem, SpecError
from flows.graph import Node
from flows.keys import file_signature, resolve
from flows.spec import Spec, apply_options, apply_override, read_spec, sweep_axes, validate_spec


@dataclass
class Variant:
    index: int
    values: dict[str, Any]  # swept dotted key -> this variant's value (its seed under "seed")
    label: str  # what differs from the other variants: `beta=0.05 reference=previous seed=1`
    group: str  # the label without the seed: the variant its seeds repeat ("" for seeds alone)
    seed: int | None  # None: the sweep has no seeds
    spec: Spec
    nodes: list[Node]

    @property
    def recipes(self) -> str:
        """The store's index name for what this variant's stages last ran with (plan's reasons);
        a variant by its place in the sweep, so that a changed value reads as `beta: 0.05 -> 0.02`."""
        return self.spec.name if not self.label else f"{self.spec.name}.variant{self.index}"


@dataclass
class Sweep:
    spec: Spec  # as written, with --set, --rounds, --sweep and --seeds applied
    variants: list[Variant]

    @property
    def is_sweep(self) -> bool:
        """False for a plain run: one variant, the spec itself, recorded as before sweeps existed."""
        return bool(self.spec.sweep or self.spec.seeds)

    @property
    def seeded(self) -> bool:
        return self.spec.seeds is not None

    def unique(self) -> list[Node]:
        """One execution per stage key over all variants, each after its inputs (the variants' own
        orders are topological, and a key's inputs are in the variant where it first appears)."""
        found: dict[str, Node] = {}
        for variant in self.variants:
            for node in variant.nodes:
                found.setdefault(node.key, node)
        return list(found.values())

    def groups(self) -> list[str]:
        return list(dict.fromkeys(v.group for v in self.variants))


def parse_sweep_option(item: str, file: str) -> tuple[str, list]:
    """`--sweep stages.dpo.beta=0.05,0.1` -> ("stages.dpo.beta", [0.05, 0.1]): the values are one
    YAML flow sequence, so `rounds.reference=fixed,{mix: 0.5}` holds a mapping too."""
    if "=" not in item:
        raise SpecError(Problem(file, "", f"--sweep {item!r}: expected dotted.key=V1,V2,..."))
    key, _, text = item.partition("=")
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", exc)
        raise SpecError(Problem(file, key, f"--sweep values {text!r} are not valid YAML: {problem}"))
    if not key.strip() or not values:
        raise SpecError(Problem(file, key, f"--sweep {item!r}: expected dotted.key=V1,V2,..."))
    return key.strip(), values


_EXPANDED: dict[tuple, tuple[tuple, Sweep]] = {}  # arguments -> (what the files were, the expansion)


def expand(spec_file: str, overrides: list[str] = (), rounds: int | None = None, sweep: list[str] = (),
           seeds: int | None = None) -> Sweep:
    """The spec's variants, each validated and resolved; a plain spec is one variant. The same
    arguments give the same expansion, made once per process while the spec and the files its
    stages read are unchanged (the CLI expands to check before anything runs, then the flow
    expands with its own parameters; `alignflow serve`'s runs, in one process, each see the files
    as they are then)."""
    memo = (os.path.abspath(spec_file), tuple(overrides), rounds, tuple(sweep), seeds)
    if memo in _EXPANDED:
        files, found = _EXPANDED[memo]
        if files == _files(spec_file, found):
            return found
    file = str(spec_file)
    raw = read_spec(spec_file)
    overridden = apply_options(raw, file, overrides, rounds)
    for item in sweep:
        key, values = parse_sweep_option(item, file)
        if not isinstance(raw.setdefault("sweep", {}), dict):
            raise SpecError(Problem(file, "sweep", "expected a mapping of dotted keys to lists of values"))
        raw["sweep"][key] = values
        overridden[f"sweep.{key}"] = "--sweep"
    if seeds is not None:
        raw["seeds"] = {**raw["seeds"], "count": seeds} if isinstance(raw.get("seeds"), dict) else seeds
        overridden["seeds"] = "--seeds"
    base = validate_spec(raw, file, overridden)
    if not (base.sweep or base.seeds):
        found = Sweep(base, [Variant(0, {}, "", "", None, base, resolve(base))])
    else:
        found = Sweep(base, _variants(base, raw, file, overridden))
    _EXPANDED[memo] = (_files(spec_file, found), found)
    return found


def _files(spec_file: str, sweep: Sweep) -> tuple:
    """The signatures of the files an expansion read: the spec, its stages' sources and code."""
    paths = {str(spec_file)}
    for variant in sweep.variants:
        for node in variant.spec.nodes.values():
            paths.update(map(str, node.params.source_files()))
            paths.update(map(str, node.params.code_files().values()))
    return tuple(file_signature(p) for p in sorted(paths))


def _variants(base: Spec, raw: dict, file: str, overridden: dict[str, str]) -> list[Variant]:
    axes = sweep_axes(base.sweep)
    seeds = [base.seed + i for i in range(base.seeds.count)] if base.seeds else [None]
    shown = _differing(axes)
    names = short_names([k for axis in axes for k in axis])
    origin = {k: overridden.get(f"sweep.{k}", "sweep") for axis in axes for k in axis}
    plain = {k: v for k, v in raw.items() if k not in ("sweep", "seeds")}
    variants, problems = [], {}
    for picks in itertools.product(*(range(len(next(iter(axis.values())))) for axis in axes)):
        values = {k: v[i] for axis, i in zip(axes, picks) for k, v in axis.items()}
        group = " ".join(f"{names[k]}={show(v)}" for k, v in values.items() if k in shown)
        for seed in seeds:
            spec_raw, marks = copy.deepcopy(plain), dict(overridden)
            for key, value in values.items():
                apply_override(spec_raw, key.split("."), copy.deepcopy(value), file)
                marks[key] = origin[key]
            if seed is not None:
                for key in [f"stages.{s}.seed" for s in base.seeds.stages] if base.seeds.stages else ["seed"]:
                    apply_override(spec_raw, key.split("."), seed, file)
                    marks[key] = "seeds"
            label = " ".join(x for x in (group, f"seed={seed}" if seed is not None else "") if x)
            try:
                spec = validate_spec(spec_raw, file, marks)
            except SpecError as err:
                for p in err.problems:  # the same mistake in many variants: said once, with the first
                    problems.setdefault((p.path, p.message), Problem(p.file, p.path, f"{p.message} (variant {label})"))
                continue
            seeded = {**values, "seed": seed} if seed is not None else values
            variants.append(Variant(len(variants), seeded, label, group, seed, spec, resolve(spec)))
    if problems:
        raise SpecError(list(problems.values()))
    return variants


def _differing(axes: list[dict[str, list]]) -> set[str]:
    """The swept keys whose values differ between variants (all of them when none does)."""
    keys = [k for axis in axes for k in axis]
    differ = {k for axis in axes for k, v in axis.items() if len({show(x) for x in v}) > 1}
    return differ or set(keys)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest tail that no other key shares: `beta`, `reference`; `dpo.lr`
    and `sft.lr` where two keys end in `lr`."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        names[key] = tail
    return names


def show(value: Any) -> str:
    """A value as a person writes it in a spec: 0.05, previous, true, {mix: 0.5}."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
