"""Per-step observation: what one engine step did, for metrics, at no cost unobserved.

``Engine.add_step_observer(fn)`` registers ``fn(record)``; after every step (a pooled
forward step or a generation step, out-of-memory steps included) the stepping thread
calls it with a frozen ``StepRecord``, after the step's results were delivered. Until
the first observer is registered (and after the last one is dropped) nothing here
exists: the engine, the runner and the staging buffers hold ``None`` and skip every
measurement, allocating nothing.

What the record's numbers mean:

- real tokens: tokens the step's forwards computed (unaligned, never padding).
- bin capacity: the token budget the bin was packed against, or the bin's own size when
  larger (a sequence longer than a shrunken budget runs in a bin of its own); a
  generation step is one bin whose capacity is the step budget. Fill = real / capacity.
- padded-equivalent tokens: what the same sequences would have computed as padded
  batches in arrival order, with as many batches as the step ran bins. Pooled steps:
  the step's ``n`` sequences in arrival order are cut into consecutive batches of
  ``ceil(n / num_bins)`` (the packer's bins, before any out-of-memory split), each
  padded to its longest sequence: ``sum(len(batch) * max(batch))``. Generation steps
  are one forward, so one batch: sequences x the longest new-token count (a decode is
  1, a prefill chunk its length). Padding avoided = padded-equivalent - real >= 0.
- forward seconds, one per bin that ran: the bin's forward plus pooling or scoring
  (generation: the whole ``gen.run``, from staging to sampled tokens). CUDA: events on
  the compute stream, never a synchronize; read when the record is built, after the
  step's own device-to-host read, so they have completed. CPU: host wall time around
  the same calls (CPU ops are synchronous).
- host-to-device: ``h2d_bytes`` is the nbytes the bins staged (ids, positions,
  cu_seqlens), ``h2d_seconds`` the copies' device time (events on the copy stream). On
  CPU the model reads the staging buffer in place: nothing is copied, 0 seconds.
  Generation steps report 0 for both (their copy, in ``gen_runner.py``, is not timed).
- queue wait: for each request first scheduled this step, seconds from entering the
  engine to being scheduled (only requests that arrived while an observer was set).
"""

from __future__ import annotations

import enum
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from worker.core.timing import StepTimer
from worker.generate.scheduler import StopReason

logger = logging.getLogger(__name__)


class StepKind(enum.StrEnum):
    FORWARD = "forward"  # embed / score: FFD-packed bins
    GENERATE = "generate"  # one continuous-batching step


@dataclass(frozen=True)
class StepRecord:
    """One engine step, as observers see it (definitions in the module docstring)."""

    kind: StepKind
    bin_num_tokens: tuple[int, ...]  # [num_bins] real tokens of each bin that ran
    bin_capacity: tuple[int, ...]  # [num_bins] tokens each bin could hold
    padded_num_tokens: int  # padded-equivalent tokens of the step
    forward_seconds: tuple[float, ...]  # [num_bins]
    h2d_bytes: int  # staged for the device this step
    h2d_seconds: float  # device time of the host-to-device copies
    num_oom: int  # forwards that ran out of device memory this step
    new_token_budget: int | None  # the budget after a shrink this step; None if unchanged
    token_budget: int  # this kind's budget after the step (per bin; per step for generate)
    num_kv_blocks: int  # KV cache blocks (0 until generation is first used)
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    num_preemptions: int  # sequences preempted (recompute) this step
    num_waiting: int  # requests queued in the engine after the step, not yet running
    queue_wait_seconds: tuple[float, ...]  # [requests first scheduled this step]
    num_prefix_queries: int = 0  # generation: tokens of the sequences admitted this step
    num_prefix_hits: int = 0  # of those, tokens taken from the prefix cache
    num_decodes: int = 0  # generation: sequences that decoded one token this step
    out_of_blocks: bool = False  # generation: it stopped admitting for want of KV blocks
    spec_proposed: tuple[int, ...] = ()  # generation: [k] proposals verified at position j
    spec_accepted: tuple[int, ...] = ()  # [k] of those, accepted (speculative decoding)
    spec_k: int = 0  # the tokens a sequence could propose this step (load rule, cap; 0: off)

    @property
    def num_bins(self) -> int:
        return len(self.bin_num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.bin_num_tokens)

    @property
    def num_padding_avoided(self) -> int:
        return self.padded_num_tokens - self.num_tokens

    @property
    def fill_ratios(self) -> tuple[float, ...]:  # [num_bins], each in (0, 1]
        return tuple(t / c for t, c in zip(self.bin_num_tokens, self.bin_capacity))


def _spec(gen) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """A generation step's speculation fields: what it verified, per position, and k."""
    if gen.spec_load is None:
        return (), (), 0
    last = gen.last_spec
    if last is None:
        return (), (), gen.spec_k
    return tuple(last.proposed.tolist()), tuple(last.accepted.tolist()), gen.spec_k


