"""Programmatic reward functions: a built-in name (`reward_fn: demo_gold` means
REWARD_FNS["demo_gold"]) or a user's own, `"module:function"`: a module beside the spec (found
there first, so a `myreward.py` beside the spec works), else an installed one. `resolve_reward_fn`
is the one resolver every stage uses (score's reward_fn, evaluate's judge, the online stages'
rewards).

A module beside the spec is loaded from its file under a private module name, never under its own:
a `random.py`, `json.py` or `tasks.py` there cannot replace Python's module or alignflow's package
for the process. Its own imports of modules beside it still work (the spec's folder is searched
after every other place while it loads); one that names a module beside the spec which is also
Python's or an installed one is a spec error (which one it would get is a guess), saying so.

A reward function maps (prompt, response) to a float. The prompt is a str, or for a
conversational prompt a list of {role, content} messages. Pure Python, so a spec can be checked
without importing torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, ValidationInfo

from tasks import demo_task

RewardFn = Callable[[Any, str], float]


def prompt_text(prompt) -> str:
    """The text a reward reads from a prompt: a str as it is; for a conversation (a list of
    {role, content} messages), the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("a conversational prompt with no user message")
    return users[-1]


# ---- arithmetic: a verifiable reward ------------------------------------------------------------

# "What is 7 + 5?": two integers and an operator (×, x between numbers and "times" too).
_QUESTION = re.compile(r"(-?\d+)\s*(\+|-|\*|×|x|times)\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b,
    "*": lambda a, b: a * b, "×": lambda a, b: a * b, "x": lambda a, b: a * b, "times": lambda a, b: a * b,
}
ARITHMETIC_LENGTH_PENALTY = 0.01  # per word of the response
ARITHMETIC_MAX_WORDS = 20  # the penalty stops growing here: at most 0.2, so a right answer always wins


def arithmetic_question(prompt) -> tuple[int, int, int]:
    """(a, b, the right answer) of the first "a op b" in the prompt's (last user message's) text."""
    text = prompt_text(prompt)
    match = _QUESTION.search(text)
    if match is None:
        raise ValueError(f"the arithmetic reward needs a question 'a op b' (op one of + - * ×) in the prompt, got {text!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a, b, _OPS[op](a, b)


def arithmetic_answer(response: str, operands: tuple[int, ...] = ()) -> float | None:
    """The answer a response gives: its first number that is not one of the question's operands
    (this model restates the question before answering: "7 + 5 = 12"), or None. Thousands
    separators are read ("1,024"); signs count ("-3"), but an operand's value with either sign is
    skipped ("10-18" reads as 10, then 18)."""
    skip = {abs(x) for x in operands}
    for token in _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response)):
        value = float(token)
        if abs(value) not in skip:
            return value
    return None


def arithmetic_reward(prompt, response: str) -> float:
    """Verifiable reward for "What is a op b? Answer with just the number.":
    1 if the response's answer (arithmetic_answer) is right, else 0, minus 0.01 per word of the
    response (counted up to 20 words) to break ties in favour of doing what the prompt asks.
    A response with no answer at all gets the most penalty: -0.2, below any wrong number.
    So: right answers score in [0.8, 0.99], wrong ones in [-0.2, -0.01].

    The operands are skipped when reading the answer, so a question whose answer equals an
    operand's absolute value (5 * 1, 4 - 2) cannot be answered right: don't ask those.
    """
    a, b, expected = arithmetic_question(prompt)
    answer = arithmetic_answer(response, (a, b))
    words = min(len(response.split()), ARITHMETIC_MAX_WORDS)
    if answer is None:
        return -ARITHMETIC_LENGTH_PENALTY * ARITHMETIC_MAX_WORDS
    return float(answer == expected) - ARITHMETIC_LENGTH_PENALTY * words


def conversation_text(prompt) -> str:
    """A prompt as plain text, for a judge that reads text: a str as it is; a one-message
    conversation, that message's content; a longer one, a "role: content" line per message."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def demo_gold_reward(prompt, response: str) -> float:
    """The demo task's true reward (tasks/demo_task.py), on a plain or conversational prompt."""
    return demo_task.gold_reward(prompt_text(prompt), response)


def brevity_reward(prompt, response: str) -> float:
    """The shorter response wins: minus its length in characters (surrounding spaces ignored).
    pipelines/exrm_vs_dporm_smollm2.yaml's gold judge: a property of the text alone, so a reward
    model can learn it from pairs (a truncated, rambling answer against a finished, short one)."""
    return -float(len(response.strip()))


REWARD_FNS: dict[str, RewardFn] = {
    "demo_gold": demo_gold_reward,
    "arithmetic": arithmetic_reward,
    "brevity": brevity_reward,
}


def is_import_path(name: str) -> bool:
    """"module:function" (a user's reward), as opposed to a built-in name."""
    return ":" in name


def _beside(name: str, folder: Path) -> Path | None:
    """The file (or package folder) of a top-level module `name` in `folder`, or None."""
    if (folder / f"{name}.py").is_file():
        return folder / f"{name}.py"
    if (folder / name).is_dir() and name.isidentifier():
        return folder / name
    return None


def _elsewhere(name: str, folder: Path) -> str | None:
    """Where Python finds a top-level module `name` without `folder`: "Python's own module", an
    installed one's file, or None."""
    import importlib.util
    import sys

    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return "Python's own module"
    loaded = sys.modules.get(name)
    try:
        spec = loaded.__spec__ if loaded is not None and getattr(loaded, "__spec__", None) else importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    if spec is None or (origin and Path(origin).resolve().is_relative_to(folder.resolve())):
        return None
    return f"the installed module at {origin or next(iter(spec.submodule_search_locations or []), '?')}"


