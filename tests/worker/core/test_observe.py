"""Step observers (``worker.engine.observe``): a record after every pooled and generation step,
its numbers consistent with what was submitted, and observers that cannot hurt."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
import torch

from tests.factories import mixed_lengths, token_lists
from worker.engine.observe import StepKind, StepRecord, padded_equivalent
from worker.generate.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


class Collect:
    """An observer that keeps every record and the thread that delivered it."""

    def __init__(self):
        self.records: list[StepRecord] = []
        self.threads: set[str] = set()

    def __call__(self, record: StepRecord) -> None:
        self.records.append(record)
        self.threads.add(threading.current_thread().name)

    def of(self, kind: StepKind) -> list[StepRecord]:
        return [r for r in self.records if r.kind is kind]


def check_record(r: StepRecord) -> None:
    """What holds for every record."""
    assert r.num_bins == len(r.bin_capacity) == len(r.forward_seconds)
    assert all(0 < f <= 1 for f in r.fill_ratios), r
    assert r.padded_num_tokens >= r.num_tokens and r.num_padding_avoided >= 0
    assert all(s > 0 for s in r.forward_seconds)
    assert r.num_kv_blocks_used + r.num_kv_blocks_free == r.num_kv_blocks
    assert all(w >= 0 for w in r.queue_wait_seconds) and r.num_waiting >= 0
    assert r.h2d_seconds == 0.0  # CPU: the model reads the staging buffer in place


def test_padded_equivalent_cuts_arrival_order_into_equal_batches():
    lengths = np.array([5, 1, 3, 7, 2])
    assert padded_equivalent(lengths, 1) == 5 * 7
    assert padded_equivalent(lengths, 2) == 3 * 5 + 2 * 7  # [5, 1, 3] [7, 2]
    assert padded_equivalent(lengths, 5) == int(lengths.sum())  # one each: no padding
    assert padded_equivalent(lengths, 9) == int(lengths.sum())
    assert padded_equivalent(np.array([], np.int64), 3) == 0


@pytest.mark.parametrize("kind, task", [("bert", "embed"), ("llama", "score")])
def test_pooled_steps_report_every_token(kind, task, tiny_model, make_engine):
    engine = make_engine(tiny_model(kind), max_num_batched_tokens=64)
    seen = Collect()
    engine.add_step_observer(seen)
    lists = token_lists(mixed_lengths(n=30, longest=60, seed=4), seed=9)
    getattr(engine, task)(lists)

    records = seen.of(StepKind.FORWARD)
    assert records and len(records) == len(seen.records) == engine.stats.num_steps
    for r in records:
        check_record(r)
        assert r.num_bins >= 1 and r.num_oom == 0 and r.new_token_budget is None
        assert r.token_budget == 64 and r.num_kv_blocks == 0 and r.num_preemptions == 0
        assert r.h2d_bytes >= 8 * 2 * r.num_tokens  # ids and positions, int64
    assert sum(r.num_tokens for r in records) == sum(map(len, lists))
    assert sum(len(r.queue_wait_seconds) for r in records) == len(lists)
    assert records[-1].num_waiting == 0
    assert any(r.num_padding_avoided > 0 for r in records)  # mixed lengths: padding avoided


def test_padded_equivalent_of_one_step_matches_the_definition(tiny_model, make_engine):
    engine = make_engine(tiny_model("bert"), max_num_batched_tokens=64)
    seen = Collect()
    engine.add_step_observer(seen)
    lengths = [40, 3, 17, 60, 9, 25, 30]  # 7 sequences, 4 bins' window: one step
    engine.embed(token_lists(lengths, seed=2))
    (r,) = seen.records
    assert r.num_tokens == sum(lengths) and r.num_bins >= 2
    assert r.padded_num_tokens == padded_equivalent(np.array(lengths), r.num_bins)


def test_generation_steps_report_tokens_kv_and_waits(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), max_num_batched_tokens=64,
                         max_num_running_seqs=8, max_prefill_chunk=16)
    seen = Collect()
    engine.add_step_observer(seen)
    prompts = token_lists(mixed_lengths(n=12, longest=40, seed=3), seed=5)
    outs = engine.generate(prompts, GREEDY)

    records = seen.of(StepKind.GENERATE)
    assert len(records) == len(seen.records) == engine.stats.num_steps
    for r in records:
        check_record(r)
        assert r.num_bins == 1 and r.bin_capacity == (64,) and r.h2d_bytes == 0
        assert r.num_kv_blocks > 0
    # every prompt token once, then one token per decode (the last sampled is never fed)
    want = sum(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outs))
    assert sum(r.num_tokens for r in records) == want
    assert sum(len(r.queue_wait_seconds) for r in records) == len(prompts)
    assert records[0].num_kv_blocks_used > 0 and records[-1].num_kv_blocks_used == 0
    assert any(r.num_waiting > 0 for r in records)  # 12 prompts, 8 may run


def test_forced_preemption_is_counted(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), max_num_batched_tokens=64,
                         max_num_running_seqs=8, max_prefill_chunk=16, kv_block_size=4,
                         num_kv_blocks=40)
    seen = Collect()
    engine.add_step_observer(seen)
    prompts = token_lists(mixed_lengths(n=20, longest=60, seed=5), seed=11)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))

    preempted = sum(o.num_preemptions for o in outs)
    assert preempted > 0  # the small cache forced it
    assert sum(r.num_preemptions for r in seen.records) == preempted
    for r in seen.records:
        check_record(r)
    assert sum(len(r.queue_wait_seconds) for r in seen.records) == len(prompts)


class OomOn:
    """Raises torch.OutOfMemoryError on the forwards numbered in ``calls`` (from 1) and
    on every forward over ``max_ok_tokens``."""

    def __init__(self, calls=(), max_ok_tokens: int | None = None):
        self.calls, self.max_ok, self.n = set(calls), max_ok_tokens, 0

    def __call__(self, num_tokens: int, num_seqs: int) -> None:
        self.n += 1
        if self.n in self.calls or (self.max_ok is not None and num_tokens > self.max_ok):
            raise torch.OutOfMemoryError(f"injected on {num_tokens} tokens")


def test_out_of_memory_and_budget_shrinks_are_reported(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), max_num_batched_tokens=256)
    seen = Collect()
    engine.add_step_observer(seen)
    engine.runner.fault_hook = OomOn(max_ok_tokens=100)
    lists = token_lists(mixed_lengths(n=30), seed=11)
    engine.score(lists)

    assert sum(r.num_oom for r in seen.records) == engine.stats.num_oom > 0
    shrinks = [r.new_token_budget for r in seen.records if r.new_token_budget is not None]
    assert shrinks and shrinks[-1] == engine.stats.token_budget < 256
    assert sum(r.num_tokens for r in seen.records) == sum(map(len, lists))
    for r in seen.records:
        check_record(r)


def test_generation_out_of_memory_step_is_reported(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), max_num_batched_tokens=64,
                         max_num_running_seqs=8, max_prefill_chunk=16)
    seen = Collect()
    engine.add_step_observer(seen)
    engine.generation.runner.fault_hook = OomOn(calls=(2,))
    engine.generate(token_lists([30, 20, 10, 25], seed=1), GREEDY)

    (oom,) = [r for r in seen.records if r.num_oom]
    assert oom.num_bins == 0 and oom.num_tokens == 0 and oom.queue_wait_seconds == ()
    assert oom.new_token_budget == oom.token_budget < 64
    for r in seen.records:
        check_record(r)


def test_a_raising_observer_is_dropped_and_the_engine_steps_on(tiny_model, make_engine,
                                                               caplog):
    engine = make_engine(tiny_model("bert"), max_num_batched_tokens=64)
    calls = []

    def broken(record):
        calls.append(record)
        raise RuntimeError("observer bug")

    good = Collect()
    engine.add_step_observer(broken)
    engine.add_step_observer(good)
    lists = token_lists(mixed_lengths(n=30, longest=60, seed=4), seed=9)
    with caplog.at_level(logging.ERROR, logger="worker.engine.observe"):
        first = engine.embed(lists)
    assert len(calls) == 1 and "observer bug" in caplog.text
    assert len(good.records) == engine.stats.num_steps > 1  # the good one kept going
    np.testing.assert_array_equal(engine.embed(lists), first)


def test_no_observer_means_nothing_measured(tiny_model, make_engine):
    engine = make_engine(tiny_model("bert"), max_num_batched_tokens=64)
    assert engine._obs is None and engine.runner.timer is None and engine.staging.timer is None
    engine.add_step_observer(lambda r: 1 / 0)  # dropped at the first step
    assert engine.runner.timer is not None and engine.staging.timer is not None
    engine.embed(token_lists([5, 9], seed=1))
    assert engine._obs is None and engine.runner.timer is None and engine.staging.timer is None
    seen = Collect()
    engine.add_step_observer(seen)  # a new one starts afresh
    engine.embed(token_lists([5, 9], seed=1))
    assert len(seen.records) == 1 and seen.records[0].num_tokens == 14


def test_observers_run_on_the_step_loop_thread(tiny_model, make_engine):
    engine = make_engine(tiny_model("bert"), max_num_batched_tokens=64)
    seen = Collect()
    engine.add_step_observer(seen)
    lists = token_lists(mixed_lengths(n=20, longest=60, seed=2), seed=3)
    asyncio.run(engine.embed_async(lists))
    with engine._step_lock:  # results are delivered before the step's record: let it end
        pass
    assert seen.threads == {"packserve-step-loop"}
    assert sum(r.num_tokens for r in seen.records) == sum(map(len, lists))
    assert sum(len(r.queue_wait_seconds) for r in seen.records) == len(lists)


def test_observer_must_be_callable(tiny_model, make_engine):
    engine = make_engine(tiny_model("bert"), max_num_batched_tokens=64)
    with pytest.raises(TypeError, match="callable"):
        engine.add_step_observer("not a function")


@pytest.mark.gpu
def test_cuda_times_bins_and_copies_with_events(tiny_model, make_engine):
    """On CUDA: forward and copy times come from events (no synchronize), bytes from the
    staged words; generation steps time the whole step."""
    engine = make_engine(tiny_model("llama"), device="cuda", dtype="float32",
                         max_num_batched_tokens=64, max_num_running_seqs=8)
    seen = Collect()
    engine.add_step_observer(seen)
    lists = token_lists(mixed_lengths(n=30, longest=60, seed=4), seed=9)
    engine.score(lists)
    engine.generate(lists[:4], GREEDY)
    forward, generate = seen.of(StepKind.FORWARD), seen.of(StepKind.GENERATE)
    assert forward and generate
    for r in forward:
        assert r.num_bins >= 1 and all(0 < s < 10 for s in r.forward_seconds)
        assert r.h2d_bytes >= 16 * r.num_tokens and 0 < r.h2d_seconds < 10
    for r in generate:
        assert r.num_bins == 1 and 0 < r.forward_seconds[0] < 10
    assert sum(r.num_tokens for r in forward) == sum(map(len, lists))
