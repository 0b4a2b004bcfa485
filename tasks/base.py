"""What every stage kind shares: its parameters, the context it runs in, and the registry.

A stage kind is a plain function `run(ctx) -> metrics` plus a pydantic model of its parameters.
It reads its inputs from `ctx.inputs` (artifact folders), writes its one artifact into `ctx.out`,
and returns its final metrics. It knows nothing of Prefect or MLflow: `flows/` calls it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

# What an artifact holds; a reference names the type it expects so the spec is checked up front.
ArtifactType = Literal["model", "reward_model", "table", "metrics"]


@dataclass(frozen=True)
class RefTo:
    """Marks a parameter as a reference to another node's output (by name)."""

    types: tuple[str, ...]


def Ref(*types: str) -> Any:
    """A reference parameter: `policy: Ref("model")`. The value in the spec is a node name."""
    return Annotated[str, RefTo(types)]


def OptionalRef(*types: str) -> Any:
    return Annotated[str | None, RefTo(types)]


def spec_relative(value: str, info: ValidationInfo) -> str:
    """A relative path is relative to the spec file's folder, not to where you run from."""
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or base is None else Path(base) / path)


# A file path parameter, resolved against the spec's folder.
SpecPath = Annotated[str, AfterValidator(spec_relative)]


class StageParams(BaseModel):
    """Base of every kind's parameters. Unknown keys are errors (a typo must not pass silently)."""

    # Infinities and nan (`.inf`, `nan`, `1e400`) are spec errors, never a poisoned artifact.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: str
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="defaults to the spec's seed")

    # Parameters that never change the result (how much to print, say) are left out of the key.
    not_in_key: ClassVar[frozenset[str]] = frozenset()

    # The spec's folder (from the validation context): where a user's own code is imported from.
    _spec_dir: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _remember_spec_dir(self, info: ValidationInfo):
        self._spec_dir = (info.context or {}).get("base_dir")
        return self

    @property
    def spec_dir(self) -> str | None:
        return None if self._spec_dir is None else str(self._spec_dir)

    def source_files(self) -> list[Path]:
        """Files whose content the result depends on (hashed into the key; must exist)."""
        return []

    # A kind's params may also define `run_tags(self) -> dict[str, str]`: tags of the stage's MLflow
    # run that say what it measures (reward_accuracy: which reward). Not defined here: this class's
    # code is in every stage's key.

    def code_files(self) -> dict[str, Path]:
        """A user's own Python modules the result depends on (a reward function's), by label:
        their normalised code is in the key, like the project's own code."""
        return {}

    def environment_problems(self) -> list[tuple[str, str]]:
        """(field, message) for each setting this machine cannot run (vLLM where there is none, say):
        reported when the spec is loaded, exit 2 before any stage runs."""
        return []


class BadInput(ValueError):
    """Raised by a stage when its input data is malformed (a missing column, an empty file):
    the user's data is at fault, not the code, so the CLI reports it as such (exit code 2)."""

    def __init__(self, file: str, field: str, expected: str):
        self.file, self.field, self.expected = file, field, expected
        super().__init__(f"{file}: {field}: {expected}")


MAX_LINE_BYTES = 64 << 20  # one line of a data file: a file with no newline is not read to the end of memory


def text_lines(handle, file: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a file opened in binary mode, read line by line with a
    bound on a line's length; a byte that is not UTF-8 is a BadInput naming the line."""
    line_number = 0
    while line := handle.readline(MAX_LINE_BYTES + 1):
        line_number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise BadInput(file, f"line {line_number}", f"a line of at most {MAX_LINE_BYTES >> 20} MiB")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(file, f"line {line_number}", f"UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})") from None
        yield line_number, text


class Progress:
    """A progress counter a stage advances; `flows/` draws it (rich) and tests ignore it."""

    def advance(self, n: int = 1) -> None:  # pragma: no cover - replaced by flows
        pass


def no_metrics(metrics: dict[str, float], step: int) -> None:
    pass


@contextlib.contextmanager
def no_progress(description: str, total: int | None = None) -> Iterator[Progress]:
    yield Progress()


@dataclass
class StageContext:
    """Everything a stage function sees."""

    out: Path  # an empty folder to write the artifact into (renamed into place by the store)
    inputs: dict[str, Path]  # parameter name -> folder of the referenced artifact
    params: StageParams
    seed: int
    log_metrics: Callable[[dict[str, float], int], None] = no_metrics  # step metrics
    progress: Callable[..., contextlib.AbstractContextManager[Progress]] = field(
        default=no_progress
    )
    # A folder that outlives a failed attempt, for a long stage's checkpoints: the next attempt at
    # the same key resumes from them. Removed once the artifact is in place. None: no checkpoints.
    checkpoints: Path | None = None
    # A sharded execution (flows/pipeline.py) covers only rows [start, end) of the table its kind
    # shards (StageKind.shard_input); None: all of them. See `shard_rows`.
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class StageKind:
    name: str
    params: type[StageParams]
    output: ArtifactType
    run: Callable[[StageContext], dict[str, float]]
    # Row-parallel kinds name the table parameter whose rows they map over: the engine can split
    # an execution into shards of those rows (params.shards) and concatenate their outputs.
    shard_input: str | None = None
    summarize: Callable[[dict], dict[str, float]] | None = None  # merged shards' metrics, from the table's columns


STAGE_KINDS: dict[str, StageKind] = {}


def stage_kind(name: str, params: type[StageParams], output: ArtifactType, shard_input: str | None = None,
               summarize: Callable[[dict], dict[str, float]] | None = None):
    """Register `run` as stage kind `name` (a row-parallel kind: see StageKind.shard_input)."""

    def register(run: Callable[[StageContext], dict[str, float]]):
        STAGE_KINDS[name] = StageKind(name=name, params=params, output=output, run=run, shard_input=shard_input,
                                      summarize=summarize)
        return run

    return register


def shard_rows(table, ctx: StageContext):
    """The rows of `table` this execution covers (all of them unless it is a shard), and the
    index of the first: row ids stay global, so shards concatenate to the unsharded table."""
    if ctx.rows is None:
        return table, 0
    start, end = ctx.rows
    return table.slice(start, end - start), start


def ref_fields(params: type[StageParams]) -> dict[str, tuple[str, ...]]:
    """Parameter name -> accepted artifact types, for every reference parameter."""
    refs = {}
    for name, info in params.model_fields.items():
        for meta in info.metadata:
            if isinstance(meta, RefTo):
                refs[name] = meta.types
    return refs
