"""A client error found by a replica (here: a prompt over the engine's bin budget, which
the ingress cannot see) comes back as a ``Refusal`` value, so Serve never logs it as a
failed request with a traceback, and the ingress answers the 400 it maps to. Without
Ray: the replica's method over a fake engine, the ingress's call over a fake handle."""

from __future__ import annotations

import asyncio
import logging

import pytest

from deployments.http.errors import APIError
from deployments.http.openai_api import OpenAIService
from deployments.replica.deployment import EngineReplica
from deployments.replica.work import Refusal, ScoreWork
from worker.core.errors import SequenceOverBudgetError


class FakeEngine:
    async def score_async(self, inputs):
        raise SequenceOverBudgetError(95, 96, 64)

    def shutdown(self, timeout=None) -> None:
        pass


def replica() -> EngineReplica:
    r = EngineReplica.__new__(EngineReplica)  # no Serve: only what a request touches
    r.engine, r._active, r._used_tokens, r._num_served = FakeEngine(), {}, 0, 0
    return r


class Handle:
    def __init__(self, method):
        self.method = method

    def remote(self, work):
        return self.method(work)


def test_a_replica_returns_client_errors_and_the_ingress_answers_400(caplog):
    rep = replica()
    work = ScoreWork(None, 95, [list(range(95))])
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        result = asyncio.run(rep.score(work))
    assert isinstance(result, Refusal) and isinstance(result.error, SequenceOverBudgetError)
    assert rep._used_tokens == 0 and rep._active == {}  # released like any request
    levels = [r.levelname for r in caplog.records]
    assert levels == ["INFO"]
    assert caplog.records[0].exc_info is None
    with pytest.raises(APIError) as err:
        asyncio.run(OpenAIService._call(Handle(rep.score), work))
    assert err.value.status == 400 and err.value.param == "max_num_batched_tokens"
    assert "max_num_batched_tokens=64" in err.value.message
