"""The parts directory: the job's durable state, and what makes it resumable.

| file                   | written                                         |
|------------------------|-------------------------------------------------|
| ``plan.json``          | once, by the first run (``shards.Plan``)        |
| ``part-KKKKKK.<fmt>``  | per finished shard: its outputs, in row order   |
| ``errors-KKKKKK.jsonl``| per finished shard: its bad rows, in row order  |
| ``manifest.jsonl``     | one line per finished shard (``ShardStats``)    |

A shard is committed in this order: part and errors files, each written to a temp file,
fsynced and renamed into place; then its manifest line, appended and fsynced. A shard is
finished only once its manifest line is complete and both files exist, so a kill at any
point leaves either a finished shard or one that the next run does again from scratch
(its renames then replace the earlier files: nothing is duplicated). Every input row is
in exactly one shard and every id in at most one row, so the assembled output holds each
id once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from deployments.batch.config import JobError
from deployments.batch.outputs import atomic_write, count_records, fsync_dir
from deployments.batch.shards import Plan, ShardStats


class PartsDir:
    """One job's parts directory (see the module docstring); ``fmt``: the output's."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = Path(path), fmt
        self.manifest_path = self.path / "manifest.jsonl"
        self.plan_path = self.path / "plan.json"

    def part(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.{self.fmt}"

    def errors(self, index: int) -> Path:
        return self.path / f"errors-{index:06d}.jsonl"

    # ---- the plan -------------------------------------------------------------------

    def load_plan(self, fingerprint: dict, overwrite: bool) -> Plan | None:
        """The saved plan when it matches ``fingerprint``; None when there is none (or
        ``overwrite`` discarded it). A mismatch is an error naming what changed."""
        if not self.plan_path.exists():
            return None
        plan = Plan.load(self.plan_path)
        changed = {k: (plan.fingerprint.get(k), v) for k, v in fingerprint.items()
                   if plan.fingerprint.get(k) != v}
        if not changed:
            return plan
        if overwrite:
            self.clear()
            return None
        what = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
        raise JobError(f"{self.path} holds parts of a job with other settings ({what}). Pass "
                       "--overwrite to discard them, or choose another --output / --parts-dir")

    def save_plan(self, plan: Plan) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        plan.save(self.plan_path)
        fsync_dir(self.path)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # ---- finished shards ------------------------------------------------------------

    def finished(self) -> dict[int, ShardStats]:
        """Shards whose manifest line is complete and whose files exist. A torn last
        line (a run killed while appending it) is cut off, so later appends start whole."""
        done: dict[int, ShardStats] = {}
        if not self.manifest_path.exists():
            return done
        with open(self.manifest_path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip() or number == len(lines):  # the last one is empty or torn
                continue
            try:
                stats = ShardStats.from_json(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise JobError(f"{self.manifest_path}:{number} is corrupt; delete the parts "
                               "directory (or pass --overwrite) to start the job again") from None
            if self.part(stats.index).exists() and self.errors(stats.index).exists():
                done[stats.index] = stats
        return done

    def commit(self, stats: ShardStats, part: bytes, errors: bytes) -> None:
        """Make one shard finished (see the module docstring for the order)."""
        atomic_write(self.part(stats.index), part)
        atomic_write(self.errors(stats.index), errors)
        fsync_dir(self.path)
        with open(self.manifest_path, "ab") as f:
            f.write(json.dumps(stats.to_json()).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def check_counts(self, done: dict[int, ShardStats]) -> None:
        """Every part holds as many records as its manifest line says."""
        for index, stats in sorted(done.items()):
            for path, fmt, want in ((self.part(index), self.fmt, stats.num_docs),
                                    (self.errors(index), "jsonl", stats.num_bad)):
                got = count_records(path, fmt)
                if got != want:
                    raise JobError(f"{path} holds {got} records, the manifest says {want}; "
                                   "delete it and its manifest line (or pass --overwrite)")

