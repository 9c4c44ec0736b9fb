"""Paged attention (reference backend) against dense causal attention over whole
sequences, for random chunkings, block placements, GQA and sliding windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.worker.attention._paged_cases import dense_truth, random_sequences, run_chunked
from worker.attention import paged as pa
from worker.kv.block_manager import BlockManager

BLOCK = 4


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, None), (2, 5)])
def test_random_chunkings_match_dense_attention(seed, kv_heads, window):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=int(rng.integers(1, 6))).tolist()
    seqs = random_sequences(lengths, kv_heads, rng)
    scale = 0.37  # not 1/sqrt(d): the scale must be honoured
    outs = run_chunked(seqs, rng, window, scale, block_size=BLOCK)
    for (q, k, v), got in zip(seqs, outs):
        torch.testing.assert_close(got.double(), dense_truth(q, k, v, scale, window),
                                   atol=1e-5, rtol=1e-5)


def test_bottom_right_mask():
    mask = pa.bottom_right_mask(2, 5, None, "cpu")
    assert mask.tolist() == [[True, True, True, True, False], [True] * 5]
    windowed = pa.bottom_right_mask(2, 5, 2, "cpu")
    assert windowed.tolist() == [[False, False, True, True, False],
                                 [False, False, False, True, True]]
    assert pa.bottom_right_mask(1, 9, None, "cpu") is None
    assert pa.bottom_right_mask(6, 6, None, "cpu") is None


def test_context_slots_cover_each_context_in_order():
    bm = BlockManager(16, BLOCK, order=np.random.default_rng(3).permutation(16))
    for seq, n in [(0, 7), (1, 1), (2, 12)]:
        bm.allocate(seq, n)
    meta = pa.build_metadata([bm.block_table(s) for s in range(3)], [5, 0, 4], [2, 1, 8],
                             BLOCK, "cpu", with_context_slots=True)
    want = np.concatenate([bm.slot_mapping(s, 0, n) for s, n in [(0, 7), (1, 1), (2, 12)]])
    assert meta.context_slots.tolist() == want.tolist()
    assert meta.cu_seqlens_k.tolist() == [0, 7, 8, 20]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (8, 12)


def test_registered_attention_dispatches_on_the_paged_kwarg():
    """One registered function serves both paths: a forward carrying ``packserve_paged``
    goes to that context, any other runs the packed backend."""
    from worker.attention.packed import _dispatch

    packed_calls, paged_calls = [], []

    def packed(module, q, k, v, mask, **kwargs):
        packed_calls.append(kwargs)
        return "packed", None

    class FakeContext:
        def attend(self, module, q, k, v, mask, **kwargs):
            paged_calls.append(kwargs)
            return "paged", None

    assert _dispatch(packed, None, 1, 2, 3, None, scaling=0.5) == ("packed", None)
    assert _dispatch(packed, None, 1, 2, 3, None, scaling=0.25,
                     packserve_paged=FakeContext()) == ("paged", None)
    assert packed_calls == [{"scaling": 0.5}] and paged_calls == [{"scaling": 0.25}]


def test_cpu_selects_the_reference():
    assert pa.select_paged_backend("cpu", torch.bfloat16, 256) == "reference"
    assert pa.select_paged_backend("cuda", torch.float32, 256) == "reference"
