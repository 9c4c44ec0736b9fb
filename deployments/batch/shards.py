"""Deterministic shards of the input and the plan that fixes them for every run.

The input is cut into shards of ``shard_size`` consecutive rows: shard ``k`` holds rows
``[k * shard_size, (k + 1) * shard_size)``. The plan, made by one pass over the input
the first time (ids only) and saved in the parts directory, records the shards (with
their byte ranges for JSONL), the ids' type, and the rows that are bad before any
tokenizing (blank, invalid JSON, missing, mistyped or duplicate id). A resumed run loads
the saved plan, so it sees exactly the same shards and the same duplicates.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from deployments.batch.rows import BadRow, IdChecker

PLAN_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of the input; for JSONL, bytes ``[offset, end_offset)``."""

    index: int
    start: int
    stop: int
    offset: int = 0
    end_offset: int = 0

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardStats:
    """What one finished shard did; the manifest keeps one per shard."""

    index: int
    num_rows: int  # input rows in the shard
    num_docs: int  # rows with an output
    num_bad: int  # rows in the errors file
    num_tokens: int  # real tokens run (generate: prompt tokens)
    num_padded_tokens: int  # what padded batches in file order would have run
    num_generated_tokens: int = 0
    compute_s: float = 0.0  # seconds the actor spent on the shard (validation to encoding)
    cpu_s: float = 0.0  # CPU seconds of its tokenizing task and its actor (all threads)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ShardStats:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class Plan:
    fingerprint: dict  # JobConfig.fingerprint() of the run that made the plan
    num_rows: int
    id_type: str | None  # "str" | "int" | None (no row has a good id)
    shards: tuple[Shard, ...]
    bad_rows: dict[int, BadRow]  # found while planning, by row

    def bad_rows_by_shard(self) -> dict[int, dict[int, BadRow]]:
        """Shard index -> {row: BadRow} for the shards that have any."""
        starts = [s.start for s in self.shards]
        out: dict[int, dict[int, BadRow]] = {}
        for row, bad in self.bad_rows.items():
            out.setdefault(bisect.bisect_right(starts, row) - 1, {})[row] = bad
        return out

    def save(self, path: Path) -> None:
        payload = {"version": PLAN_VERSION, "fingerprint": self.fingerprint,
                   "num_rows": self.num_rows, "id_type": self.id_type,
                   "shards": [dataclasses.astuple(s) for s in self.shards],
                   "bad_rows": [b.to_json() for b in self.bad_rows.values()]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Plan:
        d = json.loads(path.read_text())
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"{path}: plan version {d.get('version')}, expected {PLAN_VERSION}")
        bad = [BadRow.from_json(b) for b in d["bad_rows"]]
        return cls(d["fingerprint"], d["num_rows"], d["id_type"],
                   tuple(Shard(*s) for s in d["shards"]), {b.row: b for b in bad})


def make_plan(source, shard_size: int, id_field: str, fingerprint: dict) -> Plan:
    """One pass over ``source`` (``inputs.JsonlInput`` or ``ParquetInput``)."""
    ids = IdChecker(id_field)
    bad: dict[int, BadRow] = {}
    starts: list[tuple[int, int]] = []
    num_rows = 0
    for row, offset, record in source.scan(id_field):  # per input row, once
        if row % shard_size == 0:
            starts.append((row, offset))
        problem = record if isinstance(record, BadRow) else ids.check(row, record)
        if problem is not None:
            bad[row] = problem
        num_rows = row + 1
    ends = [offset for _, offset in starts[1:]] + [source.num_bytes]
    shards = tuple(Shard(k, row, min(row + shard_size, num_rows), offset, end)
                   for k, ((row, offset), end) in enumerate(zip(starts, ends)))
    id_type = ids.id_type.__name__ if ids.id_type is not None else None
    return Plan(fingerprint, num_rows, id_type, shards, bad)


def padded_tokens(lengths, batch_size: int) -> int:
    """Tokens that right-padded batches of ``batch_size``, in the given order, compute."""
    total = 0
    for i in range(0, len(lengths), batch_size):  # per padded batch
        batch = lengths[i:i + batch_size]
        total += int(max(batch)) * len(batch)
    return total
