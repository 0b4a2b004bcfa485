"""Source stage kinds: where models and tables come from (built, loaded or read from files)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from tasks.base import BadInput, SpecPath, StageContext, StageParams, spec_relative, stage_kind, text_lines


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


def local_or_hub(value: str, info: ValidationInfo) -> str:
    """A path that exists relative to the spec's folder, resolved; anything else is a hub id, kept as written."""
    resolved = spec_relative(value, info)
    return resolved if Path(resolved).exists() else value


def _is_local(path: str) -> bool:
    # "org/name" may be a hub id; anything that exists or looks like a filesystem path is local.
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1


def package_folder(name: str) -> Path:
    """The folder of an installed Python package, found with importlib without importing it
    (a package's __init__ may need dependencies its data files do not). ValueError when the
    package is not installed, or is a single module rather than a folder."""
    import importlib.util
    import sys

    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # a dotted name imports its parents, which may be missing or fail
        spec = None
    if spec is None:
        raise ValueError(f"an installed Python package; {name!r} is not installed in this environment ({sys.executable})")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise ValueError(f"a package (a folder of files); {name!r} is a single module ({spec.origin})")
    return Path(locations[0])


def hub_revision(revision: str | None, path: str | None, what: str) -> str | None:
    """A hub id must come with a pinned revision: the key cannot hash what the hub serves."""
    if revision is None and path is not None and not _is_local(path):
        raise ValueError(
            f"a revision (commit sha or tag) for hub {what} {path!r}, so that the cache key names exactly "
            f"what is read (if {path!r} is meant as a local folder: it was not found; relative paths are "
            "relative to the spec's folder)"
        )
    return revision


class PretrainedParams(StageParams):
    """A model loaded with transformers from a local folder (hashed into the key) or a hub id.

    With `gguf_file`, the model is converted once (dequantised) into a plain transformers folder,
    the artifact; the key hashes that one file, not the folder around it. With `package`, `path`
    is a folder inside an installed Python package (default: the package's own folder), so a spec
    names a model a package ships without writing out a site-packages path.
    """

    kind: Literal["pretrained"] = "pretrained"
    package: str | None = Field(
        None, description="an installed Python package: `path` is relative to its folder (found with importlib, not imported)"
    )
    path: str | None = Field(
        None, validate_default=True,
        description="local folder or hub id (relative to the spec's folder, or to `package`'s folder when given)",
    )
    gguf_file: str | None = Field(None, description="a GGUF file inside `path` to load from")
    revision: str | None = Field(
        None, validate_default=True, description="hub id: required, the commit sha (or tag) to load; the key cannot hash a hub model"
    )
    dtype: Dtype = Field(
        "auto", description="the dtype the weights are stored, and so loaded, in (tasks.models.torch_dtype)"
    )

    @field_validator("package")
    @classmethod
    def _package_installed(cls, value: str | None) -> str | None:
        if value is not None:
            package_folder(value)  # raises, naming the package, when it is not installed
        return value

    @field_validator("path")
    @classmethod
    def _local_relative_to_spec(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "package" not in info.data:  # `package` failed its own check: reported there
            return value
        package = info.data["package"]
        if package is not None:
            folder = package_folder(package)
            resolved = (folder / (value or ".")).resolve()
            if not resolved.exists():
                raise ValueError(f"a folder or file inside package {package!r}; {value!r} is not in {folder}")
            return str(resolved)
        if value is None:
            raise ValueError("a local folder or hub id (or `package`, for a folder inside an installed package)")
        return local_or_hub(value, info)

    @field_validator("gguf_file")
    @classmethod
    def _gguf_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if value is not None and path is not None and Path(path).is_dir() and not (Path(path) / value).is_file():
            raise ValueError(f"a GGUF file inside {path}; {value!r} is not there")
        return value

    @field_validator("revision")
    @classmethod
    def _hub_needs_revision(cls, value: str | None, info: ValidationInfo) -> str | None:
        return hub_revision(value, info.data.get("path"), "model")

    def source_files(self) -> list[Path]:
        if not _is_local(self.path):
            return []
        # A GGUF file is the whole model: hash it, not the folder around it (a package folder also
        # holds its code and __pycache__).
        return [Path(self.path) / self.gguf_file] if self.gguf_file else [Path(self.path)]


def _dequantised_gguf_options(gguf_file: str) -> dict:
    """from_pretrained options that unpack a GGUF file into plain weights, which save_pretrained
    can write. Recent transformers keep GGUF weights packed when a matmul kernel is available,
    and refuse to save such a model; GgufConfig(dequantize=True) asks for dense weights. Older
    versions always dequantise and have no such option."""
    import inspect

    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


@stage_kind("pretrained", PretrainedParams, output="model")
def pretrained(ctx: StageContext) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from tasks.models import load_tokenizer, save_model, torch_dtype

    p: PretrainedParams = ctx.params
    local = _is_local(p.path)
    path = str(Path(p.path).expanduser()) if local else p.path
    options = {k: v for k, v in (("gguf_file", p.gguf_file), ("revision", p.revision)) if v}
    if local:
        options["local_files_only"] = True  # a local folder never reaches for the hub
    model_options = dict(options)
    if p.gguf_file:
        model_options.update(_dequantised_gguf_options(p.gguf_file))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(p.dtype), **model_options)
    tokenizer = load_tokenizer(path, **options)
    model.config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, ctx.out)
    return {"parameters": float(sum(x.numel() for x in model.parameters()))}


