"""Where the engine's steps run: on this process's device, or on a tensor-parallel group.

The engine schedules and postprocesses; its runners (the packed ``ModelRunner`` and the
generation ``GenRunner``) stage each step and run its forward. An executor owns what lies
under that: the ranks, the device each computes on, how the model is cut for them, how
their numbers are agreed, and how they are stopped.

| executor             | ranks                     | each step                                         |
|----------------------|---------------------------|---------------------------------------------------|
| ``LocalExecutor``    | this process              | the runner's forward, nothing else                |
| ``LeaderExecutor``   | rank 0 of N; starts 1..N-1 (a launcher: processes, or Ray actors under Serve) | the runner sends the staged step (``StepSender``) before its forward |
| ``FollowerExecutor`` | rank r > 0 (``follow_rank``) | ``worker.parallel.steps.follow``: rank 0's steps on this shard |

vLLM v1 draws the same line (Executor -> Worker -> ModelRunner, rank 0 driving, as in
nano-vllm's ``ModelRunner``); here the worker and the model runner are one, the engine's
runners, and the executor hands them their ``step_sender``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable

from worker.core.config import EngineConfig
from worker.models.sources import resolve_model
from worker.parallel import launch
from worker.parallel.group import TPGroup, load_in_turn
from worker.parallel.shard import shard_decoder
from worker.parallel.steps import StepSender

logger = logging.getLogger(__name__)


class LocalExecutor:
    """One rank, this process: nothing is sharded, agreed or sent."""

    tp: TPGroup | None = None

    def __init__(self, config: EngineConfig):
        self.device = config.device

    @property
    def num_ranks(self) -> int:
        return 1 if self.tp is None else self.tp.size

    @property
    def shard(self) -> Callable | None:
        """What ``load_model`` applies to the host copy of the model (None: keep it whole)."""
        return None if self.tp is None else functools.partial(shard_decoder, tp=self.tp)

    def agree(self, value: int) -> int:
        """The smallest ``value`` over the ranks (a budget, a KV block count)."""
        return value if self.tp is None else self.tp.min_int(value)

    load_spans: list[tuple[float, float]] | None = None  # TP: each rank's (start, end)
    #   of loading, wall clock, rank order
    loaded_in_turn: bool = False  # TP: whether the ranks took turns

    @contextlib.contextmanager
    def loading(self, config: EngineConfig, checkpoint_bytes: int):
        """Around reading the checkpoint: under TP, the ranks take turns when
        ``config.tp_load`` says so, or ("auto") when the node's available memory cannot
        hold one host copy per rank (``worker.parallel.group.load_in_turn``)."""
        if self.tp is None:
            yield
            return
        with load_in_turn(self.tp, config.tp_load, checkpoint_bytes) as serial:
            self.loaded_in_turn, start = serial, time.time()
            yield
            end = time.time()  # before the turn passes to the next rank
        spans = self.tp.all_gather_floats([start, end])
        self.load_spans = [tuple(spans[2 * r: 2 * r + 2]) for r in range(self.tp.size)]
        if self.tp.rank == 0:
            times = ", ".join(f"rank {r}: {b - a:.1f} s"
                              for r, (a, b) in enumerate(self.load_spans))
            logger.info("tensor parallel: %d ranks read the checkpoint %s (%s)", self.tp.size,
                        "in turn" if serial else "at once", times)

    def attach(self, *runners):
        """Wire the runners for this executor's ranks (one rank: nothing to wire); returns
        rank 0's step sender (None here)."""

    def stop(self, clean: bool) -> None:
        """End the other ranks (``clean``: no step died inside a collective)."""


class FollowerExecutor(LocalExecutor):
    """Rank r > 0 of a tensor-parallel engine: its shard, on the device its launcher gave
    it (``cuda:r`` for processes of the replica; the one GPU of a Ray actor)."""

    def __init__(self, config: EngineConfig, tp: TPGroup, device: str | None = None):
        self.tp = tp
        self.device = device or launch.rank_device(config.device, tp.rank)


class LeaderExecutor(LocalExecutor):
    """Rank 0 of ``tensor_parallel_size`` N: starts ranks 1..N-1 running ``follower``
    through ``launcher`` (``worker.parallel.launch.start``: processes of this one), and
    sends every step its runners run."""

    def __init__(self, config: EngineConfig, follower: Callable, launcher=None):
        # the followers load what rank 0 resolved (a smoke model is built once, here)
        resolved = dataclasses.replace(config, model=str(resolve_model(config.model)))
        self._followers = (launcher or launch.start)(resolved, follower)
        self.tp = self._followers.group
        self.device = self._followers.device
        self.sender: StepSender | None = None

    def attach(self, *runners) -> StepSender:
        if self.sender is None:
            self.sender = StepSender(self.tp)
        for runner in runners:
            runner.step_sender = self.sender
        return self.sender

    def stop(self, clean: bool) -> None:
        followers, self._followers = self._followers, None
        if followers is None:
            return
        if clean and self.sender is not None and followers.alive():
            try:
                self.sender.stop()
            except RuntimeError as exc:  # a rank hung while idle: it is killed below
                logger.warning("a tensor-parallel rank did not take the stop: %s", exc)
                clean = False
        followers.stop(launch.JOIN_TIMEOUT_S if clean else 0.0)
        launch.leave_group()


def make_executor(config: EngineConfig, tp: TPGroup | None, follower: Callable, *,
                  launcher=None, device: str | None = None):
    """``tp`` (and ``device``): this rank's group on a follower; else rank 0 of
    ``tensor_parallel_size``, its followers started by ``launcher``."""
    if tp is not None:
        return FollowerExecutor(config, tp, device)
    if config.tensor_parallel_size > 1:
        return LeaderExecutor(config, follower, launcher)
    return LocalExecutor(config)
