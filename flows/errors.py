"""Errors a user can act on: each names the file, the dotted field and what was expected."""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass
class Problem:
    file: str
    path: str  # dotted path in the spec, e.g. "stages.dpo.beta"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class SpecError(Exception):
    """A bad spec, option or input: the CLI prints it and exits 2, having written nothing."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = problems if isinstance(problems, list) else [problems]
        super().__init__("\n".join(str(p) for p in self.problems))


class StageFailed(Exception):
    """A stage raised while running: the CLI names it and exits 1."""

    def __init__(self, stage: str, round: int, cause: BaseException):
        self.stage, self.round, self.cause = stage, round, cause
        super().__init__(f"stage '{stage}' (round {round}) failed: {type(cause).__name__}: {cause}")


class SweepFailed(Exception):
    """Variants of a sweep failed (the others finished): the CLI prints how many and exits 1.
    `result` is the sweep's result as a finished one has it; `failures`: (variant, StageFailed)."""

    def __init__(self, result: dict, failures: list[tuple[str, StageFailed]]):
        self.result, self.failures = result, failures
        total = len(result["variants"])
        super().__init__(f"{len(failures)} of {total} variants failed: "
                         + "; ".join(f"{label}: {err}" for label, err in failures))


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
