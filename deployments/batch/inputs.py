"""Input files: JSONL (one JSON object per line) and Parquet.

Both readers do the same three things: ``scan`` every row once for the plan (byte
offsets and ids), ``read`` one shard's raw rows (bytes of its lines, or an Arrow table
of the two columns needed), and ``iter_rows`` turns raw rows back into records on a
tokenizing task. Every line of a JSONL file is a row, blank ones included (they are bad
rows); a final newline ends the last row and starts none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from deployments.batch.config import JobError
from deployments.batch.rows import BadRow, ErrorKind
from deployments.batch.shards import Shard


class JsonlInput:
    format = "jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.num_bytes = os.path.getsize(self.path)

    def scan(self, id_field: str) -> Iterator[tuple[int, int, dict | BadRow]]:
        """``(row, byte offset of the row, record or BadRow)`` for every row."""
        offset = 0
        with open(self.path, "rb") as f:
            for row, line in enumerate(f):  # per input row, once per job
                yield row, offset, parse_line(row, line)
                offset += len(line)

    def read(self, shard: Shard) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(shard.offset)
            return f.read(shard.end_offset - shard.offset)


class ParquetInput:
    format = "parquet"

    def __init__(self, path: str | Path, text_field: str, id_field: str):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.num_bytes = os.path.getsize(self.path)
        self.file = pq.ParquetFile(self.path)
        names = self.file.schema_arrow.names
        for option, field in (("text-field", text_field), ("id-field", id_field)):
            if field and field not in names:
                raise JobError(f"{self.path} has no column {field!r} (--{option}); its columns: "
                               f"{', '.join(names)}")
        self.columns = [c for c in (id_field, text_field) if c]
        meta = self.file.metadata
        self.group_starts = [0]
        for g in range(meta.num_row_groups):
            self.group_starts.append(self.group_starts[-1] + meta.row_group(g).num_rows)

    def scan(self, id_field: str) -> Iterator[tuple[int, int, dict | BadRow]]:
        if not id_field:
            yield from ((row, 0, {}) for row in range(self.file.metadata.num_rows))
            return
        row = 0
        for batch in self.file.iter_batches(columns=[id_field], batch_size=65536):
            for value in batch.column(0).to_pylist():  # per input row, once per job
                yield row, 0, {id_field: value}
                row += 1

    def read(self, shard: Shard):
        """Rows ``[shard.start, shard.stop)`` as an Arrow table (the id and text columns)."""
        import bisect

        import pyarrow as pa

        if shard.num_rows == 0:
            return pa.table({c: [] for c in self.columns})
        first = bisect.bisect_right(self.group_starts, shard.start) - 1
        last = bisect.bisect_right(self.group_starts, shard.stop - 1) - 1
        table = self.file.read_row_groups(range(first, last + 1), columns=self.columns)
        return table.slice(shard.start - self.group_starts[first], shard.num_rows)


def open_input(path: str | Path, fmt: str, text_field: str, id_field: str):
    if not Path(path).is_file():
        raise JobError(f"--input {path}: no such file")
    return JsonlInput(path) if fmt == "jsonl" else ParquetInput(path, text_field, id_field)


def iter_rows(raw, fmt: str, start: int) -> Iterator[tuple[int, dict | BadRow]]:
    """``(row, record or BadRow)`` for a shard's raw rows, from row ``start`` on."""
    if fmt == "jsonl":
        lines = raw.split(b"\n")
        if raw.endswith(b"\n"):
            lines.pop()
        for i, line in enumerate(lines):  # per row of the shard
            yield start + i, parse_line(start + i, line)
    else:
        for i, record in enumerate(raw.to_pylist()):  # per row of the shard
            yield start + i, record


def parse_line(row: int, line: bytes) -> dict | BadRow:
    line = line.strip()
    if not line:
        return BadRow(row, None, ErrorKind.EMPTY_ROW, "the line is empty")
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return BadRow(row, None, ErrorKind.INVALID_JSON, f"not valid JSON: {exc}")
    if not isinstance(record, dict):
        return BadRow(row, None, ErrorKind.NOT_AN_OBJECT,
                      f"a row must be a JSON object, got {type(record).__name__}")
    return record
