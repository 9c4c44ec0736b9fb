"""The generation scheduler without a model: stall-free decodes, FCFS chunked prefill
packed several prompts per step, preemption by recompute, and no leaked block ever."""

from __future__ import annotations

import numpy as np
import pytest

from worker.generate.sampling import SamplingParams
from worker.generate.scheduler import GenScheduler, StopReason
from worker.generate.sequence import FinishReason, SeqStatus, Sequence
from worker.kv.block_manager import BlockManager


def seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(prompt_len)), prompt_len, SamplingParams(max_tokens=max_tokens))


def run_step(sched: GenScheduler):
    """One step with a fake model: every sequence whose chunk reaches its end gets a
    token; those at max_tokens finish."""
    out = sched.schedule()
    if out is None:
        return None
    sampled = [s for s, n in zip(out.seqs, out.num_new_tokens)
               if s.num_computed + n == s.num_tokens]
    sched.advance(out)
    for s in sampled:
        s.token_ids.append(7)
        if s.num_output_tokens >= s.params.max_tokens:
            sched.finish(s, FinishReason.LENGTH)
    sched.check_invariants()
    return out


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunk=0):
    return GenScheduler(BlockManager(num_blocks, block_size), max_num_batched_tokens=budget,
                        max_num_seqs=max_seqs, max_prefill_chunk=chunk)


def test_several_prompts_share_a_step_in_arrival_order():
    sched = make(budget=32)
    seqs = [seq(10) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert out.seqs == seqs[:4] and out.num_new_tokens == [10, 10, 10, 2]
    assert out.num_decodes == 0 and out.stop is StopReason.TOKEN_BUDGET
    out = run_step(sched)  # three decodes first, then the rest of the chunked prompt, then #5
    assert out.seqs[:3] == seqs[:3] and out.num_decodes == 3
    assert out.seqs[3:] == [seqs[3], seqs[4]] and out.num_new_tokens[3:] == [8, 10]


def test_chunk_cap():
    sched = make(budget=32, chunk=7)
    s = seq(20)
    sched.add(s)
    assert [run_step(sched).num_new_tokens for _ in range(3)] == [[7], [7], [6]]
    assert s.num_output_tokens == 1


def test_stall_free_decodes_while_a_long_prompt_prefills():
    budget = 16
    sched = make(num_blocks=256, budget=budget, max_seqs=8)
    decoders = [seq(3, max_tokens=50) for _ in range(4)]
    for s in decoders:
        sched.add(s)
    run_step(sched)  # prefill all four
    long = seq(4 * budget)
    sched.add(long)
    steps = 0
    while long.num_output_tokens == 0:
        before = [s.num_output_tokens for s in decoders]
        out = run_step(sched)
        steps += 1
        assert [s.num_output_tokens for s in decoders] == [b + 1 for b in before]
        assert out.num_decodes == 4 and out.num_tokens <= budget
    assert steps == -(-4 * budget // (budget - 4))  # the prompt took the rest of each step


def test_max_num_seqs_caps_the_running_set():
    sched = make(budget=64, max_seqs=3)
    for _ in range(5):
        sched.add(seq(2))
    out = run_step(sched)
    assert len(out.seqs) == 3 and out.stop is StopReason.MAX_NUM_SEQS


def test_decode_preempts_the_newest_and_it_recomputes():
    sched = make(num_blocks=4, block_size=4, budget=32, max_seqs=4)
    old, new = seq(7, max_tokens=6), seq(7, max_tokens=6)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled: 2 blocks each, 7 of 8 slots used
    run_step(sched)  # both decode into their last free slot
    out = run_step(sched)  # old needs a 3rd block: none free, so the newer one goes
    assert out.preempted == [new] and new.status is SeqStatus.WAITING
    assert new.num_computed == 0 and new.num_preemptions == 1
    assert out.seqs == [old] and sched.waiting[0] is new
    while run_step(sched) is not None:
        pass
    assert old.finished and new.finished and new.num_output_tokens == 6


def test_finish_frees_blocks_at_once():
    sched = make()
    a, b = seq(9), seq(30)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    used = sched.blocks.stats().num_used_blocks
    sched.finish(b, FinishReason.ABORT)
    assert sched.blocks.stats().num_used_blocks == used - -(-b.num_computed // 4)
    sched.finish(b, FinishReason.ABORT)  # idempotent
    assert b.finish_reason is FinishReason.ABORT and b not in sched.running
    waiting = seq(5)
    sched.add(waiting)
    sched.finish(waiting, FinishReason.ABORT)
    assert waiting not in sched.waiting
    sched.check_invariants()


@pytest.mark.parametrize("seed", range(25))
def test_random_workloads_finish_in_order_without_leaks(seed):
    rng = np.random.default_rng(seed)
    block_size = int(rng.choice([1, 4, 16]))
    budget = int(rng.integers(8, 64))
    max_seqs = int(rng.integers(1, min(budget, 12) + 1))
    seqs = [seq(int(rng.integers(1, 60)), int(rng.integers(1, 12)))
            for _ in range(int(rng.integers(1, 30)))]
    biggest = max(-(-(s.prompt_len + s.params.max_tokens) // block_size) for s in seqs)
    num_blocks = biggest + int(rng.integers(0, 3 * biggest))
    sched = make(num_blocks, block_size, budget, max_seqs, int(rng.integers(0, 20)))
    for s in seqs:
        sched.add(s)
    first_step = {}  # sequence -> the step it was first scheduled in
    for step in range(10_000):
        out = run_step(sched)
        if out is None:
            break
        assert out.seqs, f"no progress: {out.stop}"
        for s in out.seqs:
            first_step.setdefault(s, step)
    order = [first_step[s] for s in seqs]
    assert order == sorted(order)  # admitted first come, first served
    assert all(s.finished and s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.blocks.stats().num_used_blocks == 0
    assert not sched.running and not sched.waiting
