"""A packed forward equals every sequence run alone (fp32, CPU, tiny random models)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import packing_cy
from tests.factories import DECODERS, mixed_lengths, token_lists
from tests.worker._hf_reference import (
    hidden_states,
    load_reference,
    logits,
    next_token_logprobs,
    pool,
)
from worker import Engine, EngineConfig

BUDGET = 128  # lengths up to 70 -> many bins per step, several steps
TOL = 1e-4
KINDS = [*DECODERS, "bert"]


@pytest.fixture(scope="module")
def engines(tiny_model):
    cache = {}

    def get(kind):
        if kind not in cache:
            config = EngineConfig(model=str(tiny_model(kind)), max_num_batched_tokens=BUDGET)
            cache[kind] = (Engine(config), load_reference(tiny_model(kind), kind != "bert"))
        return cache[kind]

    yield get
    for engine, _ in cache.values():
        engine.shutdown()


def _packed_hidden(engine, lists):
    """Run the engine's staging + forward bin by bin; yield (sequence index, hidden rows)."""
    lengths = np.array([len(t) for t in lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.concatenate([np.asarray(t, np.int64) for t in lists])
    bins = packing_cy.pack(lengths, BUDGET, align=16)
    assert len(bins) >= 5
    with torch.inference_mode():
        for bin in bins:
            staged = engine.staging.stage(flat, offsets, bin)
            hidden = engine.runner.forward(staged)
            engine.staging.release(staged)
            cu = staged.host_cu_seqlens.tolist()
            for j, seq in enumerate(bin.tolist()):
                yield seq, hidden[cu[j]: cu[j + 1]]


@pytest.mark.parametrize("kind", KINDS)
def test_packed_hidden_states_and_logits_match_unpacked(kind, engines):
    engine, ref = engines(kind)
    lists = token_lists(mixed_lengths(), seed=3)
    seen = set()
    for seq, rows in _packed_hidden(engine, lists):
        seen.add(seq)
        np.testing.assert_allclose(rows.numpy(), hidden_states(ref, lists[seq]), atol=TOL, rtol=0)
        if kind != "bert":
            packed_logits = engine.runner.head(rows).numpy()
            np.testing.assert_allclose(packed_logits, logits(ref, lists[seq]), atol=TOL, rtol=0)
    assert seen == set(range(len(lists)))


@pytest.mark.parametrize("kind", DECODERS)
def test_score_matches_log_softmax_of_unpacked_logits(kind, engines):
    engine, ref = engines(kind)
    lists = token_lists(mixed_lengths(), seed=4)
    got = engine.score(lists)
    assert len(got) == len(lists)
    for ids, lp in zip(lists, got, strict=True):
        assert lp.dtype == np.float32 and lp.shape == (len(ids) - 1,)
        np.testing.assert_allclose(lp, next_token_logprobs(ref, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["mean", "last", "cls"])
def test_embed_pooling_matches_unpacked(kind, how, engines):
    engine, ref = engines(kind)
    lists = token_lists(mixed_lengths(), seed=5)
    got = engine.embed(lists, pooling=how)
    assert got.shape == (len(lists), 64) and got.dtype == np.float32
    want = np.stack([pool(hidden_states(ref, ids), how) for ids in lists])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_default_pooling_and_normalize(kind, engines):
    engine, ref = engines(kind)
    lists = token_lists([5, 33, 1, 64], seed=6)
    got = engine.embed(lists, normalize=True)
    how = "mean" if kind == "bert" else "last"
    want = np.stack([pool(hidden_states(ref, ids), how) for ids in lists])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_mixed_embed_and_score_in_one_step(engines):
    """Embed and score requests share bins: each gets its own output."""
    engine, ref = engines("qwen2")
    lists = token_lists(mixed_lengths(20), seed=7)

    async def main():
        futures = [engine.submit(ids, "score") if i % 2 else engine.submit(ids, pooling="mean")
                   for i, ids in enumerate(lists)]
        return await asyncio.gather(*futures)

    steps_before = engine.stats.num_steps
    outputs = asyncio.run(main())
    assert engine.stats.num_steps - steps_before < len(lists)  # requests shared steps
    for i, (ids, out) in enumerate(zip(lists, outputs, strict=True)):
        if i % 2:
            np.testing.assert_allclose(out, next_token_logprobs(ref, ids), atol=TOL, rtol=0)
        else:
            np.testing.assert_allclose(out, hidden_states(ref, ids).mean(0), atol=TOL, rtol=0)


def test_tolerance_detects_cross_sequence_attention(engines):
    """The same packed input with one segment spanning the bin (attention leaking across
    sequences) is far outside the tolerance: the equivalence tests can fail."""
    engine, ref = engines("llama")
    lists = token_lists([30, 30], seed=8)
    ids = torch.tensor([lists[0] + lists[1]])
    pos = torch.tensor([list(range(30)) * 2])
    one = torch.tensor([0, 60], dtype=torch.int32)
    with torch.inference_mode():
        leaked = engine.runner.base(input_ids=ids, position_ids=pos, use_cache=False,
                                    cu_seq_lens_q=one, cu_seq_lens_k=one, max_length_q=60,
                                    max_length_k=60).last_hidden_state[0, 30:].numpy()
    assert np.abs(leaked - hidden_states(ref, lists[1])).max() > 100 * TOL
