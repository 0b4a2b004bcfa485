"""Reading and writing "table" artifacts: a folder holding data.parquet."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TABLE_FILE = "data.parquet"


def read_table(folder: Path, columns: list[str] | None = None, what: str = "table") -> pa.Table:
    """The table in `folder`; with `columns`, check they are all there (a clear error if not)."""
    table = pq.read_table(Path(folder) / TABLE_FILE)
    if columns:
        require_columns(table, columns, what)
    return table


def require_columns(table: pa.Table, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{what} is missing column(s) {missing}; it has {table.column_names}"
        )


def write_table(table: pa.Table | dict, folder: Path) -> Path:
    if isinstance(table, dict):
        table = pa.table(table)
    path = Path(folder) / TABLE_FILE
    pq.write_table(table, path)
    return path
