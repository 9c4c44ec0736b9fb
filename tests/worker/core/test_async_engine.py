"""The async interface: concurrent submits, background step loop, clean shutdown."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tests.factories import mixed_lengths, token_lists
from worker import Engine, EngineConfig
from worker.core.errors import EngineDeadError


def _loop_threads():
    return [t for t in threading.enumerate() if t.name == "packserve-step-loop" and t.is_alive()]


@pytest.fixture
def engine(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("mistral")), max_num_batched_tokens=128))
    yield engine
    engine.shutdown()


def test_concurrent_submits_equal_sync_results(engine):
    lists = token_lists(mixed_lengths(60), seed=31)
    want_emb = engine.embed(lists, pooling="mean", normalize=True)
    want_scores = engine.score(lists)
    assert not _loop_threads()  # the sync API steps on the caller's thread

    async def main():
        emb = asyncio.gather(*(engine.submit(ids, "embed", pooling="mean", normalize=True)
                               for ids in lists))
        scores = asyncio.gather(*(engine.submit(ids, "score") for ids in lists))
        together = await asyncio.gather(emb, scores)
        batch_api = await engine.embed_async(lists, pooling="mean", normalize=True)
        return together, batch_api, await engine.score_async(lists[:5])

    (emb, scores), batch_api, few = asyncio.run(main())
    np.testing.assert_allclose(np.stack(emb), want_emb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch_api, want_emb, atol=1e-5, rtol=0)
    for got, want in zip(scores, want_scores, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert len(few) == 5
    assert len(_loop_threads()) == 1 and engine.is_alive()
    assert engine.stats.num_steps < 3 * len(lists)  # requests were batched, not one per step


def test_sync_and_async_at_once(engine):
    lists = token_lists(mixed_lengths(30), seed=32)
    want = engine.embed(lists)

    async def main():
        pending = asyncio.gather(*(engine.submit(ids) for ids in lists))
        sync = await asyncio.to_thread(engine.embed, lists)  # steps from another thread
        return np.stack(await pending), sync

    got_async, got_sync = asyncio.run(main())
    np.testing.assert_allclose(got_async, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_sync, want, atol=1e-5, rtol=0)


def test_shutdown_is_clean_and_observable(engine):
    async def warm():
        return await engine.submit([1, 2, 3])

    asyncio.run(warm())
    assert len(_loop_threads()) == 1
    engine.shutdown()
    assert not _loop_threads()
    assert not engine.is_alive()

    async def after():
        engine.submit([1, 2, 3])

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(after())
    with pytest.raises(EngineDeadError):
        engine.embed([[1, 2]])
    engine.shutdown()  # idempotent


class Gate:
    """A fault hook that holds the first forward until ``open()``."""

    def __init__(self):
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, num_tokens, num_seqs):
        self.entered.set()
        assert self.opened.wait(10)

    async def wait_entered(self):
        assert await asyncio.to_thread(self.entered.wait, 10)


def test_shutdown_fails_queued_requests(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("llama")), max_num_batched_tokens=128))
    engine.runner.fault_hook = gate = Gate()

    async def main():
        first = engine.submit([1, 2, 3])
        await gate.wait_entered()  # the loop is now inside the first step
        queued = [engine.submit([4, 5, 6]) for _ in range(3)]
        closer = asyncio.create_task(asyncio.to_thread(engine.shutdown))
        await asyncio.sleep(0.1)
        gate.opened.set()
        await closer
        return await asyncio.gather(first, *queued, return_exceptions=True)

    first, *queued = asyncio.run(main())
    assert isinstance(first, np.ndarray)  # the running step completes
    assert all(isinstance(r, EngineDeadError) for r in queued)
    assert not _loop_threads()


def test_cancelled_request_is_dropped_before_it_runs(engine):
    engine.runner.fault_hook = gate = Gate()

    async def main():
        first = engine.submit([1, 2, 3])
        await gate.wait_entered()
        doomed = engine.submit([7] * 20)
        doomed.cancel()
        await asyncio.sleep(0)  # cancellation reaches the request via the done callback
        kept = engine.submit([8] * 20)
        gate.opened.set()
        return await first, await kept

    tokens_before = engine.stats.num_tokens
    first, kept = asyncio.run(main())
    assert first.shape == kept.shape == (64,)
    assert engine.stats.num_tokens - tokens_before == 3 + 20  # the cancelled 20 never ran
