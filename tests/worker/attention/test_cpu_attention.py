"""The grouped CPU attention (worker/attention/cpu.py) against its definition, one SDPA
call per sequence (``reference_attention`` without groups): encoders, causal decoders,
sliding windows and GQA, over bins of mixed lengths; and the grouping itself (bounded
padding, every sequence in exactly one group, in order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.attention.cpu import MAX_GROUP, MAX_WASTE, SegmentGroups, _cuts
from worker.attention.packed import reference_attention


class _Module:
    def __init__(self, causal: bool):
        self.is_causal = causal


def _bin(lengths, heads=4, kv_heads=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = int(sum(lengths))
    # transformers' layout: [1, H, T, D] views of [1, T, H, D] projections
    q = torch.randn(1, total, heads, dim, generator=g).transpose(1, 2)
    k = torch.randn(1, total, kv_heads, dim, generator=g).transpose(1, 2)
    v = torch.randn(1, total, kv_heads, dim, generator=g).transpose(1, 2)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return q, k, v, cu


@pytest.mark.parametrize("causal, window, kv_heads", [
    (False, None, 4), (True, None, 4), (True, 24, 2), (False, 24, 4), (True, None, 1)])
def test_grouped_equals_one_call_per_sequence(causal, window, kv_heads):
    rng = np.random.default_rng(1)
    # FFD-like: longest first, with runs of close lengths, singles and a length-1 sequence
    lengths = sorted(rng.integers(1, 90, 40).tolist() + [1, 1, 2, 60, 60, 60], reverse=True)
    q, k, v, cu = _bin(lengths, kv_heads=kv_heads)
    kwargs = dict(scaling=0.3, sliding_window=window, cu_seq_lens_q=torch.from_numpy(cu))
    want, _ = reference_attention(_Module(causal), q, k, v, None, **kwargs)
    groups = SegmentGroups(cu, torch.device("cpu"))
    assert len(groups.groups) < len(lengths) // 2  # the point: far fewer SDPA calls
    got, _ = reference_attention(_Module(causal), q, k, v, None, packserve_groups=groups,
                                 **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_groups_cover_every_sequence_once_with_bounded_padding():
    rng = np.random.default_rng(2)
    for _ in range(50):
        lengths = rng.integers(1, 300, rng.integers(1, 200))
        cuts = _cuts(lengths)
        assert [i for i, _ in cuts] == [0] + [j for _, j in cuts[:-1]]  # contiguous, in order
        assert cuts[-1][1] == len(lengths)
        for i, j in cuts:
            part = lengths[i:j]
            assert j - i <= MAX_GROUP
            if j - i > 1:
                assert part.max() * len(part) <= (1 + MAX_WASTE) * part.sum()


def test_group_rows_map_back_to_token_order():
    lengths = [5, 4, 4, 3]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    (group,) = SegmentGroups(cu, torch.device("cpu")).groups
    assert (group.start, group.end, group.num_seqs, group.longest) == (0, 16, 4, 5)
    padded = group.rows.view(4, 5)
    assert padded[1].tolist() == [5, 6, 7, 8, 0]  # a pad points at the group's first row
    assert group.rows[group.valid_rows].tolist() == list(range(16))
