"""CUDA out-of-memory, injected on CPU: split the bin, shrink the budget, live on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tests.factories import mixed_lengths, token_lists
from tests.worker._hf_reference import load_reference, next_token_logprobs
from worker import Engine, EngineConfig
from worker.core.errors import RequestOutOfMemoryError

BUDGET = 256


class FaultInjector:
    """Raises torch.OutOfMemoryError for any forward over ``max_ok_tokens`` tokens."""

    def __init__(self, max_ok_tokens: int):
        self.max_ok_tokens = max_ok_tokens
        self.sizes: list[int] = []  # every forward attempted, in tokens
        self.raised = 0

    def __call__(self, num_tokens: int, num_seqs: int) -> None:
        self.sizes.append(num_tokens)
        if num_tokens > self.max_ok_tokens:
            self.raised += 1
            raise torch.OutOfMemoryError(f"injected: {num_tokens} tokens > {self.max_ok_tokens}")


@pytest.fixture
def engine(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("llama")), max_num_batched_tokens=BUDGET))
    yield engine
    engine.shutdown()


def test_split_and_shrink_keep_results_correct(engine, tiny_model):
    lists = token_lists(mixed_lengths(30), seed=11)
    engine.runner.fault_hook = injector = FaultInjector(max_ok_tokens=100)
    got = engine.score(lists)

    ref = load_reference(tiny_model("llama"), decoder=True)
    for ids, lp in zip(lists, got, strict=True):
        np.testing.assert_allclose(lp, next_token_logprobs(ref, ids), atol=1e-4, rtol=0)
    stats = engine.stats
    assert injector.raised >= 1 and stats.num_oom == injector.raised
    assert stats.token_budget < BUDGET and stats.token_budget % 16 == 0
    assert stats.token_budget <= 0.9 * BUDGET
    assert stats.num_requests_failed == 0 and engine.is_alive()
    # After the shrink, new bins are formed under the smaller budget.
    before = len(injector.sizes)
    engine.score(lists)
    assert max(injector.sizes[before:]) <= max(stats.token_budget, 70)


def test_a_sequence_that_alone_runs_out_fails_alone(engine):
    lists = token_lists([10, 60, 12, 5, 61, 7], seed=12)
    engine.runner.fault_hook = FaultInjector(max_ok_tokens=50)

    async def main():
        futures = [engine.submit(ids, "score") for ids in lists]
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    for ids, out in zip(lists, results, strict=True):
        if len(ids) > 50:
            assert isinstance(out, RequestOutOfMemoryError)
            assert str(len(ids)) in str(out) and "max_num_batched_tokens" in str(out)
        else:
            assert isinstance(out, np.ndarray) and out.shape == (len(ids) - 1,)
    assert engine.is_alive()
    assert engine.stats.num_requests_failed == 2
    engine.runner.fault_hook = None
    assert len(engine.score(lists)) == len(lists)  # the engine lives on


def test_non_oom_failure_kills_the_engine_observably(engine):
    lists = token_lists([10, 20, 30], seed=13)

    def broken(num_tokens, num_seqs):
        raise RuntimeError("device-side assert (injected)")

    engine.runner.fault_hook = broken

    async def main():
        results = await asyncio.gather(*(engine.submit(ids) for ids in lists),
                                       return_exceptions=True)
        with pytest.raises(Exception, match="not running"):
            engine.submit(lists[0])
        return results

    from worker.core.errors import EngineDeadError

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results)
    assert not engine.is_alive()
    with pytest.raises(EngineDeadError):
        engine.embed(lists)
