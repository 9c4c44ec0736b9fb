"""Bad requests: typed errors naming limit, value and setting; a bad request fails alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.factories import VOCAB, token_lists
from worker import Engine, EngineConfig
from worker.core.errors import (
    EmptySequenceError,
    InvalidRequestError,
    SequenceOverBudgetError,
    SequenceTooLongError,
    TokenOutOfVocabError,
    UnsupportedTaskError,
)

BUDGET, MAX_LEN = 64, 100


@pytest.fixture(scope="module")
def engine(tiny_model):
    config = EngineConfig(model=str(tiny_model("qwen2")), max_num_batched_tokens=BUDGET,
                          max_model_len=MAX_LEN)
    engine = Engine(config)
    yield engine
    engine.shutdown()


BAD = [
    ([], EmptySequenceError, ["0 tokens", "1 token"]),
    ([1] * 101, SequenceTooLongError, ["101", "max_model_len=100"]),
    ([1] * 70, SequenceOverBudgetError, ["70", "80 once aligned", "max_num_batched_tokens=64"]),
    ([1, 2, VOCAB + 7, 3], TokenOutOfVocabError, [str(VOCAB + 7), "position 2", str(VOCAB)]),
    ([1, -1], TokenOutOfVocabError, ["-1", "position 1", str(VOCAB)]),
]


@pytest.mark.parametrize("ids,error,words", BAD)
def test_sync_errors_name_limit_value_and_setting(engine, ids, error, words):
    with pytest.raises(error) as info:
        engine.embed([[5, 6], ids])
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "sequence 1 of the 2 given" in "".join(info.value.__notes__)
    assert isinstance(info.value, InvalidRequestError) and isinstance(info.value, ValueError)
    if error is not EmptySequenceError:
        assert info.value.setting in message


def test_over_budget_is_a_too_long_error(engine):
    with pytest.raises(SequenceTooLongError) as info:
        engine.score([[1] * 70])
    assert (info.value.limit, info.value.value) == (BUDGET, 70)


def test_exactly_at_the_limits_is_accepted(engine):
    out = engine.score([[VOCAB - 1] * BUDGET, [0]])
    assert out[0].shape == (BUDGET - 1,) and out[1].shape == (0,)


def test_bad_pooling_and_options(engine):
    with pytest.raises(UnsupportedTaskError, match="pooling"):
        engine.embed([[1, 2]], pooling="max")
    with pytest.raises(InvalidRequestError, match="flat list of integers"):
        engine.embed([["a", "b"]])
    with pytest.raises(InvalidRequestError, match="one-dimensional"):
        engine.embed([[[1, 2]]])


def test_score_on_an_encoder_is_rejected(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("bert")), max_num_batched_tokens=64))
    try:
        with pytest.raises(UnsupportedTaskError, match="language-modeling head"):
            engine.score([[1, 2, 3]])
    finally:
        engine.shutdown()


def test_a_bad_request_fails_alone_through_submit(engine):
    good = token_lists([3, 40, 1, 17], seed=21)
    bad = [b[0] for b in BAD]
    want_scores = engine.score(good)

    async def main():
        futures = []
        for i in range(max(len(good), len(bad))):
            if i < len(good):
                futures.append(engine.submit(good[i], "score"))
            if i < len(bad):
                futures.append(engine.submit(bad[i], "score"))
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    goods = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert [type(e) for e in errors] == [b[1] for b in BAD]
    assert len(goods) == len(good)
    for got, want in zip(goods, want_scores, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert engine.is_alive()