def padded_equivalent(lengths: np.ndarray, num_batches: int) -> int:
    """Tokens computed by ``lengths`` (arrival order) cut into ``num_batches`` consecutive
    batches of ``ceil(n / num_batches)``, each padded to its longest."""
    n = int(lengths.shape[0])
    if n == 0:
        return 0
    size = -(-n // max(1, num_batches))
    starts = np.arange(0, n, size)
    longest = np.maximum.reduceat(lengths, starts)
    counts = np.diff(np.append(starts, n))
    return int((longest * counts).sum())


class StepObservers:
    """The engine's observers and the state that measuring them needs. Built by
    ``Engine.add_step_observer``; ``on_empty`` runs once the last observer is dropped."""

    def __init__(self, runner, staging, device, on_empty: Callable[[], None]):
        self._fns: list[Callable[[StepRecord], None]] = []
        self.timer = StepTimer(device.device.type == "cuda")
        self._runner, self._staging, self._device = runner, staging, device
        self._on_empty = on_empty
        self._arrivals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._gen_capacity = 0  # generation step budget when the step was scheduled
        self._preempt_base = 0  # gen.num_preemptions before the step's schedule

    def add(self, fn: Callable[[StepRecord], None]) -> None:
        self._fns.append(fn)
        self._runner.timer = self._staging.timer = self.timer

    def stamp(self, items: Iterable) -> None:
        """Note the arrival time of requests or sequences entering the engine."""
        now = time.monotonic()
        for item in items:  # per request, observed engines only
            self._arrivals[item] = now

    # ---- pooled forward steps ---------------------------------------------------------

    def forward_step(self, out, result, budget: int, new_budget: int, gen,
                     num_waiting: int) -> None:
        """After a pooled step: ``out`` a ``SchedulerOutput``, ``result`` its
        ``StepResult``, ``budget`` the bin budget it was packed against."""
        bins, seconds, h2d_bytes, h2d_seconds = self.timer.take()
        record = StepRecord(
            StepKind.FORWARD, bins, tuple(max(budget, t) for t in bins),
            padded_equivalent(out.batch.lengths, len(out.batch.bins)), seconds, h2d_bytes,
            h2d_seconds, len(result.oom_num_tokens),
            new_budget if new_budget != budget else None, new_budget, *_kv(gen), 0,
            num_waiting, self._waits(out.requests))
        self._emit(record)

    # ---- generation steps -------------------------------------------------------------

    def run_generation(self, gen, out):
        """``gen.run(out)``, timed as the step's one bin."""
        self._gen_capacity = gen.scheduler.max_num_batched_tokens
        self._preempt_base = gen.num_preemptions - len(out.preempted)
        stream = self._device.compute_stream()
        self.timer.forward.begin(stream)
        result = gen.run(out)
        if result is not None:
            self.timer.end_bin(out.num_tokens, stream)
        return result

    def generation_step(self, gen, out, num_waiting: int) -> None:
        """After a generation step that ran (postprocessed)."""
        bins, seconds, _, _ = self.timer.take()
        padded = len(out.seqs) * max(out.num_new_tokens)
        budget = gen.scheduler.max_num_batched_tokens
        record = StepRecord(
            StepKind.GENERATE, bins, tuple(max(self._gen_capacity, t) for t in bins), padded,
            seconds, 0, 0.0, 0, None, budget, *_kv(gen),
            gen.num_preemptions - self._preempt_base, num_waiting,
            self._waits(out.seqs[out.num_decodes:]),  # decodes were scheduled before
            out.num_prefix_queries, out.num_prefix_hits, out.num_decodes,
            out.stop is StopReason.OUT_OF_BLOCKS, *_spec(gen))
        self._emit(record)

    def generation_oom(self, gen, num_waiting: int) -> None:
        """After a generation step whose forward ran out of memory (and its recovery)."""
        self.timer.take()
        budget = gen.scheduler.max_num_batched_tokens
        record = StepRecord(
            StepKind.GENERATE, (), (), 0, (), 0, 0.0, 1,
            budget if budget != self._gen_capacity else None, budget, *_kv(gen),
            gen.num_preemptions - self._preempt_base, num_waiting, ())
        self._emit(record)

    # ---- helpers ----------------------------------------------------------------------

    def _waits(self, items) -> tuple[float, ...]:
        now, pop = time.monotonic(), self._arrivals.pop
        arrived = [pop(item, None) for item in items]  # per scheduled request
        return tuple(now - t for t in arrived if t is not None)

    def _emit(self, record: StepRecord) -> None:
        for fn in list(self._fns):  # per observer, every step
            try:
                fn(record)
            except Exception:  # an observer never kills the step loop
                logger.exception("step observer %r raised; it is dropped", fn)
                self._fns.remove(fn)
        if not self._fns:
            self._runner.timer = self._staging.timer = None
            self._on_empty()


class ObserveAPI:
    """Observation methods of ``Engine`` (which provides the step lock, runner, staging,
    device, queues and generation policy)."""

    _obs: StepObservers | None = None  # None while nobody observes: nothing measured

    def add_step_observer(self, fn: Callable[[StepRecord], None]) -> None:
        """Call ``fn(record)`` on the stepping thread after every step, pooled or
        generation (see ``StepRecord``). It must be quick: the next step waits for it.
        An observer that raises is logged and dropped; the engine steps on."""
        if not callable(fn):
            raise TypeError(f"a step observer must be callable, got {type(fn).__name__}")
        with self._step_lock:
            if self._obs is None:
                self._obs = StepObservers(self.runner, self.staging, self.device,
                                          on_empty=self._drop_observers)
            self._obs.add(fn)

    @property
    def num_waiting(self) -> int:
        """Requests queued in the engine and not yet running (pooled and generation)."""
        waiting = self.pooled.num_waiting
        return waiting + (self._gen.num_waiting if self._gen is not None else 0)

    def _drop_observers(self) -> None:
        self._obs = None


def _kv(gen) -> tuple[int, int, int]:
    """(blocks, used, free) of the generation KV cache; zeros before it exists."""
    if gen is None:
        return 0, 0, 0
    total, free = gen.blocks.num_blocks, gen.blocks.num_free_blocks
    return total, total - free, free
