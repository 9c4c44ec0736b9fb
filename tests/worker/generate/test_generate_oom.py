"""CUDA out-of-memory in a generation step, injected on CPU: undo the step, shrink the
step budget (preempting the newest sequences when the decodes alone do not fit), retry;
the engine lives on and greedy outputs do not change."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.factories import mixed_lengths, token_lists
from tests.worker._gen_helpers import hf_greedy
from worker.core.errors import EngineDeadError, RequestOutOfMemoryError
from worker.generate.sampling import SamplingParams

PROMPTS = token_lists(mixed_lengths(n=10, longest=40, seed=3), seed=21)
CONFIG = {"max_num_batched_tokens": 64, "max_num_running_seqs": 8, "max_prefill_chunk": 16,
          "kv_block_size": 4}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


class FaultInjector:
    """Raises torch.OutOfMemoryError on the forwards numbered in ``on_calls`` (from 1),
    and on every forward over ``max_ok_tokens`` tokens."""

    def __init__(self, on_calls=(), max_ok_tokens: int | None = None):
        self.on_calls, self.max_ok_tokens = set(on_calls), max_ok_tokens
        self.sizes: list[int] = []  # every forward attempted, in tokens
        self.raised = 0

    def __call__(self, num_tokens: int, num_seqs: int) -> None:
        self.sizes.append(num_tokens)
        over = self.max_ok_tokens is not None and num_tokens > self.max_ok_tokens
        if len(self.sizes) in self.on_calls or over:
            self.raised += 1
            raise torch.OutOfMemoryError(f"injected on a step of {num_tokens} tokens")


def shrunk(budget: int, failed_num_tokens: int, align: int = 16) -> int:
    """The rule: 90% of the failed step, aligned down when at least ``align``, >= 1."""
    target = int(failed_num_tokens * 0.9)
    if target >= align:
        target -= target % align
    return min(budget, max(1, target))


@pytest.fixture(scope="module")
def want(tiny_model):
    """HF greedy outputs for PROMPTS, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    return [hf_greedy(model.eval(), p, GREEDY.max_tokens, eos_token_id=None) for p in PROMPTS]


def test_oom_on_two_steps_keeps_greedy_outputs(tiny_model, make_engine, want):
    engine = make_engine(tiny_model("llama"), **CONFIG)
    engine.generation.runner.fault_hook = injector = FaultInjector(on_calls=(3, 9))
    outs = engine.generate(PROMPTS, GREEDY)

    assert [o.token_ids for o in outs] == want
    stats = engine.stats
    assert injector.raised == 2 and stats.num_oom == 2
    budget = shrunk(shrunk(CONFIG["max_num_batched_tokens"], injector.sizes[2]),
                    injector.sizes[8])
    assert stats.gen_token_budget == budget < CONFIG["max_num_batched_tokens"]
    assert max(injector.sizes[9:]) <= stats.gen_token_budget
    assert engine.is_alive() and stats.num_requests_failed == 0
    engine.check_kv_invariants()
    assert engine.generate(PROMPTS[:2], GREEDY)[1].token_ids == want[1]  # lives on


def test_a_failed_step_advances_nothing(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), **CONFIG)
    gen = engine.generation
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    seqs = [gen.make_sequence(p, params) for p in PROMPTS[:4]]
    for s in seqs:
        gen.submit(s)
    while not all(s.is_decode for s in seqs):  # prefill: all four decode from now on
        engine.step()
    before = [(s.num_computed, list(s.token_ids), s.generator.get_state()) for s in seqs]
    gen.runner.fault_hook = FaultInjector(on_calls=(1,))
    assert engine.step() == 0

    after = [(s.num_computed, list(s.token_ids), s.generator.get_state()) for s in seqs]
    for (n0, ids0, g0), (n1, ids1, g1) in zip(before, after, strict=True):
        assert ids0 == ids1 and torch.equal(g0, g1)
    # 4 decodes failed: budget 3, so the newest is preempted (recomputes from 0).
    assert [n for n, _, _ in after] == [n for n, _, _ in before[:3]] + [0]
    assert engine.stats.num_oom == 1 and engine.stats.gen_token_budget == 3
    assert gen.scheduler.running == seqs[:3] and seqs[-1].num_preemptions == 1
    assert all(gen.blocks.num_tokens(s.seq_id) == s.num_computed for s in seqs)
    engine.check_kv_invariants()
    engine.step()
    for s, (n, ids, _) in zip(seqs[:3], before):  # the retry decoded the same tokens
        assert s.num_computed == n + 1 and s.num_tokens == len(ids) + 1


