"""Source stage kinds: where models and tables come from (built, loaded or read from files)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from tasks.base import BadInput, SpecPath, StageContext, StageParams, spec_relative, stage_kind


# ---- models ---------------------------------------------------------------------------------


class TinyParams(StageParams):
    """A randomly initialised tiny Llama with a word-level tokenizer over a synthetic task's words."""

    kind: Literal["tiny"] = "tiny"
    task: Literal["demo"] = "demo"
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(64, gt=0)


@stage_kind("tiny", TinyParams, output="model")
def tiny(ctx: StageContext) -> dict[str, float]:
    from tasks import demo_task
    from tasks.models import build_tiny_llama, build_word_tokenizer, save_model

    p: TinyParams = ctx.params
    tokenizer = build_word_tokenizer(demo_task.vocabulary())
    model = build_tiny_llama(
        tokenizer,
        hidden_size=p.hidden_size,
        num_layers=p.num_layers,
        num_heads=p.num_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        seed=ctx.seed,
    )
    save_model(model, tokenizer, ctx.out)
    return {"parameters": float(sum(x.numel() for x in model.parameters())), "vocab_size": float(len(tokenizer))}


def _is_local(path: str) -> bool:
    # "org/name" may be a hub id; anything that exists or looks like a filesystem path is local.
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1


class PretrainedParams(StageParams):
    """A model loaded with transformers from a local folder (hashed into the key) or a hub id."""

    kind: Literal["pretrained"] = "pretrained"
    path: str = Field(description="local folder or hub id")
    gguf_file: str | None = Field(None, description="a GGUF file inside `path` to load from")
    revision: str | None = Field(None, description="hub revision (pin it: the key cannot hash a hub model)")

    @field_validator("path")
    @classmethod
    def _local_relative_to_spec(cls, value: str, info: ValidationInfo) -> str:
        resolved = spec_relative(value, info)
        return resolved if Path(resolved).exists() else value  # else a hub id, kept as written

    def source_files(self) -> list[Path]:
        return [Path(self.path)] if _is_local(self.path) else []


@stage_kind("pretrained", PretrainedParams, output="model")
def pretrained(ctx: StageContext) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from tasks.models import load_tokenizer, save_model

    p: PretrainedParams = ctx.params
    path = str(Path(p.path).expanduser()) if _is_local(p.path) else p.path
    options = {k: v for k, v in (("gguf_file", p.gguf_file), ("revision", p.revision)) if v}
    model = AutoModelForCausalLM.from_pretrained(path, **options)
    tokenizer = load_tokenizer(path, **options)
    model.config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, ctx.out)
    return {"parameters": float(sum(x.numel() for x in model.parameters()))}


# ---- tables ---------------------------------------------------------------------------------


class SyntheticParams(StageParams):
    """A split of a synthetic task (tasks/demo_task.py), seeded by the seed and the split name."""

    kind: Literal["synthetic"] = "synthetic"
    task: Literal["demo"] = "demo"
    split: Literal[
        "sft", "preferences", "preferences_heldout", "prompts", "eval_prompts",
        "preferences_prompt_shift", "preferences_response_shift",
    ]
    size: int = Field(gt=0)
    topics: list[str] | None = Field(
        None, description="default: the task's training topics (held-out topics for preferences_prompt_shift)"
    )
    min_margin: float = Field(0.2, ge=0, description="preference splits: least gold margin of a pair")


@stage_kind("synthetic", SyntheticParams, output="table")
def synthetic(ctx: StageContext) -> dict[str, float]:
    from tasks import demo_task
    from tasks.tables import write_table

    p: SyntheticParams = ctx.params
    rows = demo_task.make_split(p.split, p.size, ctx.seed, topics=p.topics, min_margin=p.min_margin)
    write_table(rows, ctx.out)
    metrics = {"rows": float(p.size)}
    for column in ("reward", "margin"):
        if column in rows:
            metrics[f"mean_{column}"] = sum(rows[column]) / len(rows[column])
    return metrics


class FileParams(StageParams):
    path: SpecPath
    columns: list[str] | None = Field(
        None, description="columns to keep; each must be present (and not null) in every row"
    )
    # Without `columns`, a jsonl row missing one of the first row's keys is an error too.


    def source_files(self) -> list[Path]:
        return [Path(self.path)]


class JsonlParams(FileParams):
    """A table from a JSON-lines file (one object per line)."""

    kind: Literal["jsonl"] = "jsonl"


class ParquetParams(FileParams):
    """A table from a parquet file."""

    kind: Literal["parquet"] = "parquet"


def _check_columns(table, columns: list[str] | None, path: Path):
    if not columns:
        return table
    for column in columns:
        if column not in table.column_names:
            raise BadInput(str(path), column, f"a column {column!r} (the file has {table.column_names})")
        nulls = table.column(column).null_count
        if nulls:
            first = table.column(column).is_null().to_pylist().index(True)
            raise BadInput(str(path), f"row {first + 1}", f"a value in column {column!r} ({nulls} rows lack one)")
    return table.select(columns)


@stage_kind("jsonl", JsonlParams, output="table")
def jsonl(ctx: StageContext) -> dict[str, float]:
    import json

    import pyarrow as pa

    from tasks.tables import write_table

    path = Path(ctx.params.path).expanduser()
    rows = []
    # Read line by line (not datasets/pyarrow's reader) so an error names the line.
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(str(path), f"line {line_number}", f"a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise BadInput(str(path), f"line {line_number}", f"a JSON object, got {type(row).__name__}")
            # Every row needs the requested columns, or else all of the first row's columns.
            expected = ctx.params.columns or (list(rows[0]) if rows else list(row))
            for column in expected:
                if row.get(column) is None:
                    raise BadInput(str(path), f"line {line_number}", f"a value for {column!r}")
            rows.append(row)
    if not rows:
        raise BadInput(str(path), "rows", "at least one row")
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise BadInput(str(path), "rows", f"one type per column ({e})") from None
    table = _check_columns(table, ctx.params.columns, path)
    write_table(table, ctx.out)
    return {"rows": float(table.num_rows)}


@stage_kind("parquet", ParquetParams, output="table")
def parquet(ctx: StageContext) -> dict[str, float]:
    import pyarrow.parquet as pq

    from tasks.tables import write_table

    path = Path(ctx.params.path).expanduser()
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise BadInput(str(path), "file", f"a readable parquet file ({e})") from None
    table = _check_columns(table, ctx.params.columns, path)
    write_table(table, ctx.out)
    return {"rows": float(table.num_rows)}
