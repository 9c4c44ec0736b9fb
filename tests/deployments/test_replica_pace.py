"""What a replica tells admission about its engine, from the engine's step records
without Ray: seconds per decode step (an idle gap ends in a prefill, not counted), and KV
pressure that lapses by itself, so an engine that went idle under pressure is not closed
to new work for good."""

from __future__ import annotations

from deployments.replica.deployment import ReplicaPace
from worker.engine.observe import StepKind, StepRecord


def record(decodes: int = 8, waiting: int = 0, preempted: int = 0,
           out_of_blocks: bool = False) -> StepRecord:
    return StepRecord(StepKind.GENERATE, (decodes,), (512,), decodes, (0.01,), 0, 0.0, 0,
                      None, 512, 64, 32, 32, preempted, waiting, (), num_decodes=decodes,
                      out_of_blocks=out_of_blocks)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pace_is_the_interval_before_decode_steps_and_idle_gaps_do_not_count():
    clock = Clock()
    pace = ReplicaPace(clock)
    for _ in range(200):  # busy: a step every 20 ms
        clock.now += 0.02
        pace.observe(record())
    assert abs(pace.step_s - 0.02) < 1e-9
    clock.now += 30.0  # idle: the next request's first step prefills, then it decodes
    pace.observe(record(decodes=0))
    for _ in range(5):
        clock.now += 0.02
        pace.observe(record())
    assert abs(pace.step_s - 0.02) < 1e-9


def test_kv_pressure_from_preemption_or_blocks_lapses_when_the_engine_goes_idle():
    clock = Clock()
    pace = ReplicaPace(clock)
    pace.observe(record())
    assert not pace.pressure()
    clock.now = 1.0
    pace.observe(record(preempted=2))
    assert pace.pressure() and pace.num_preemptions == 2
    clock.now = 1.0 + ReplicaPace.PRESSURE_HOLD_S + 0.1  # no step since: idle
    assert not pace.pressure()
    pace.observe(record(waiting=3, out_of_blocks=True))
    assert pace.pressure()
    clock.now += ReplicaPace.PRESSURE_HOLD_S + 0.1
    assert not pace.pressure()
    pace.observe(record(out_of_blocks=True))  # nothing waiting: no one is short of blocks
    assert not pace.pressure()
