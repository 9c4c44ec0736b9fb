"""Batched step logprobs (``worker.generate.logprobs``) against the computations they
replace: the whole-batch ``log_softmax`` the sampler ran before (every row, any row
asking) and the per-sequence one (each row alone). Values must be equal, not close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.generate.sampling import Sampler, SamplingParams, SamplingRows, make_generator

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _whole_batch(logits: torch.Tensor, tokens: list[int], k_max: int):
    """The sampler's logprobs before: log_softmax over every row, then topk."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    if k_max == 0:
        return chosen.tolist(), [], []
    top = logprobs.topk(k_max, dim=-1)
    return chosen.tolist(), top.indices.tolist(), top.values.tolist()


def _per_sequence(row: torch.Tensor, token: int, k_max: int):
    """One sequence alone: its [1, vocab] logits."""
    logprobs = torch.log_softmax(row[None], dim=-1)[0]
    top = logprobs.topk(k_max)
    return float(logprobs[token]), top.indices.tolist(), top.values.tolist()


def _sample(device: str, params: list[SamplingParams], vocab: int, key: int):
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(key))
    logits = logits.to(device)
    state, rows = SamplingRows(64), np.arange(3, 3 + len(params), dtype=np.int64)
    for row, p in zip(rows, params, strict=True):
        state.set(int(row), p, make_generator(p, torch.device(device)))
    torch.manual_seed(key)
    return logits, Sampler(device, 64).sample_rows(logits, state, rows)


BATCHES = {
    "none_ask": [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=2)],
    "all_ask": [SamplingParams(temperature=0, logprobs=20),
                SamplingParams(temperature=1.0, seed=3, logprobs=5),
                SamplingParams(temperature=0.5, top_k=8, logprobs=0)],
    "one_of_many": [SamplingParams(temperature=0)] * 7 + [SamplingParams(logprobs=20, seed=4)]
    + [SamplingParams(temperature=0.8, top_p=0.9)] * 8,
    "greedy_subset": [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
                      SamplingParams(temperature=0, logprobs=0)],
    "k_zero_only": [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [50, 32000])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_step_logprobs_equal_the_whole_batch_and_per_sequence_values(batch, vocab, device):
    params = BATCHES[batch]
    logits, out = _sample(device, params, vocab, key=len(batch) + vocab)
    asking = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not asking:
        assert out.logprobs is None and out.top_ids == out.top_logprobs == []
        return
    k_max = max(params[i].logprobs for i in asking)
    chosen, top_ids, top_values = _whole_batch(logits, out.token_ids, k_max)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[i] is None
            assert not k_max or out.top_ids[i] == out.top_logprobs[i] == []
            continue
        assert out.logprobs[i] == chosen[i]
        alone = _per_sequence(logits[i], out.token_ids[i], k_max)
        assert out.logprobs[i] == alone[0]
        if k_max:
            assert out.top_ids[i] == top_ids[i] == alone[1]
            assert out.top_logprobs[i] == top_values[i] == alone[2]
    if not k_max:
        assert out.top_ids == out.top_logprobs == []


def test_tokens_are_unchanged_by_who_asks_for_logprobs():
    """The same logits and seeds sample the same tokens whether none, some or all rows
    ask (the asking rows' indices ride in the parameters' one copy)."""
    base = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7),
            SamplingParams(temperature=0.9, top_k=5, seed=8), SamplingParams(temperature=0)]
    tokens = []
    for ask in ((), (1,), (0, 3), (0, 1, 2, 3)):
        params = [SamplingParams(temperature=p.temperature, top_k=p.top_k, seed=p.seed,
                                 logprobs=4 if i in ask else None) for i, p in enumerate(base)]
        tokens.append(_sample("cpu", params, 300, key=5)[1].token_ids)
    assert all(t == tokens[0] for t in tokens)


@pytest.mark.gpu
def test_one_device_to_host_read_per_step_with_logprobs():
    params = [SamplingParams(temperature=0, logprobs=20), SamplingParams(top_k=3, seed=1),
              SamplingParams(temperature=0), SamplingParams(temperature=0.7, logprobs=2)]
    state, rows = SamplingRows(8), np.array([5, 1, 2, 7])
    for row, p in zip(rows, params, strict=True):
        state.set(int(row), p, make_generator(p, torch.device("cuda")))
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).cuda()
    sampler = Sampler(torch.device("cuda"), 8)
    sampler.sample_rows(logits, state, rows)  # warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sampler.sample_rows(logits, state, rows)
    names = [e.name for e in prof.events()]
    assert len([n for n in names if "HtoD" in n]) == 1, names
    assert len([n for n in names if "DtoH" in n]) == 1, names
