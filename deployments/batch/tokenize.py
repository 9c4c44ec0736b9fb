"""Tokenizing one shard: the body of a Ray task, so tokenization runs on every CPU of
the cluster, ahead of the engine actors (each actor has its next shard queued while it
runs the current one).

The tokenizer is the model's (``AutoTokenizer``), loaded once per worker process: Ray
reuses worker processes for tasks of the same shape, so the cache holds across shards.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from deployments.batch.inputs import iter_rows
from deployments.batch.rows import BadRow, check_text
from deployments.batch.shards import Shard


@dataclass
class TokenizedShard:
    """A shard's documents, ready for an engine actor."""

    shard: Shard
    rows: np.ndarray  # [num_docs] int64: the input row of each document
    ids: list  # [num_docs]: str or int ids
    token_ids: np.ndarray  # [num_tokens] int64: every document's tokens, back to back
    cu_tokens: np.ndarray  # [num_docs + 1] int64: document i is token_ids[cu[i]:cu[i + 1]]
    bad: list[BadRow]  # rows that did not reach the tokenizer, by row
    cpu_s: float = 0.0  # CPU seconds the tokenizing task took

    @property
    def num_docs(self) -> int:
        return len(self.ids)

    def tokens(self, i: int) -> np.ndarray:
        return self.token_ids[self.cu_tokens[i]:self.cu_tokens[i + 1]]


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from worker.models.sources import resolve_model

    # the same model specs as the engine (packaged:, smoke:), resolved in this worker
    return AutoTokenizer.from_pretrained(resolve_model(model),
                                         trust_remote_code=trust_remote_code)


def warm_up(model: str, trust_remote_code: bool = False) -> None:
    """Load the tokenizer into this worker process (a task run while the engines load)."""
    load_tokenizer(model, trust_remote_code)


def tokenize_shard(shard: Shard, raw, fmt: str, text_field: str, id_field: str,
                   planned_bad: dict[int, BadRow], model: str,
                   trust_remote_code: bool = False) -> TokenizedShard:
    """Parse ``raw`` (the shard's rows as read by ``inputs``), drop the rows the plan
    already found bad and those without usable text, tokenize the rest in one call."""
    cpu_started = time.process_time()
    rows, ids, texts, bad = [], [], [], []
    for row, record in iter_rows(raw, fmt, shard.start):  # per row of the shard
        if row in planned_bad:
            bad.append(planned_bad[row])
            continue
        if isinstance(record, BadRow):  # the plan saw it too; kept for a stale plan
            bad.append(record)
            continue
        id_ = record[id_field] if id_field else row
        problem = check_text(row, id_, record, text_field)
        if problem is not None:
            bad.append(problem)
            continue
        rows.append(row)
        ids.append(id_)
        texts.append(record[text_field])
    encoded = []
    if texts:
        tokenizer = load_tokenizer(model, trust_remote_code)
        encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    lengths = np.fromiter((len(e) for e in encoded), np.int64, len(encoded))
    cu = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(lengths, out=cu[1:])
    flat = np.fromiter((t for e in encoded for t in e), np.int64, int(cu[-1]))
    return TokenizedShard(shard, np.asarray(rows, np.int64), ids, flat, cu, bad,
                          time.process_time() - cpu_started)
