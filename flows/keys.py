"""Stage keys: a hash of what determines a stage's output, nothing else.

key = sha256 of canonical JSON {kind, config, inputs' keys, code, seed, source files' content,
versions of the packages that change numbers (torch, transformers, peft, accelerate; vllm, read
from the vLLM environment, where it generates), as major.minor}. `code` is the normalised syntax tree of the definitions the stage's
run function reaches through the names it uses, transitively (including imports inside
functions), file by file: editing a stage or a helper it calls changes the key; editing a
comment, a docstring, an unrelated function or an unrelated module does not. A kind whose
executions can be sharded also hashes the flows/ functions that split and merge its shards.
Inputs enter by their keys, so keys chain: a change upstream changes everything downstream.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from dataclasses import dataclass
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


def _import_bindings(nodes, module: str, is_package: bool) -> dict[str, tuple[str, str | None]]:
    """Names bound by the import statements among `nodes`: name -> (module, attribute), or
    (module, None) where the name is a module itself."""
    package = module if is_package else module.rpartition(".")[0]
    bound = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = (alias.name, None)
                else:
                    bound[alias.name.split(".")[0]] = (alias.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                bound[alias.asname or alias.name] = (base, alias.name)
    return bound


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):  # docstrings say why, they do not change results
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _normalised(tree: ast.AST) -> str:
    return ast.dump(_strip_docstrings(tree), annotate_fields=False, include_attributes=False)


@dataclass
class _Module:
    rel: str  # the file, project-relative
    definitions: dict[str, ast.AST]  # top-level name -> its def, class or assignment
    imports: dict[str, tuple[str, str | None]]  # top-level import bindings
    preamble: list[ast.AST]  # top-level statements that run on import and bind no name (calls...)


@functools.lru_cache(maxsize=None)
def _parse(module: str, packages: tuple[str, ...]) -> _Module | None:
    path = _module_file(module, packages)
    if path is None:
        return None
    tree = _strip_docstrings(ast.parse(path.read_text(), filename=str(path)))
    definitions, preamble = {}, []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            definitions[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            for name in names:
                definitions[name] = node
            if not names:
                preamble.append(node)
        elif not isinstance(node, (ast.Import, ast.ImportFrom)):
            preamble.append(node)
    imports = _import_bindings([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                               module, path.name == "__init__.py")
    rel = path.relative_to(PROJECT_ROOT).as_posix() if path.is_relative_to(PROJECT_ROOT) else str(path)
    return _Module(rel, definitions, imports, preamble)


def _uses(node: ast.AST, module: str, packages) -> set[tuple[str, str | None]]:
    """The project definitions `node` (a top-level definition of `module`) refers to, as
    (module, name); (module, None) for a module used as a whole."""
    parsed = _parse(module, packages)
    subs = list(ast.walk(node))  # one walk, read three times
    local = _import_bindings([n for n in subs if isinstance(n, (ast.Import, ast.ImportFrom))],
                             module, parsed.rel.endswith("__init__.py"))

    def resolve(name: str):
        """(module, attribute or None) that `name` means in this definition, or None (a builtin...)."""
        if name in local:
            return local[name]
        if name in parsed.definitions:
            return (module, name)
        return parsed.imports.get(name)

    def as_module(target):  # (module, attribute) -> the module it names, if it is one
        if target is None:
            return None
        mod, attr = target
        if attr is None:
            return mod
        return f"{mod}.{attr}" if _module_file(f"{mod}.{attr}", packages) else None

    found = set()
    attribute_bases = set()
    for sub in subs:
        if isinstance(sub, ast.Attribute):
            chain, base = [sub.attr], sub.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and (mod := as_module(resolve(base.id))):
                attribute_bases.add(id(base))
                for attr in reversed(chain):  # tasks.train.lora.add_lora: walk down the modules
                    if _module_file(f"{mod}.{attr}", packages):
                        mod = f"{mod}.{attr}"
                        continue
                    found.add((mod, attr))
                    break
                else:
                    found.add((mod, None))
    for sub in subs:
        if isinstance(sub, ast.Name) and id(sub) not in attribute_bases:
            target = resolve(sub.id)
            if target is None:
                continue
            mod = as_module(target)
            found.add((mod, None) if mod else target)
    for mod, attr in local.values():  # importing a module runs its top-level code (registration...)
        found.add((f"{mod}.{attr}", "") if attr and _module_file(f"{mod}.{attr}", packages) else (mod, ""))
    return {(m, n) for m, n in found if m.split(".")[0] in packages}


@functools.lru_cache(maxsize=None)
def _definition(module: str, name: str, packages: tuple[str, ...]) -> tuple[str, frozenset]:
    """A top-level definition's normalised code and the definitions it uses: once a process, as
    the closures of the stage kinds share most of their definitions."""
    node = _parse(module, packages).definitions[name]
    return _normalised(node), frozenset(_uses(node, module, packages))


@functools.lru_cache(maxsize=None)
def _preamble(module: str, packages: tuple[str, ...]) -> str:
    return "".join(map(_normalised, _parse(module, packages).preamble))


def code_closure(entries: list[tuple[str, str]], packages: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(project-relative file, hash of the code it contributes) for every file holding a definition
    that `entries` ((module, name) pairs) reach through the names they use, transitively: a
    function, class or constant counts where it is used, not every module its file imports."""
    reached: dict[str, dict[str, str]] = {}  # file -> {definition: normalised code}
    todo, seen = list(entries), set()
    while todo:
        mod, name = todo.pop()
        if (mod, name) in seen:
            continue
        seen.add((mod, name))
        parsed = _parse(mod, packages)
        if parsed is None:
            continue
        if parsed.rel not in reached:
            reached[parsed.rel] = {"": _preamble(mod, packages)}
        code = reached[parsed.rel]
        names = list(parsed.definitions) if name is None else [name] if name else []
        if name and name not in parsed.definitions:
            if name in parsed.imports:  # a name the module imports (a re-export): follow it
                todo.append(parsed.imports[name])
            continue
        for n in names:
            code[n], uses = _definition(mod, n, packages)
            todo.extend(uses)
    return tuple(sorted((rel, sha256(canonical(defs))[:16]) for rel, defs in reached.items()))