def _shadowing(file: Path, folder: Path, seen: set[Path]) -> str | None:
    """Why the module in `file`, or a module beside it that it imports, would get another module
    than the one beside the spec that it names: None if none would."""
    import ast

    files = sorted(file.rglob("*.py")) if file.is_dir() else [file]
    for path in files:
        if path in seen:
            continue
        seen.add(path)
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue  # reported when it is imported
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in (n.split(".")[0] for n in names):
                local = _beside(name, folder)
                if local is None or local == path or (local.is_dir() and not (local / "__init__.py").is_file()):
                    continue  # nothing beside it; a module naming itself (it means the other); a data folder
                other = _elsewhere(name, folder)
                if other is not None:
                    return (f"{path.relative_to(folder)} imports '{name}', which is {other}, not "
                            f"{local.name} beside the spec: rename {local.name}")
                inner = _shadowing(local, folder, seen)
                if inner:
                    return inner
    return None


def _load_beside(module: str, folder: Path):
    """Import `module` from its file in `folder` under a private name (see the module's docstring)."""
    import hashlib
    import importlib
    import importlib.machinery
    import importlib.util
    import sys

    top, _, rest = module.partition(".")
    local = _beside(top, folder)
    problem = _shadowing(local, folder, set())
    if problem:
        raise ImportError(problem)
    private = f"_alignflow_user_{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]}_{top}"
    for name in [m for m in sys.modules if m == private or m.startswith(private + ".")]:
        del sys.modules[name]  # afresh each time: an edit made since is seen
    if local.is_dir():
        init = local / "__init__.py"
        spec = importlib.util.spec_from_file_location(private, init, submodule_search_locations=[str(local)]) \
            if init.is_file() else importlib.machinery.ModuleSpec(private, None, is_package=True)
        if not init.is_file():
            spec.submodule_search_locations = [str(local)]
    else:
        spec = importlib.util.spec_from_file_location(private, local)
    loaded = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.modules[private] = loaded
    sys.path.append(str(folder))  # last: its sibling imports, and nothing Python or an install provides
    try:
        importlib.invalidate_caches()
        if spec.loader is not None:
            spec.loader.exec_module(loaded)
        return importlib.import_module(f"{private}.{rest}") if rest else loaded
    except BaseException:
        sys.modules.pop(private, None)
        raise
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:  # siblings it imported: its own, not the process's
            file = getattr(sys.modules[name], "__file__", None)
            if not name.startswith(private) and file and Path(file).resolve().is_relative_to(folder.resolve()):
                del sys.modules[name]


def _import_user_module(module: str, folder: str | Path | None):
    """The module `module` names: from `folder` (the spec's) when it is there, else an installed
    one. A module in `folder` is loaded afresh each time: an edit made since (or the same name
    beside another spec) is seen."""
    import importlib

    if folder is not None and _beside(module.partition(".")[0], Path(folder)) is not None:
        return _load_beside(module, Path(folder))
    return importlib.import_module(module)


def resolve_reward_fn(name: str, folder: str | Path | None = None) -> RewardFn:
    """The reward function `name` names: a built-in name, or "module:function" imported with
    `folder` (the spec's) first on sys.path. ValueError, saying what is wrong, when the module
    does not import or the name is not a callable."""
    if not is_import_path(name):
        if name not in REWARD_FNS:
            raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARD_FNS))}; "
                             "or your own, \"module:function\" (a module beside the spec, or importable)")
        return REWARD_FNS[name]
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"{name!r}: expected \"module:function\", e.g. myreward:score")
    try:
        loaded = _import_user_module(module, folder)
    except Exception as e:  # the user's module: any error it raises while importing
        where = f" (looked in {folder} first)" if folder is not None else ""
        raise ValueError(f"{name!r}: module {module!r} does not import{where}: {type(e).__name__}: {e}") from None
    fn = loaded
    for part in attribute.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"{name!r}: {attribute!r} in {getattr(loaded, '__file__', module)} is "
                         f"{'missing' if fn is None else 'not callable'}; expected a function (prompt, response) -> float")
    return fn


def reward_module_file(name: str, folder: str | Path | None = None) -> tuple[str, Path] | None:
    """(label, file) of the module a "module:function" reward is read from, for the stage key:
    its label is the file's path relative to the folder it was found in (myreward.py). None for a
    built-in name or a module that is not a source file."""
    if not is_import_path(name):
        return None
    module = _import_user_module(name.partition(":")[0], folder)
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    file = Path(file).resolve()
    depth = name.partition(":")[0].count(".") + (file.name == "__init__.py")
    return file.relative_to(file.parents[depth]).as_posix(), file


def _check_reward_fn(value: str, info: ValidationInfo) -> str:
    resolve_reward_fn(value, (info.context or {}).get("base_dir"))  # raises ValueError: a spec error
    return value


# A spec's reward function field: checked (imported) when the spec is; the stage resolves it
# again with params.spec_dir when it runs.
RewardFnName = Annotated[str, AfterValidator(_check_reward_fn)]


def reward_code_files(names, folder: str | Path | None) -> dict[str, Path]:
    """{label: file} of the user modules among reward names (None entries skipped): for the key."""
    found = (reward_module_file(name, folder) for name in names if name is not None)
    return dict(item for item in found if item is not None)
