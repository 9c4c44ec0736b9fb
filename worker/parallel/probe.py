"""The Phase-0 budget probe of a tensor-parallel engine: measured on every rank at once.

Rank 0 runs the probe (``worker.budget.probe.measure_budget``) as on one device; its
synthetic forwards are packed bins, which its runner sends to the other ranks like any
bin (``worker.parallel.steps``), so every rank runs the same forward on its shard. Every
memory reading the probe takes is asked of every rank (``StepSender.ask``), answered by
each from its own allocator and NVML, and combined so that the budget fits the rank with
the least room:

| the probe reads        | each rank answers                       | rank 0 takes          |
|------------------------|-----------------------------------------|-----------------------|
| NVML total / used      | its device's reading                    | the reading of the rank whose ``total * cap - used`` is smallest |
| allocated (baseline)   | its allocated bytes (kept as its baseline) | the largest        |
| peak after a forward   | its peak minus its own baseline          | the largest, over the largest baseline |
| reset peak, release    | done on every rank                       | -                    |

The followers run ``follow_probe`` meanwhile, until rank 0's ``end_probe``; every rank
then agrees on rank 0's budget. An out-of-memory forward on any rank fails the start (the
other ranks are inside its collectives: the step timeout ends them), as a step would.
"""

from __future__ import annotations

from worker.budget.nvml import GpuMemory
from worker.parallel.group import TPGroup
from worker.parallel.steps import (
    ANSWER,
    ASK,
    BIN,
    PROBED,
    StepSender,
    follow_bin,
    gather_answer,
    receive,
)

NVML, ALLOCATED, PEAK, RESET, RELEASE = range(5)


class RankMemory:
    """One rank's answers: its allocator (``MemoryStats``) and its NVML reading."""

    def __init__(self, memory, nvml, device_index: int):
        self.memory, self.nvml, self.index = memory, nvml, device_index
        self.baseline = 0

    def answer(self, op: int) -> list[int]:
        out = [0] * ANSWER
        if op == NVML:
            r = self.nvml.read(self.index)
            out[:] = [r.total_bytes, r.used_bytes, r.free_bytes]
        elif op == ALLOCATED:
            self.baseline = out[0] = self.memory.allocated_bytes()
        elif op == PEAK:
            out[0] = self.memory.peak_allocated_bytes() - self.baseline
        elif op == RESET:
            self.memory.reset_peak()
        elif op == RELEASE:
            self.memory.release_cached()
        else:
            raise ValueError(f"unknown probe question {op}")
        return out


class GroupMemory:
    """``MemoryStats`` over every rank (rank 0's side; see the module table)."""

    def __init__(self, sender: StepSender, local: RankMemory):
        self.sender, self.local = sender, local
        self.baseline = 0

    def _ask(self, op: int) -> list[list[int]]:
        return self.sender.ask(op, self.local.answer)

    def allocated_bytes(self) -> int:
        self.baseline = max(a[0] for a in self._ask(ALLOCATED))
        return self.baseline

    def peak_allocated_bytes(self) -> int:
        return self.baseline + max(a[0] for a in self._ask(PEAK))

    def reset_peak(self) -> None:
        self._ask(RESET)

    def release_cached(self) -> None:
        self._ask(RELEASE)


class GroupNvml:
    """``NvmlReader`` over every rank: the reading of the rank with the least room under
    ``cap`` (the probe's ``utilization_cap``)."""

    def __init__(self, sender: StepSender, local: RankMemory, cap: float):
        self.sender, self.local, self.cap = sender, local, cap

    def read(self, cuda_index: int) -> GpuMemory:
        readings = [GpuMemory(*a) for a in self.sender.ask(NVML, self.local.answer)]
        return min(readings, key=lambda r: r.total_bytes * self.cap - r.used_bytes)

    def device_name(self, cuda_index: int) -> str:
        return self.local.nvml.device_name(cuda_index)


def follow_probe(packed, tp: TPGroup, local: RankMemory) -> int:
    """A follower during rank 0's probe: run its bins, answer its questions, until it is
    over; returns the bins run."""
    num_bins = 0
    while True:
        message = receive(tp, (0, 0))
        if message is None or message[0] == PROBED:
            if message is None:
                raise RuntimeError("rank 0 stopped during the budget probe")
            return num_bins
        if message[0] == BIN:
            follow_bin(packed, message)
            num_bins += 1
        elif message[0] == ASK:
            gather_answer(tp, local.answer(message[1]))
        else:
            raise RuntimeError(f"rank 0 sent message kind {message[0]} during the probe")