Dtype = Literal["auto", "float32", "bfloat16", "float16"]  # tasks.models.torch_dtype reads it


class PretrainedRewardModelParams(StageParams):
    """A reward model someone else trained: a sequence classifier with one label, loaded with
    transformers from a local folder (hashed into the key) or a hub id, with its own tokenizer
    (and chat template). Stages that read a reward model re-tokenize the text with it, so the
    policy's vocabulary does not matter."""

    kind: Literal["pretrained_reward_model"] = "pretrained_reward_model"
    path: str = Field(description="local folder (relative to the spec's folder) or hub id")
    revision: str | None = Field(
        None, validate_default=True, description="hub id: required, the commit sha (or tag) to load; the key cannot hash a hub model"
    )
    dtype: Dtype = Field("auto", description="the dtype the weights are stored (and so loaded) in")

    @field_validator("path")
    @classmethod
    def _local_relative_to_spec(cls, value: str, info: ValidationInfo) -> str:
        resolved = local_or_hub(value, info)
        if _is_local(resolved) and not Path(resolved).expanduser().exists():
            raise ValueError(f"a folder from_pretrained loads (relative to the spec's folder) or a hub id; "
                             f"{spec_relative(value, info)} does not exist (make it first: e.g. `alignflow export`)")
        return resolved

    @field_validator("revision")
    @classmethod
    def _hub_needs_revision(cls, value: str | None, info: ValidationInfo) -> str | None:
        return hub_revision(value, info.data.get("path"), "reward model")

    def source_files(self) -> list[Path]:
        return [Path(self.path)] if _is_local(self.path) else []


@stage_kind("pretrained_reward_model", PretrainedRewardModelParams, output="reward_model")
def pretrained_reward_model(ctx: StageContext) -> dict[str, float]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tasks.models import load_tokenizer, save_model, torch_dtype

    p: PretrainedRewardModelParams = ctx.params
    local = _is_local(p.path)
    path = str(Path(p.path).expanduser()) if local else p.path
    options = {"revision": p.revision} if p.revision else {}
    if local:
        options["local_files_only"] = True
    config = AutoConfig.from_pretrained(path, **options)
    if config.num_labels != 1:
        raise BadInput(path, "config.json: num_labels", f"a reward model: a sequence classifier with one label; this one has {config.num_labels}")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(p.dtype), **options)
    tokenizer = load_tokenizer(path, **options)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head scores the last non-pad token
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
    size: int = Field(gt=0, le=10_000_000)  # bounded: a typo must not run out of memory
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


# How a source's rows are read: "table" as they are; "preferences" (trl's preference formats,
# explicit or implicit prompt, plain text or conversational, detected) and "hh_rlhf" (Anthropic's
# HH-RLHF dialogues) normalised to alignflow's pairs format by tasks/preferences.py.
SourceFormat = Literal["table", "preferences", "hh_rlhf"]


