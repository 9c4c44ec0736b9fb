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


def test_registered_attention_dispatches_on_the_forward_context():
    """One registered function serves both paths: a forward inside a paged context goes
    to that context, a packed one gets its segments from ``PackedSegments``, a direct
    call keeps its kwargs; every layer call under a context is counted."""
    from worker.attention.context import PackedSegments, attention_context
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
    with attention_context(FakeContext()) as active:
        assert _dispatch(packed, None, 1, 2, 3, None, scaling=0.25) == ("paged", None)
        assert _dispatch(packed, None, 1, 2, 3, None, scaling=0.25) == ("paged", None)
    assert active.num_calls == 2
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with attention_context(PackedSegments(cu, 3)) as active:
        _dispatch(packed, None, 1, 2, 3, None, scaling=0.125)
    assert active.num_calls == 1
    assert packed_calls[0] == {"scaling": 0.5}
    assert paged_calls == [{"scaling": 0.25}] * 2
    assert packed_calls[1]["cu_seq_lens_q"] is cu and packed_calls[1]["max_length_q"] == 3
    assert packed_calls[1]["scaling"] == 0.125


def test_attention_refuses_keywords_it_does_not_implement():
    """A model asking its attention for something no backend computes (attention sinks,
    dropout in training) is refused, never silently ignored."""
    from worker.attention.packed import UnsupportedAttention, _dispatch

    def packed(*args, **kwargs):
        return "packed", None

    with pytest.raises(UnsupportedAttention, match="'s_aux'"):
        _dispatch(packed, None, 1, 2, 3, None, s_aux=torch.zeros(4))
    with pytest.raises(UnsupportedAttention, match="dropout 0.1"):
        _dispatch(packed, None, 1, 2, 3, None, dropout=0.1)
    assert _dispatch(packed, None, 1, 2, 3, None, dropout=0.0, softcap=30.0,
                     position_ids=None) == ("packed", None)


def test_cpu_selects_the_reference():
    assert pa.select_paged_backend("cpu", torch.bfloat16, 256) == "reference"
    assert pa.select_paged_backend("cuda", torch.float32, 256) == "reference"