def user_code(params) -> dict[str, str]:
    """A user's own modules the stage reads (a reward function's), normalised as the project's code is."""
    return {label: sha256(_normalised(ast.parse(path.read_text(), filename=str(path))))[:16]
            for label, path in params.code_files().items()}


def code_version(kind: str) -> tuple[tuple[str, str], ...]:
    """The code a stage kind's result depends on: the closure of its run function (and for a kind
    whose executions can be sharded, of the flows/ functions that split and merge them)."""
    stage = load_stage_kinds()[kind]
    run = getattr(stage.run, "__wrapped__", stage.run)
    packages = (*PROJECT_PACKAGES, run.__module__.split(".")[0])  # a plugin's own package counts too
    entries = [(run.__module__, run.__name__)]
    if stage.shard_input is not None:
        entries += [("flows.pipeline", name) for name in SHARD_CODE]
        packages = (*packages, "flows")
        return _cached_closure(tuple(entries), packages, shallow=("flows",))
    return _cached_closure(tuple(entries), packages)


# flows/ code that shapes a sharded stage's table: where shards split, how they merge.
SHARD_CODE = ("shard_ranges", "shard_job", "run_shard", "merge_shards")


@functools.lru_cache(maxsize=None)
def _cached_closure(entries, packages, shallow=()) -> tuple[tuple[str, str], ...]:
    """code_closure, where a definition in a `shallow` package counts by its own code only (the
    engine's plumbing that the merge calls does not shape the table)."""
    deep = tuple(p for p in packages if p not in shallow)
    own = [(m, n) for m, n in entries if m.split(".")[0] in shallow]
    result = dict(code_closure([e for e in entries if e not in own], deep))
    for mod, name in own:
        code, uses = _definition(mod, name, packages)
        result[f"{_parse(mod, packages).rel}:{name}"] = sha256(code)[:16]
        tables = code_closure([u for u in uses if u[0].split(".")[0] in deep], deep)
        result.update(tables)
    return tuple(sorted(result.items()))


def file_signature(path: Path) -> tuple:
    """What changes when a file's (or a folder's files') content may have: names, sizes, mtimes."""
    path = Path(path)
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    try:
        return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    except OSError:
        return ()


_FINGERPRINTS: dict[tuple, str] = {}


def file_fingerprint(path: Path) -> str:
    """Content hash of a file, or of every file under a folder (names and contents); hashed once a
    process while unchanged (a sweep's variants read the same files)."""
    signature = file_signature(path)
    if signature not in _FINGERPRINTS:
        found = _content_hash(Path(path))
        if not signature:  # unreadable: nothing to know it by
            return found
        _FINGERPRINTS[signature] = found
    return _FINGERPRINTS[signature]


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# Packages whose upgrades change numbers; major.minor enters every key (vllm only where it runs).
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "accelerate")


@functools.lru_cache(maxsize=None)
def package_version(name: str) -> str | None:
    """major.minor of an installed package, or None."""
    from importlib import metadata

    try:
        return ".".join(metadata.version(name).split(".")[:2])
    except metadata.PackageNotFoundError:
        return None


def package_versions(config: dict) -> dict[str, str | None]:
    versions = {name: package_version(name) for name in NUMERIC_PACKAGES}
    if "vllm" in (config.get("backend"), config.get("rollout_backend")):
        from tasks.vllm_env import vllm_version

        versions["vllm"] = vllm_version()  # the vLLM environment's (it runs there, not in this one)
    return versions


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
            "code": {**dict(code_version(node.kind)), **user_code(node.params)},
            "seed": seed,
            "sources": {str(p): file_fingerprint(p) for p in node.params.source_files()},
        }
        node.recipe["versions"] = package_versions(node.recipe["config"])
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
    old_versions = old.get("versions", {})
    for name in sorted(set(old_versions) | set(new.get("versions", {}))):
        before, after = old_versions.get(name), new.get("versions", {}).get(name)
        if before != after:
            reasons.append(f"{name} {before or 'absent'} -> {after or 'absent'}")
    if old.get("sources") != new["sources"]:
        reasons.append("source file content changed")
    return reasons or ["key changed"]