class TableSourceParams(StageParams):
    """What every table source shares: which format its rows are in, and which columns to keep."""

    format: SourceFormat = Field(
        "table",
        description="table: rows as they are; preferences: trl's preference formats (explicit/implicit "
        "prompt, plain/conversational; detected); hh_rlhf: Anthropic HH-RLHF dialogues. The last two "
        "give a pairs table (prompt, chosen, rejected, other columns kept)",
    )
    strict: bool = Field(
        False,
        description="preference formats: a row that cannot make a pair is an error (naming the row and "
        "the field) instead of being dropped and counted",
    )
    columns: list[str] | dict[str, str] | None = Field(
        None,
        description="a list: the columns to keep (after normalising, for the preference formats); a mapping "
        "{alignflow's name: the file's column}, e.g. {prompt: question, chosen: good, rejected: bad}: renames "
        "them (before normalising) and keeps the rest. Each named column must be present (and not null) in every row",
    )

    @field_validator("columns")
    @classmethod
    def _distinct_names(cls, value):
        if isinstance(value, dict) and len(set(value.values())) != len(value):
            raise ValueError(f"each of the file's columns renamed once; got {value}")
        return value

    @property
    def file_columns(self) -> list[str] | None:
        """The columns as the file names them."""
        return list(self.columns.values()) if isinstance(self.columns, dict) else self.columns


class FileParams(TableSourceParams):
    path: SpecPath
    # Format "table" without `columns`: a jsonl row missing one of the first row's keys is an error too.

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


def _rename_columns(data, mapping: dict[str, str], path: Path):
    """`data` (an Arrow table, or rows) with the file's columns renamed to alignflow's names
    (mapping: alignflow's name -> the file's column); each must be there, and no name taken twice."""
    is_table = hasattr(data, "column_names")
    names = data.column_names if is_table else list(dict.fromkeys(k for row in data for k in row))
    for new, old in mapping.items():
        if old not in names:
            raise BadInput(str(path), f"columns.{new}", f"a column {old!r} in the file (it has {names})")
        if new in names and new not in mapping.values():
            raise BadInput(str(path), f"columns.{new}", f"renaming {old!r} to {new!r}, but the file already has a "
                           f"column {new!r} (rename it too, or drop it from the file)")
    rename = {old: new for new, old in mapping.items()}
    if is_table:
        _check_columns(data, list(mapping.values()), path)  # no nulls
        return data.rename_columns([rename.get(c, c) for c in data.column_names])
    return [{rename.get(k, k): v for k, v in row.items()} for row in data]


def _finish_table(data, params: TableSourceParams, ctx: StageContext, file: str, row_labels=None) -> dict[str, float]:
    """Rename `params.columns` (a mapping), normalise `data` (an Arrow table, or rows for the
    preference formats) to `params.format`, keep `params.columns` (a list), write it and return
    the source's metrics (rows, and rows dropped why)."""
    from tasks.tables import write_table

    metrics: dict[str, float] = {}
    if isinstance(params.columns, dict):
        data = _rename_columns(data, params.columns, Path(file))
    if params.format != "table":
        from tasks.preferences import normalise_preferences

        rows_read = data.num_rows if hasattr(data, "num_rows") else len(data)
        data, dropped = normalise_preferences(
            data, params.format, strict=params.strict, file=file, row_labels=row_labels
        )
        metrics["rows_read"] = float(rows_read)
        metrics.update({name: float(n) for name, n in dropped.items()})
    table = _check_columns(data, params.columns if isinstance(params.columns, list) else None, Path(file))
    write_table(table, ctx.out)
    return {"rows": float(table.num_rows), **metrics}


