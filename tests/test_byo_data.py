"""Bringing your own data: `columns` renames a file's columns to alignflow's names (jsonl, parquet, hub)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.base import BadInput
from tasks.tables import read_table

ROWS = [{"question": "What is 2 + 3?", "good": "5", "bad": "6", "id": 1},
        {"question": "What is 4 + 4?", "good": "8", "bad": "7", "id": 2}]
RENAME = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def write(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        return {"kind": "jsonl", "path": str(path)}
    if kind == "parquet":
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
        return {"kind": "parquet", "path": str(path)}
    folder = tmp_path / "hub_folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"kind": "hub", "path": str(folder)}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hub"])
@pytest.mark.parametrize("format", ["table", "preferences"])
def test_columns_rename_the_files_columns(tmp_path, run_stage, kind, format):
    out, metrics = run_stage({**write(tmp_path, kind), "columns": RENAME, "format": format})
    table = read_table(out)
    assert metrics["rows"] == 2
    assert table.column("prompt").to_pylist() == [r["question"] for r in ROWS]
    assert table.column("chosen").to_pylist() == ["5", "8"] and table.column("rejected").to_pylist() == ["6", "7"]
    assert "question" not in table.column_names and table.column("id").to_pylist() == [1, 2]  # the rest kept


def test_columns_as_a_list_still_keep_only_those(tmp_path, run_stage):
    out, _ = run_stage({**write(tmp_path, "jsonl"), "columns": ["question", "id"]})
    assert read_table(out).column_names == ["question", "id"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_missing_or_clashing_column_names_the_field(tmp_path, run_stage, kind):
    missing = r"columns.prompt: a column 'query' in the file" if kind == "parquet" else r"line 1: a value for 'query' \(columns.prompt\)"
    with pytest.raises(BadInput, match=missing):
        run_stage({**write(tmp_path, kind), "columns": {"prompt": "query"}})
    with pytest.raises(BadInput, match=r"columns.id: renaming 'good' to 'id', but the file already has a column 'id'"):
        run_stage({**write(tmp_path, kind), "columns": {"prompt": "question", "id": "good"}})
