"""SamplingParams validation and the sampler: greedy, seeded, top-k/top-p, logprobs.

The batched paths (mixed batches, min-p, persistent rows) are in test_sampler_batched.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from worker.generate.sampling import (
    InvalidSamplingParamsError,
    Sampler,
    SamplingParams,
    make_generator,
)

BAD = [
    ("max_tokens", 0), ("max_tokens", 2.0), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 1.5),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("nan")), ("min_p", "0.1"),
    ("seed", -3), ("logprobs", 21), ("logprobs", -1),
    ("stop", [""]), ("stop", [3]), ("stop", 5), ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]), ("stop_token_ids", 7), ("ignore_eos", 1),
]


@pytest.mark.parametrize("field,value", BAD)
def test_invalid_params_name_the_field_and_value(field, value):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert f"SamplingParams.{field}" in str(info.value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)  # the HTTP layer maps these to 4xx


def test_lists_become_tuples_and_a_single_stop_string_is_one_stop():
    p = SamplingParams(stop="END", stop_token_ids=[4, 5])
    assert p.stop == ("END",) and p.stop_token_ids == (4, 5)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    hash(p)  # frozen and hashable


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler().sample(logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def _draws(logits_row, params, n_steps, neighbours=0, seed_offset=0):
    """Sample ``n_steps`` tokens for one request, optionally beside other random rows."""
    gen = make_generator(params, torch.device("cpu"))
    others = [SamplingParams(temperature=1.3, seed=99 + i + seed_offset) for i in range(neighbours)]
    other_gens = [make_generator(p, torch.device("cpu")) for p in others]
    noise = torch.Generator().manual_seed(7 + seed_offset)
    tokens = []
    for _ in range(n_steps):
        rows = [logits_row] + [torch.randn(logits_row.shape, generator=noise) for _ in others]
        out = Sampler().sample(torch.stack(rows), [params] + others, [gen] + other_gens)
        tokens.append(out.token_ids[0])
    return tokens


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    row = torch.randn(64, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=1234)
    alone = _draws(row, p, 40)
    assert alone == _draws(row, p, 40)
    assert alone == _draws(row, p, 40, neighbours=3)
    assert alone == _draws(row, p, 40, neighbours=5, seed_offset=11)
    assert alone != _draws(row, SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=4321),
                           40)


def test_unseeded_requests_draw_different_streams():
    row = torch.zeros(1000)  # uniform: two independent streams of 20 agree with p = 1e-60
    p = SamplingParams(temperature=1.0)
    assert _draws(row, p, 20) != _draws(row, p, 20)


def test_only_seeded_sampling_requests_get_a_generator():
    cpu = torch.device("cpu")
    assert make_generator(SamplingParams(temperature=0), cpu) is None
    assert make_generator(SamplingParams(temperature=0, seed=3), cpu) is None
    assert make_generator(SamplingParams(temperature=1e-6, seed=3), cpu) is None  # greedy
    assert make_generator(SamplingParams(temperature=1.0), cpu) is None  # shared noise
    assert make_generator(SamplingParams(temperature=1.0, seed=3), cpu) is not None


def test_top_k_limits_the_support():
    row = torch.randn(100, generator=torch.Generator().manual_seed(2))
    allowed = set(row.topk(3).indices.tolist())
    p = SamplingParams(temperature=5.0, top_k=3, seed=0)  # hot: without top_k, anything goes
    assert set(_draws(row, p, 200)) <= allowed
    assert _draws(row, SamplingParams(temperature=5.0, top_k=1, seed=3), 20) == \
        [int(row.argmax())] * 20


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    row = probs.log()
    p = SamplingParams(temperature=1.0, top_p=0.75, seed=5)  # needs {0, 1}: 0.5 < 0.75 <= 0.8
    assert set(_draws(row, p, 300)) == {0, 1}
    assert set(_draws(row, SamplingParams(top_p=0.01, seed=5), 50)) == {0}


def test_frequencies_follow_the_tempered_distribution():
    row = torch.tensor([0.0, 1.0, 2.0, 0.5])
    temperature, n = 2.0, 4000
    counts = torch.bincount(torch.tensor(_draws(row, SamplingParams(temperature=temperature,
                                                                    seed=8), n)), minlength=4)
    want = torch.softmax(row / temperature, -1) * n
    chi2 = float(((counts - want) ** 2 / want).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_logprobs_are_the_raw_distribution_with_top_k():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, seed=1, logprobs=0)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    out = Sampler().sample(logits, params, gens)
    ref = torch.log_softmax(logits, -1)
    for i in (0, 2):  # the rows that asked; the row that did not gets none
        assert math.isclose(out.logprobs[i], float(ref[i, out.token_ids[i]]), rel_tol=1e-6)
    assert out.logprobs[1] is None and out.top_ids[1] == out.top_logprobs[1] == []
    top = ref[[0, 2]].topk(2, -1)
    assert [out.top_ids[0], out.top_ids[2]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([out.top_logprobs[0], out.top_logprobs[2]]),
                               top.values)
