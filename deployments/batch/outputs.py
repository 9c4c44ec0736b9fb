"""Output records: their columns per task, their encoding (JSONL or Parquet), atomic
file writes, and the final assembly of the parts into ``--output``.

| task     | columns (besides ``id``)                                                   |
|----------|----------------------------------------------------------------------------|
| embed    | ``embedding`` [hidden] float32, ``num_tokens``                             |
| score    | ``token_logprobs`` [num_tokens - 1] float32, ``logprob_sum``, ``num_tokens``|
| generate | ``text`` (null without a tokenizer), ``token_ids``, ``finish_reason``,      |
|          | ``num_prompt_tokens``, ``num_generated_tokens``                            |
| classify | ``label`` (the most probable), ``probs`` [num_labels] float32 (in the      |
|          | model's label order), ``num_tokens``                                       |

JSONL floats are the float32 values written as (exact) doubles.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from deployments.batch.rows import BadRow

LIST_COLUMNS = {"embedding": "float32", "token_logprobs": "float32", "token_ids": "int64",
                "probs": "float32"}


def schema(task: str, id_type: str | None):
    import pyarrow as pa

    id_arrow = pa.int64() if id_type == "int" else pa.string()
    fields = {"embed": [("embedding", pa.list_(pa.float32())), ("num_tokens", pa.int64())],
              "score": [("token_logprobs", pa.list_(pa.float32())),
                        ("logprob_sum", pa.float64()), ("num_tokens", pa.int64())],
              "generate": [("text", pa.string()), ("token_ids", pa.list_(pa.int64())),
                           ("finish_reason", pa.string()), ("num_prompt_tokens", pa.int64()),
                           ("num_generated_tokens", pa.int64())],
              "classify": [("label", pa.string()), ("probs", pa.list_(pa.float32())),
                           ("num_tokens", pa.int64())]}[task]
    return pa.schema([("id", id_arrow)] + fields)


def encode_part(columns: dict[str, list], fmt: str, task: str, id_type: str | None) -> bytes:
    """``columns``: ``id`` plus the task's columns, one entry per document; list-valued
    columns hold numpy arrays or lists."""
    if fmt == "jsonl":
        return _jsonl(columns)
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = {}
    for name, values in columns.items():
        if name in LIST_COLUMNS:
            arrow[name] = _list_array(values, LIST_COLUMNS[name])
        else:
            arrow[name] = pa.array(values)
    table = pa.Table.from_pydict(arrow).cast(schema(task, id_type))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def encode_errors(bad: Iterable[BadRow]) -> bytes:
    return b"".join(json.dumps(b.to_json()).encode() + b"\n" for b in bad)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to ``path.tmp``, fsync, rename over ``path``: readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def count_records(path: Path, fmt: str) -> int:
    if fmt == "jsonl":
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def assemble(parts: list[Path], out: Path, fmt: str, task: str | None = None,
             id_type: str | None = None) -> None:
    """Concatenate ``parts`` (in order) into ``out``, atomically (Parquet needs
    ``task`` and ``id_type`` for the schema)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "jsonl":
        with open(tmp, "wb") as dst:
            for part in parts:  # per shard
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    else:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(tmp, schema(task, id_type)) as writer:
            for part in parts:  # per shard
                writer.write_table(pq.read_table(part))
    tmp.replace(out)


def _jsonl(columns: dict[str, list]) -> bytes:
    names = list(columns)
    values = [[_plain(v) for v in columns[n]] for n in names]
    return b"".join(json.dumps(dict(zip(names, row))).encode() + b"\n" for row in zip(*values))


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _list_array(values: list, dtype: str):
    import pyarrow as pa

    arrays = [np.asarray(v, dtype) for v in values]
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