@stage_kind("jsonl", JsonlParams, output="table")
def jsonl(ctx: StageContext) -> dict[str, float]:
    import json

    import pyarrow as pa

    p: JsonlParams = ctx.params
    path = Path(p.path).expanduser()
    rows, line_numbers = [], []
    # Read line by line (not datasets/pyarrow's reader) so an error names the line.
    with open(path, "rb") as f:
        for line_number, line in text_lines(f, str(path)):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(str(path), f"line {line_number}", f"a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise BadInput(str(path), f"line {line_number}", f"a JSON object, got {type(row).__name__}")
            if p.format == "table":
                # Every row needs the requested columns, or else all of the first row's columns.
                expected = p.file_columns or (list(rows[0]) if rows else list(row))
                for column in expected:
                    if row.get(column) is None:
                        named = {old: new for new, old in p.columns.items()} if isinstance(p.columns, dict) else {}
                        via = f" (columns.{named[column]})" if column in named else ""
                        raise BadInput(str(path), f"line {line_number}", f"a value for {column!r}{via}")
            rows.append(row)
            line_numbers.append(line_number)
    if not rows:
        raise BadInput(str(path), "rows", "at least one row")
    if p.format != "table":  # missing or odd values are the normaliser's to drop or report, by line
        return _finish_table(rows, p, ctx, str(path), [f"line {n}" for n in line_numbers])
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise BadInput(str(path), "rows", f"one type per column ({e})") from None
    return _finish_table(table, p, ctx, str(path))


@stage_kind("parquet", ParquetParams, output="table")
def parquet(ctx: StageContext) -> dict[str, float]:
    import pyarrow.parquet as pq

    path = Path(ctx.params.path).expanduser()
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise BadInput(str(path), "file", f"a readable parquet file ({e})") from None
    return _finish_table(table, ctx.params, ctx, str(path))


# `datasets` packaged builders: a name like these reads files given in data_files, which the key
# cannot see unless they sit in a folder named by `path`.
_BUILDER_NAMES = frozenset({"json", "parquet", "csv", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"})


class HubParams(TableSourceParams):
    """A table from a dataset that `datasets.load_dataset` reads: a local folder (hashed into the key,
    like `pretrained`) or a Hugging Face Hub dataset id, which must name a `revision` (a commit sha,
    best; a tag or branch can move) since the key cannot see the hub's content."""

    kind: Literal["hub"] = "hub"
    path: str = Field(description="local folder (its files read by load_dataset) or hub dataset id")
    name: str | None = Field(None, description="the dataset's configuration (subset) name")
    split: str = Field("train", description="split to read; slices work too: 'train[:1000]'")
    revision: str | None = Field(
        None, validate_default=True, description="hub id: required, the commit sha (or tag/branch) to read"
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="files (globs) to read, relative to `path`; a dict maps split names to files"
    )

    @field_validator("path")
    @classmethod
    def _local_relative_to_spec(cls, value: str, info: ValidationInfo) -> str:
        if value in _BUILDER_NAMES:
            raise ValueError(
                f"{value!r} names a datasets builder, whose files the cache key cannot see: give the folder "
                "holding the files as `path` (with `data_files` relative to it), or use the jsonl/parquet kinds"
            )
        return local_or_hub(value, info)

    @field_validator("revision")
    @classmethod
    def _hub_needs_revision(cls, value: str | None, info: ValidationInfo) -> str | None:
        return hub_revision(value, info.data.get("path"), "dataset")

    def source_files(self) -> list[Path]:
        return [Path(self.path).expanduser()] if _is_local(self.path) else []


def _load_dataset_problem(p: HubParams, error: Exception) -> BadInput:
    """load_dataset's error as the spec field at fault and what it said."""
    message = str(error).split("\n")[0]
    message = message if len(message) <= 300 else message[:300] + "..."
    if "split" in message.lower():
        field = "split"
    elif p.name and ("config" in message.lower()):
        field = "name"
    elif p.data_files and ("Unable to find" in message or "data_files" in message):
        field = "data_files"
    elif p.revision and "revision" in message.lower():
        field = "revision"
    else:
        field = "path"
    return BadInput(p.path, field, f"a dataset load_dataset can read ({type(error).__name__}: {message})")


@stage_kind("hub", HubParams, output="table")
def hub(ctx: StageContext) -> dict[str, float]:
    import contextlib
    import tempfile

    import datasets
    import pyarrow as pa

    p: HubParams = ctx.params
    datasets.disable_progress_bars()
    local = _is_local(p.path)
    path = str(Path(p.path).expanduser()) if local else p.path
    options = {"name": p.name, "split": p.split, "revision": p.revision, "data_files": p.data_files}
    # A local folder is read into a throw-away cache (its artifact is the copy kept); a hub
    # dataset uses datasets' own cache, so that it downloads once.
    folder = tempfile.TemporaryDirectory(prefix="alignflow-hub-") if local else contextlib.nullcontext()
    with folder as cache_dir:
        try:
            dataset = datasets.load_dataset(path, cache_dir=cache_dir, **options)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            raise _load_dataset_problem(p, e) from None
        if not isinstance(dataset, datasets.Dataset):
            raise BadInput(p.path, "split", f"one split, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise BadInput(p.path, "split", f"at least one row in split {p.split!r}")
        table = pa.table(dataset.with_format("arrow")[:])
        table = table.replace_schema_metadata(None)  # datasets' feature metadata: not ours to keep
        return _finish_table(table, p, ctx, p.path)
