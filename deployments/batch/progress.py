"""The progress bar (documents/s, tokens/s) and the summary a job ends with.

Rates are over this run's shards only (from the first shard sent to the last one
committed); totals are over the whole job, resumed shards included (from the manifest).
"Padding avoided" is what right-padded batches of ``--padded-batch-size`` in file order
would have computed beyond the real tokens; it is counted per shard, over the documents
that ran (a shard size that is a multiple of the batch size makes it exact for the file).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from deployments.batch.shards import ShardStats


class Progress:
    """A tqdm bar over input rows; shows this run's documents/s and tokens/s."""

    def __init__(self, total_rows: int, done_rows: int, enabled: bool):
        self.started = time.perf_counter()
        self.num_docs = self.num_tokens = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_rows, initial=done_rows, unit="doc", file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows "
                                       "[{elapsed}<{remaining}{postfix}]")

    def update(self, stats: ShardStats) -> None:
        self.num_docs += stats.num_docs
        self.num_tokens += stats.num_tokens + stats.num_generated_tokens
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.num_docs / elapsed:,.0f} docs/s, "
                                     f"{self.num_tokens / elapsed:,.0f} tokens/s", refresh=False)
            self.bar.update(stats.num_rows)

    def close(self) -> float:
        """Seconds since the bar started."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class JobSummary:
    output: str
    errors: str
    num_rows: int  # input rows
    num_docs: int  # outputs written
    num_bad: int  # rows in the errors file
    num_tokens: int  # real tokens run (generate: prompt tokens)
    num_padded_tokens: int  # the padded-in-file-order baseline
    num_generated_tokens: int
    num_shards: int
    num_shards_resumed: int  # finished by an earlier run, skipped by this one
    run_docs: int  # this run's
    run_tokens: int  # this run's, generated tokens included
    processing_s: float  # this run: first shard sent to last shard committed
    wall_s: float  # this run, start to end (Ray start, model load, assembly included)
    startup_s: float  # this run: Ray start (or join) and the engine actors' loading
    padded_batch_size: int
    run_cpu_s: float = 0.0  # this run: CPU seconds of the tokenizing tasks and the actors
    num_actors: int = 0  # this run's engine actors (0 when nothing was left to run)
    device: str | None = None  # where they ran

    @property
    def padding_avoided(self) -> int:
        return self.num_padded_tokens - self.num_tokens

    @property
    def docs_per_s(self) -> float:
        return self.run_docs / self.processing_s if self.processing_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.run_tokens / self.processing_s if self.processing_s > 0 else 0.0

    @classmethod
    def build(cls, shards: list[ShardStats], run: list[ShardStats], **fields) -> JobSummary:
        def total(name: str, stats: list[ShardStats]) -> int:
            return sum(getattr(s, name) for s in stats)

        return cls(num_rows=total("num_rows", shards), num_docs=total("num_docs", shards),
                   num_bad=total("num_bad", shards), num_tokens=total("num_tokens", shards),
                   num_padded_tokens=total("num_padded_tokens", shards),
                   num_generated_tokens=total("num_generated_tokens", shards),
                   num_shards=len(shards), num_shards_resumed=len(shards) - len(run),
                   run_docs=total("num_docs", run),
                   run_tokens=total("num_tokens", run) + total("num_generated_tokens", run),
                   run_cpu_s=sum(s.cpu_s for s in run),
                   **fields)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"padding_avoided": self.padding_avoided,
                                           "docs_per_s": self.docs_per_s,
                                           "tokens_per_s": self.tokens_per_s}

    def lines(self) -> list[str]:
        padded = self.num_padded_tokens
        share = self.padding_avoided / padded if padded else 0.0
        generated = (f" prompt + {self.num_generated_tokens:,} generated"
                     if self.num_generated_tokens else "")
        return [
            (f"documents   {self.num_docs:,} written to {self.output}, {self.num_bad:,} bad "
             f"rows in {self.errors} ({self.num_rows:,} rows)"),
            f"tokens      {self.num_tokens:,}{generated}",
            (f"padding     {self.padding_avoided:,} tokens avoided: padded batches of "
             f"{self.padded_batch_size} in file order would compute {padded:,} "
             f"({share:.1%} padding)"),
            (f"throughput  {self.docs_per_s:,.1f} docs/s, {self.tokens_per_s:,.0f} tokens/s "
             f"({self.run_docs:,} documents in {self.processing_s:.1f} s this run; "
             f"{self.wall_s:.1f} s in all, {self.startup_s:.1f} s of it starting Ray and "
             "the engines)"),
            (f"shards      {self.num_shards}, {self.num_shards_resumed} finished by an "
             f"earlier run; {self.num_actors} engine actors on {self.device or '-'}"),
        ]
