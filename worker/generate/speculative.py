"""Speculative decoding: proposals, the load rule, and what a step verified.

A running decode may *propose* up to k tokens d_1..d_k besides its last token; the
step then computes the k + 1 tokens in one packed forward (the varlen path takes
several query tokens per sequence anyway), and ``worker.generate.rejection`` accepts a
prefix of the proposals and samples one more token, so that every token emitted has
exactly the target model's distribution (greedy: exactly its argmax). The KV of the
rejected proposals is rolled back (``GenScheduler.advance`` trims the blocks past the
accepted tokens; only full blocks of accepted tokens reach the prefix cache).

Who proposes (``EngineConfig.speculative.method``):

- ``ngram`` (prompt lookup, no second model): the longest suffix of the sequence, n
  tokens from ``prompt_lookup_max`` down to ``prompt_lookup_min``, is looked up in the
  prompt and output so far; the k tokens that followed its most recent earlier
  occurrence with k tokens after it (else its earliest) are proposed (``NgramProposer``; numpy over the row's tokens, no loop
  over positions). Its proposal distribution is a point mass.
- ``draft``: a small causal LM of the same vocabulary runs k one-token steps with its
  own paged KV cache (``worker.generate.draft``), sampling each proposal from its own
  distribution q (greedy rows: its argmax).

The load rule (``SpecLoad``): k tokens while at most ``full_k_max_batch`` sequences
run, none from ``disable_by_batch_size``, linear between; the cluster's admission
controller may cap it further (``cap``: 0 turns speculation off across replicas under
cluster load). Why a batch-size rule and these constants: docs/decisions.md
("Speculation by load").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from worker.core.config import SpeculativeConfig


class NgramProposer:
    """Prompt lookup over a row of token ids (see the module docstring)."""

    def __init__(self, n_max: int, n_min: int):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({n_min}) <= prompt_lookup_max "
                             f"({n_max})")
        self.n_max, self.n_min = n_max, n_min

    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` tokens continuing ``tokens`` [N] int64 (the sequence so far): those
        after the most recent earlier occurrence of its longest suffix of n in
        [n_min, n_max] tokens; empty when no suffix of ``n_min`` recurs."""
        n_total = tokens.shape[0]
        if k <= 0 or n_total <= self.n_min:
            return _EMPTY
        last = n_total - 1
        # Occurrences of a suffix of n tokens end at j < last: first n = 1, then narrowed.
        cand = np.flatnonzero(tokens[:last] == tokens[last])
        best = cand if self.n_min == 1 else _EMPTY
        for n in range(2, min(self.n_max, n_total - 1) + 1):  # per suffix length, <= n_max
            cand = cand[cand >= n - 1]
            cand = cand[tokens[cand - (n - 1)] == tokens[last - (n - 1)]]
            if not cand.size:
                break
            if n >= self.n_min:
                best = cand
        if not best.size:
            return _EMPTY
        # The most recent occurrence followed by k tokens, else the earliest (the longest
        # continuation: in a loop the most recent one is right behind the suffix).
        full = best[best + k < n_total]
        start = int(full[-1] if full.size else best[0]) + 1
        return tokens[start: min(start + k, n_total)]


_EMPTY = np.zeros(0, np.int64)


class SpecLoad:
    """How many tokens a sequence may propose now: the batch-size rule, under the
    cluster's cap. ``cap`` is set from any thread (the replica relays the admission
    controller's view); the step reads it."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.full, self.off = config.full_k_max_batch, config.disable_by_batch_size
        self._cap: int | None = None
        self._lock = threading.Lock()

    def set_cap(self, cap: int | None) -> None:
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"speculation cap must be an integer >= 0 or None, got {cap!r}")
        with self._lock:
            self._cap = cap

    @property
    def cap(self) -> int | None:
        return self._cap

    def k_for(self, num_running: int) -> int:
        """k for a step with ``num_running`` sequences running."""
        k = k_for_batch(self.k, num_running, self.full, self.off)
        cap = self._cap
        return k if cap is None else min(k, cap)


def k_for_batch(k: int, num_running: int, full: int, off: int) -> int:
    """``k`` up to ``full`` running sequences, 0 from ``off``, linear between (rounded to
    the nearest, halves up, so k = 1 holds until halfway)."""
    if num_running <= full:
        return k
    if num_running >= off:
        return 0
    return (2 * k * (off - num_running) + (off - full)) // (2 * (off - full))


@dataclass
class SpecStepStats:
    """What one step verified, per proposal position (for ``StepRecord`` and the
    engine's counters)."""

    proposed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [k]
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [k]

    @classmethod
    def of(cls, verified: list[int], accepted: list[int], k: int) -> SpecStepStats:
        """From each sequence's number of proposals verified and accepted."""
        v = np.asarray(verified, np.int64)
        a = np.asarray(accepted, np.int64)
        pos = np.arange(k)[:, None]
        return cls((pos < v[None, :]).sum(1), (pos < a[None, :]).sum(1))

    @property
    def num_proposed(self) -> int:
        return int(self.proposed.sum())

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())
