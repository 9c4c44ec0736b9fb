"""Speculative decoding on a GPU (skipped without CUDA): with the Triton paged kernel and
CUDA graphs on (speculative steps run eager, plain decode steps replay graphs), greedy
output agrees with the engine without speculation, both methods, and the draft's cache
sits beside the target's in the memory plan. Written on CPU; never run on a GPU yet."""

from __future__ import annotations

import pytest

from tests.factories import mixed_lengths, token_lists
from worker.generate.sampling import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ([t * 4 for t in token_lists([5, 9, 13, 21], seed=12)]
           + token_lists(mixed_lengths(n=28, longest=100, seed=13), seed=14))
BASE = dict(device="cuda", dtype="float16", max_num_batched_tokens=512,
            max_num_running_seqs=32, max_prefill_chunk=128)
UNLOADED = {"adaptive": False}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_agrees_with_no_speculation_on_the_fast_path(tiny_model, make_engine, method):
    """fp16 (the Triton kernel's dtypes): a multi-token verify against a one-token graph
    replay rounds differently and may flip a near-tie, so >= 90% of the sequences
    identical, as the fast path's own test allows; and speculation ran."""
    path = tiny_model("llama")
    spec = {"method": method, "num_speculative_tokens": 3, **UNLOADED}
    if method == "draft":
        spec["model"] = str(path)  # the target as its own draft: every proposal accepted
    fast = make_engine(path, **BASE, speculative=spec)
    base = make_engine(path, **BASE)
    got = fast.generate(PROMPTS, GREEDY)
    want = base.generate(PROMPTS, GREEDY)
    same = sum(a.token_ids == b.token_ids for a, b in zip(got, want)) / len(PROMPTS)
    assert same >= 0.9, same
    gen = fast.generation
    assert gen.backend == "triton"
    assert fast.stats.spec_num_accepted > 0
    if method == "draft":
        assert gen.draft.cache.num_bytes > 0
        assert fast.stats.num_steps < base.stats.num_steps