def test_seeded_sampling_survives_an_oom(tiny_model, make_engine):
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=8) for i in range(6)]
    clean = make_engine(tiny_model("llama"), **CONFIG).generate(PROMPTS[:6], params)
    engine = make_engine(tiny_model("llama"), **CONFIG)
    engine.generation.runner.fault_hook = FaultInjector(on_calls=(2, 5))
    faulted = engine.generate(PROMPTS[:6], params)
    assert [o.token_ids for o in faulted] == [o.token_ids for o in clean]
    assert engine.stats.num_oom == 2


def test_persistent_oom_on_decodes_preempts_and_completes(tiny_model, make_engine, want):
    engine = make_engine(tiny_model("llama"), **CONFIG)
    engine.generation.runner.fault_hook = injector = FaultInjector(max_ok_tokens=3)
    outs = engine.generate(PROMPTS, GREEDY)

    assert [o.token_ids for o in outs] == want
    stats = engine.stats
    assert stats.num_oom == injector.raised > 0 and stats.gen_token_budget <= 3
    assert sum(o.num_preemptions for o in outs) > 0
    assert engine.is_alive() and stats.num_requests_failed == 0
    engine.check_kv_invariants()


def test_oom_on_a_lone_token_fails_that_request_alone(tiny_model, make_engine, want):
    engine = make_engine(tiny_model("llama"), **CONFIG)
    engine.generation.runner.fault_hook = FaultInjector(on_calls=range(1, 10_000))
    with pytest.raises(RequestOutOfMemoryError, match="max_num_batched_tokens=1"):
        engine.generate(PROMPTS[:3], GREEDY)
    stats = engine.stats
    assert engine.is_alive() and stats.num_requests_failed == 3
    assert stats.gen_token_budget == 1
    engine.check_kv_invariants()
    engine.generation.runner.fault_hook = None
    assert [o.token_ids for o in engine.generate(PROMPTS[:3], GREEDY)] == want[:3]


def test_non_oom_failure_in_generation_kills_the_engine(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), **CONFIG)

    def broken(num_tokens, num_seqs):
        raise RuntimeError("device-side assert (injected)")

    engine.generation.runner.fault_hook = broken
    with pytest.raises(RuntimeError, match="device-side assert"):
        engine.generate(PROMPTS[:2], GREEDY)
    assert not engine.is_alive() and engine.stats.num_oom == 0
    with pytest.raises(EngineDeadError):
        engine.generate(PROMPTS[:2], GREEDY)


def test_budget_regrows_after_clean_steps(tiny_model, make_engine, want):
    """A one-off OOM must not cap the engine for good: clean steps double it back."""
    engine = make_engine(tiny_model("llama"), **CONFIG)
    engine.generation.scheduler.regrow_after_steps = 2
    engine.generation.runner.fault_hook = injector = FaultInjector(on_calls=(2,))
    outs = engine.generate(PROMPTS, GREEDY)

    assert [o.token_ids for o in outs] == want
    assert injector.raised == 1 and engine.stats.num_oom == 1
    shrunk_to = shrunk(CONFIG["max_num_batched_tokens"], injector.sizes[1])
    assert shrunk_to < CONFIG["max_num_batched_tokens"]
    assert engine.stats.gen_token_budget == CONFIG["max_num_batched_tokens"]  # regrown, capped
    assert max(injector.sizes[2:]) <= CONFIG["max_num_batched_tokens"]
