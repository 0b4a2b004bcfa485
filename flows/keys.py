"""Stage keys: a hash of what determines a stage's output, nothing else.

key = sha256 of canonical JSON {kind, config, inputs' keys, code, seed, source files' content}.
`code` is the normalised syntax tree of the module that defines the stage kind and of every
project module it imports (transitively, including imports inside functions): editing a stage or
a helper it uses changes the key; editing a comment, a docstring or an unrelated module does not.
Inputs enter by their keys, so keys chain: a change upstream changes everything downstream.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from pathlib import Path

from flows.graph import Node, expand
from tasks import load_stage_kinds

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("tasks",)  # code a stage's result can depend on


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _module_file(module: str, packages: tuple[str, ...]) -> Path | None:
    if module.split(".")[0] not in packages:
        return None
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None) and module.split(".")[0] not in PROJECT_PACKAGES:
        return Path(loaded.__file__)  # a plugin's module
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, if any
    return found


def _normalised(tree: ast.Module) -> str:
    for node in ast.walk(tree):  # docstrings say why, they do not change results
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@functools.lru_cache(maxsize=None)
def code_version(module: str) -> tuple[tuple[str, str], ...]:
    """(project-relative file, hash of its normalised code) for the module and all it imports."""
    packages = (*PROJECT_PACKAGES, module.split(".")[0])  # a plugin's own package counts too
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name, packages)
        if path is None:
            continue
        rel = path.relative_to(PROJECT_ROOT).as_posix() if path.is_relative_to(PROJECT_ROOT) else str(path)
        if rel in seen:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        seen[rel] = sha256(_normalised(tree))[:16]
        todo.extend(_imported_modules(tree, name, path.name == "__init__.py"))
    return tuple(sorted(seen.items()))


def user_code(params) -> dict[str, str]:
    """A user's own modules the stage reads (a reward function's), normalised as the project's code is."""
    return {label: sha256(_normalised(ast.parse(path.read_text(), filename=str(path))))[:16]
            for label, path in params.code_files().items()}


def stage_module(kind: str) -> str:
    return load_stage_kinds()[kind].run.__module__


def file_fingerprint(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (names and contents)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_config(node: Node) -> dict:
    params = node.params
    skip = {"kind", "seed", *node.inputs, *type(params).not_in_key}
    return params.model_dump(mode="json", exclude=skip)


def assign_keys(nodes: list[Node], spec_seed: int) -> None:
    """Fill in `key` and `recipe` of every node (nodes in topological order)."""
    keys: dict[str, str] = {}
    for node in nodes:
        seed = node.params.seed if node.params.seed is not None else spec_seed
        node.recipe = {
            "kind": node.kind,
            "config": stage_config(node),
            "inputs": {param: keys[i] for param, i in sorted(node.inputs.items())},
            "code": {**dict(code_version(stage_module(node.kind))), **user_code(node.params)},
            "seed": seed,
            "sources": {str(p): file_fingerprint(p) for p in node.params.source_files()},
        }
        node.key = sha256(canonical(node.recipe))[:24]
        keys[node.id] = node.key


def resolve(spec) -> list[Node]:
    """Every stage execution of a validated spec, in run order, with its key."""
    nodes = expand(spec)
    assign_keys(nodes, spec.seed)
    return nodes


def explain_change(old: dict, new: dict, input_labels: dict[str, str]) -> list[str]:
    """Why a recipe differs from the one last run, in words a user recognises."""
    reasons = []
    if old.get("kind") != new["kind"]:
        reasons.append(f"kind {old.get('kind')} -> {new['kind']}")
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(k) != new_cfg.get(k):
            reasons.append(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}")
    if old.get("seed") != new["seed"]:
        reasons.append(f"seed: {old.get('seed')} -> {new['seed']}")
    for param, key in new["inputs"].items():
        if old.get("inputs", {}).get(param) != key:
            reasons.append(f"input {param} ({input_labels.get(param, param)}) changed")
    old_code = old.get("code", {})
    changed = sorted(f for f in set(old_code) | set(new["code"]) if old_code.get(f) != new["code"].get(f))
    if changed:
        reasons.append("code changed: " + ", ".join(changed))
    if old.get("sources") != new["sources"]:
        reasons.append("source file content changed")
    return reasons or ["key changed"]
