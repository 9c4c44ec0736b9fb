"""The batched sampler: mixed batches, seeded rows beside any neighbours, persistent
``SamplingRows``, min-p, frequencies of the exponential race, and what it never does
(a sort per row, noise for greedy rows).

Statistical tests use fixed seeds and p = 0.001 thresholds, so they are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.generate.sampling import Sampler, SamplingParams, SamplingRows, make_generator

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
VOCAB = 40
CHI2_P001 = {2: 13.82, 3: 16.27, 4: 18.47}  # chi-square quantile 0.999 by degrees of freedom


def _logits(key: int, n: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(key))


def _allowed(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """The support ``p`` allows on ``row``, computed token by token (the definition)."""
    if p.greedy:
        return {int(row.argmax())}
    x = row.double() / p.temperature
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    keep = order if p.top_k == 0 else [i for i in order if x[i] >= x[order[p.top_k - 1]]]
    probs = torch.softmax(x[keep], -1).tolist()
    kept, mass = [], 0.0
    for i, q in zip(keep, probs, strict=True):
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += q
    best = max(float(x[i]) for i in kept)
    return {i for i in kept if float(torch.exp(x[i] - best)) >= p.min_p}


MIXED = [
    SamplingParams(temperature=0, logprobs=2),
    SamplingParams(temperature=1e-6, seed=1),  # below MIN_TEMPERATURE: greedy
    SamplingParams(temperature=3.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.6, seed=11),
    SamplingParams(temperature=2.0, min_p=0.5),
    SamplingParams(temperature=1.5, top_k=10, top_p=0.7, seed=12, logprobs=0),
    SamplingParams(temperature=1.0, seed=13),
    SamplingParams(temperature=0.7, top_k=5, min_p=0.2),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixed_batch_keeps_each_row_in_its_own_support(device):
    torch.manual_seed(0)
    logits = _logits(1, len(MIXED))
    state, rows = SamplingRows(16), np.array([9, 0, 15, 3, 4, 7, 12, 1])
    for row, p in zip(rows, MIXED, strict=True):
        state.set(int(row), p, make_generator(p, torch.device(device)))
    sampler = Sampler(torch.device(device), max_num_rows=16)
    seen = [set() for _ in MIXED]
    for _ in range(300):
        out = sampler.sample_rows(logits.to(device), state, rows)
        for i, token in enumerate(out.token_ids):
            seen[i].add(token)
    for i, p in enumerate(MIXED):
        allowed = _allowed(logits[i], p)
        assert seen[i] <= allowed, (i, p)
        assert (len(seen[i]) > 1) == (len(allowed) > 1), (i, seen[i], allowed)
        if p.greedy:
            assert seen[i] == {int(logits[i].argmax())}


def _run(params, logits_of, steps, device, order=None, neighbours=()):
    """Tokens per request over ``steps``, the batch laid out in ``order`` with extra
    ``neighbours`` (params) mixed in; each request keeps one state row throughout."""
    order = list(range(len(params))) if order is None else order
    batch = [("req", i) for i in order] + [("nb", j) for j in range(len(neighbours))]
    batch = batch[::2] + batch[1::2]  # neighbours land between requests
    state, sampler = SamplingRows(32), Sampler(torch.device(device), max_num_rows=4)
    rows = np.array([31 - k for k in range(len(batch))])
    for row, (kind, i) in zip(rows, batch, strict=True):
        p = params[i] if kind == "req" else neighbours[i]
        state.set(int(row), p, make_generator(p, torch.device(device)))
    tokens = {i: [] for i in range(len(params))}
    for step in range(steps):
        logits = torch.cat([logits_of(i, step) if kind == "req" else _logits(7000 + step + i)
                            for kind, i in batch]).to(device)
        out = sampler.sample_rows(logits, state, rows)
        for (kind, i), token in zip(batch, out.token_ids, strict=True):
            if kind == "req":
                tokens[i].append(token)
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_ignore_batch_order_and_neighbours(device):
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(top_k=4, seed=6),
              SamplingParams(temperature=2.0, top_p=0.8, seed=7),
              SamplingParams(min_p=0.1, top_p=0.9, seed=8)]

    def logits_of(i, step):
        return _logits(100 * i + step)

    together = _run(params, logits_of, 6, device)
    for i, p in enumerate(params):
        alone = _run([p], lambda _, step, i=i: logits_of(i, step), 6, device)[0]
        assert alone == together[i]
    neighbours = [SamplingParams(temperature=1.2), SamplingParams(top_p=0.5, seed=99),
                  SamplingParams(temperature=0), SamplingParams(min_p=0.3)] * 2
    assert _run(params, logits_of, 6, device, order=[3, 1, 0, 2],
                neighbours=neighbours) == together
    other_seed = [SamplingParams(temperature=1.0, seed=55)]
    assert _run(other_seed, logits_of, 6, device)[0] != together[0]


def test_a_seeded_generator_advances_only_when_its_row_draws():
    p = SamplingParams(temperature=1.0, seed=21)
    row = _logits(3)
    state, sampler = SamplingRows(4), Sampler()
    state.set(2, p, make_generator(p, torch.device("cpu")))
    state.set(0, SamplingParams(temperature=1.0), None)
    steady = [sampler.sample_rows(row, state, np.array([2])).token_ids[0] for _ in range(8)]
    state.set(2, p, make_generator(p, torch.device("cpu")))
    broken = []
    for step in range(16):  # every other step the row sits out (e.g. preempted)
        if step % 2:
            broken.append(sampler.sample_rows(row, state, np.array([2])).token_ids[0])
        else:
            sampler.sample_rows(row, state, np.array([0]))
    assert broken == steady


def test_sample_rows_equals_sample_with_the_same_params():
    params = MIXED + [SamplingParams(temperature=0.9, top_k=2, seed=30)]
    state, rows = SamplingRows(20), np.array([19, 2, 5, 11, 0, 7, 13, 4, 8])
    persistent = []
    for row, p in zip(rows, params, strict=True):
        state.set(int(row), p, make_generator(p, torch.device("cpu")))
    torch.manual_seed(4)
    sampler = Sampler(max_num_rows=20)
    for step in range(5):
        persistent.append(sampler.sample_rows(_logits(step, len(params)), state, rows))
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    torch.manual_seed(4)
    one_off = [Sampler().sample(_logits(step, len(params)), params, gens) for step in range(5)]
    assert persistent == one_off
    assert persistent[0].logprobs is not None and len(persistent[0].top_ids[0]) == 2


def test_cleared_rows_read_as_greedy_and_can_be_reused():
    state = SamplingRows(3)
    state.set(1, SamplingParams(temperature=2.0, top_k=3, min_p=0.2, logprobs=1, seed=3),
              torch.Generator().manual_seed(3))
    state.clear(1)
    assert (state.temperature[1], state.top_k[1], state.top_p[1], state.min_p[1],
            state.logprobs[1], state.seeded[1], state.generators[1]) == (0, 0, 1, 0, -1, False,
                                                                         None)
    logits = _logits(8)
    assert Sampler().sample_rows(logits, state, np.array([1])).token_ids == \
        [int(logits.argmax())]
    gen = torch.Generator().manual_seed(0)
    state.set(1, SamplingParams(temperature=0), gen)  # greedy rows keep no generator
    assert state.generators[1] is None and not state.seeded[1]


def test_min_p_keeps_tokens_within_a_factor_of_the_best():
    row = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]).log()
    seen = {Sampler().sample(row, [SamplingParams(min_p=0.3)], [None]).token_ids[0]
            for _ in range(300)}
    assert seen == {0, 1, 2}  # 0.15 >= 0.3 x 0.4 > 0.1
    p = SamplingParams(min_p=1.0, seed=2)
    assert Sampler().sample(row, [p], [make_generator(p, torch.device("cpu"))]).token_ids == [0]


def _chi2(tokens: list[int], want: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(want)).double()
    expected = want.double() * len(tokens)
    assert counts[expected == 0].sum() == 0, "a token outside the support was drawn"
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_top_k_with_temperature_follows_the_tempered_top_k():
    row = torch.tensor([1.0, 0.2, 2.0, -1.0, 0.5, 1.5])
    n, temperature = 6000, 0.8
    params = [SamplingParams(temperature=temperature, top_k=3, seed=(i if i % 2 else None))
              for i in range(n)]  # half seeded (own generators), half on the shared noise
    torch.manual_seed(1)
    out = Sampler().sample(row.expand(n, -1), params,
                           [make_generator(p, torch.device("cpu")) for p in params])
    want = torch.zeros(6)
    want[[2, 5, 0]] = torch.softmax(row[[2, 5, 0]] / temperature, -1)
    assert _chi2(out.token_ids[0::2], want) < CHI2_P001[2]
    assert _chi2(out.token_ids[1::2], want) < CHI2_P001[2]


def test_the_exponential_race_on_an_unseeded_row_follows_softmax():
    row = torch.tensor([[0.0, 1.0, 2.0, 0.5, -0.5]])
    p, sampler = SamplingParams(temperature=1.3), Sampler()
    torch.manual_seed(2)
    tokens = [sampler.sample(row, [p], [None]).token_ids[0] for _ in range(4000)]
    assert _chi2(tokens, torch.softmax(row[0] / 1.3, -1)) < CHI2_P001[4]


def test_min_p_frequencies_follow_the_renormalised_rest():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    n = 6000
    torch.manual_seed(3)
    out = Sampler().sample(probs.log().expand(n, -1), [SamplingParams(min_p=0.3)] * n, [None] * n)
    want = torch.tensor([0.4, 0.3, 0.15, 0.0, 0.0]) / 0.85
    assert _chi2(out.token_ids, want) < CHI2_P001[2]


def test_top_p_is_one_batched_sort_and_top_k_alone_sorts_nothing(monkeypatch):
    sorts = []
    real_sort, real_method = torch.sort, torch.Tensor.sort

    def count(real):
        def sort(*args, **kwargs):
            sorts.append(args[0].shape)
            return real(*args, **kwargs)
        return sort

    monkeypatch.setattr(torch, "sort", count(real_sort))
    monkeypatch.setattr(torch.Tensor, "sort", count(real_method))
    monkeypatch.setattr(torch, "multinomial", None)  # the race replaced it
    top_p = [SamplingParams(top_p=0.5 + 0.05 * i, seed=i) for i in range(6)]
    others = [SamplingParams(top_k=3), SamplingParams(temperature=0), SamplingParams()]
    params = top_p + others + [SamplingParams(top_k=5, top_p=0.9)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    sampler = Sampler()
    for step in range(3):
        sampler.sample(_logits(step, len(params)), params, gens)
    assert sorts == [(7, VOCAB)] * 3  # only the 7 rows with top_p < 1, once per step
    sorts.clear()
    top_k_only = [SamplingParams(top_k=k, seed=k) for k in range(1, 9)]
    sampler.sample(_logits(9, 8), top_k_only, [make_generator(p, "cpu") for p in top_k_only])
    assert sorts == []


def test_an_all_greedy_batch_draws_no_noise(monkeypatch):
    def no_noise(*args, **kwargs):
        raise AssertionError("noise drawn for a greedy batch")

    params = [SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=1e-7),
              SamplingParams(temperature=0, seed=4)]
    logits = _logits(5, 3)
    rng = torch.get_rng_state()
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "exponential_", no_noise)
        out = Sampler().sample(logits, params, [None, torch.Generator(), None])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert torch.equal(torch.get_rng_state(), rng)


def test_seeded_rows_leave_the_shared_generator_alone():
    params = [SamplingParams(temperature=1.0, seed=i, top_k=4) for i in range(3)]
    rng = torch.get_rng_state()
    Sampler().sample(_logits(6, 3), params, [make_generator(p, "cpu") for p in params])
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_step_larger_than_max_num_rows_still_samples():
    params = [SamplingParams(top_k=2, top_p=0.9, min_p=0.1, seed=i) for i in range(10)]
    logits = _logits(7, 10)
    out = Sampler(max_num_rows=2).sample(logits, params,
                                         [make_generator(p, "cpu") for p in params])
    for i, token in enumerate(out.token_ids):
        assert token in _allowed(logits[i], params[i])


def test_rows_and_logits_must_agree():
    with pytest.raises(ValueError, match="3 rows of logits for 2 state rows"):
        Sampler().sample_rows(_logits(0, 3), SamplingRows(4), np.array([0, 1]))


@pytest.mark.gpu
def test_one_host_to_device_copy_per_step():
    params = [SamplingParams(top_k=3, top_p=0.8, min_p=0.1, seed=1), SamplingParams(),
              SamplingParams(temperature=0)]
    state, rows = SamplingRows(8), np.array([5, 1, 2])
    for row, p in zip(rows, params, strict=True):
        state.set(int(row), p, make_generator(p, torch.device("cuda")))
    sampler, logits = Sampler(torch.device("cuda"), 8), _logits(0, 3).cuda()
    sampler.sample_rows(logits, state, rows)  # warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sampler.sample_rows(logits, state, rows)
    copies = [e for e in prof.events() if "HtoD" in e.name]
    assert len(copies) == 1, [e.name for e in copies]
