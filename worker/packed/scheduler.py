"""Form one step's bins from the queue: first-fit decreasing under the token budget.

The scheduler decides only which requests run this step and how they are packed; it
hands the runner a ``StepBatch`` of plain arrays (no Request objects). It owns the
token budget, which only shrinks (after an out-of-memory error).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

import packing_cy
from worker.core.memory import shrunk_budget
from worker.core.request import Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepBatch:
    """The sequences of one step and how they are packed into bins."""

    token_ids: np.ndarray  # [total_tokens] int64: every sequence's tokens back to back
    offsets: np.ndarray  # [n + 1] int64: sequence i is token_ids[offsets[i]:offsets[i + 1]]
    modes: np.ndarray  # [n] int8: OutputMode of each sequence
    bins: list[np.ndarray]  # one [num_seqs_in_bin] int64 array of sequence indices per bin
    token_type_ids: np.ndarray | None = None  # [total_tokens] int64, beside token_ids;
    #   None when no sequence of the step has a nonzero type (pairs are rare)

    @property
    def lengths(self) -> np.ndarray:  # [n] int64
        return np.diff(self.offsets)


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs. ``requests[i]`` owns sequence ``i`` of ``batch``."""

    requests: list[Request]  # [n]
    batch: StepBatch
    num_tokens: int  # real (unaligned) tokens this step


class Scheduler:
    """FIFO queue -> bins. A step takes up to ``max_num_bins_per_step`` budgets of tokens."""

    def __init__(self, token_budget: int, *, align: int, max_num_seqs: int,
                 max_num_bins_per_step: int):
        self.token_budget = token_budget  # current budget per bin; shrinks after an OOM
        self.align, self.max_num_seqs = align, max_num_seqs
        self.max_num_bins_per_step = max_num_bins_per_step
        self.waiting: deque[Request] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput | None:
        """Pack the requests at the front of the queue; ``None`` when nothing waits."""
        requests = self._take()
        if not requests:
            return None
        n = len(requests)
        lengths = np.fromiter((r.num_tokens for r in requests), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # One host copy of the step's tokens: fill() reads sequences from a flat array.
        token_ids = np.concatenate([r.token_ids for r in requests])
        modes = np.fromiter((r.mode for r in requests), np.int8, n)
        types = _token_types(requests, lengths)
        # A sequence longer than a shrunken budget is clipped here so it gets a bin of
        # its own; staging is sized for the configured budget, so it still fits there.
        bins = packing_cy.pack(np.minimum(lengths, self.token_budget), self.token_budget,
                               align=self.align, max_seqs=self.max_num_seqs)
        batch = StepBatch(token_ids, offsets, modes, bins, types)
        return SchedulerOutput(requests, batch, int(offsets[-1]))

    def _take(self) -> list[Request]:
        """Pop requests in arrival order until the step's token window is full."""
        window = self.token_budget * self.max_num_bins_per_step
        max_seqs = self.max_num_seqs * self.max_num_bins_per_step or None
        taken: list[Request] = []
        used = 0
        while self.waiting:  # per-request loop, every step: O(requests taken)
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                continue
            need = self._aligned(min(request.num_tokens, self.token_budget))
            if taken and (used + need > window or len(taken) == max_seqs):
                break
            taken.append(self.waiting.popleft())
            used += need
        return taken

    def shrink_budget(self, failed_num_tokens: int) -> int:
        """After a bin of ``failed_num_tokens`` ran out of memory: 90% of that bin,
        rounded down to ``align``, when that is below the budget. A failed bin larger
        than the budget (formed before an earlier shrink) changes nothing, so one bad
        step with many splits shrinks the budget once per size, not once per failure."""
        new = shrunk_budget(failed_num_tokens, self.align, minimum=self.align)
        if new < self.token_budget:
            logger.warning("out of memory on a bin of %d tokens: token budget %d -> %d",
                           failed_num_tokens, self.token_budget, new)
            self.token_budget = new
        return self.token_budget

    def _aligned(self, n: int) -> int:
        return -(-n // self.align) * self.align


def _token_types(requests: list[Request], lengths: np.ndarray) -> np.ndarray | None:
    """The step's token types back to back, or None when every one is zero."""
    if all(r.token_type_ids is None for r in requests):  # per request, every step
        return None
    return np.concatenate([r.token_type_ids if r.token_type_ids is not None
                           else np.zeros(int(n), np.int64) for r, n in zip(requests, lengths)])
