"""The grouped CPU attention (worker/attention/cpu.py) against its definition, one SDPA
call per sequence (``reference_attention`` without groups): encoders, causal decoders,
sliding windows and GQA, over bins of mixed lengths; the grouping itself (bounded
padding, every sequence in exactly one group, in order); and the causal rule (a sequence
longer than ``MAX_CAUSAL_LEN`` runs alone, causal groups run SDPA's ``is_causal`` kernel
without a mask, encoders group as before)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.attention import cpu
from worker.attention.cpu import (LEGACY_RULE, MAX_CAUSAL_LEN, MAX_GROUP, MAX_WASTE,
                                  SegmentGroups, _cuts)
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
    groups = SegmentGroups(cu, torch.device("cpu"), causal=causal)
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


def _mixed_lengths(seed=3):
    """FFD-like: long sequences (some of equal length) above short ones, longest first."""
    rng = np.random.default_rng(seed)
    long = rng.integers(MAX_CAUSAL_LEN + 1, 3 * MAX_CAUSAL_LEN, 8).tolist() + [200, 200, 200]
    return sorted(long + rng.integers(1, MAX_CAUSAL_LEN + 1, 40).tolist(), reverse=True)


def _sdpa_calls(monkeypatch) -> list[dict]:
    """Record every SDPA call of worker.attention.cpu: its batch, mask and is_causal."""
    calls = []

    def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
        calls.append({"batch": q.shape[0], "length": q.shape[2], "is_causal": is_causal,
                      "mask": None if attn_mask is None else tuple(attn_mask.shape)})
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              is_causal=is_causal, scale=scale)

    monkeypatch.setattr(cpu, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    return calls


def test_long_causal_sequences_run_alone_and_encoders_group_as_before():
    lengths = np.array(_mixed_lengths())
    cu = np.concatenate([[0], np.cumsum(lengths)])
    causal = SegmentGroups(cu, torch.device("cpu"), causal=True).groups
    for g in causal:
        if g.longest > MAX_CAUSAL_LEN:
            assert g.num_seqs == 1 and g.rows is None
    short = int((lengths <= MAX_CAUSAL_LEN).sum())
    assert sum(g.longest <= MAX_CAUSAL_LEN for g in causal) < short // 2  # short ones group
    encoder = SegmentGroups(cu, torch.device("cpu"), causal=False).groups
    assert [(g.start, g.end) for g in encoder] == [(int(cu[i]), int(cu[j]))
                                                  for i, j in _cuts(lengths)]
    assert any(g.num_seqs > 1 and g.longest > MAX_CAUSAL_LEN for g in encoder)
    legacy = SegmentGroups(cu, torch.device("cpu"), causal=True, rule=LEGACY_RULE).groups
    assert [(g.start, g.end) for g in legacy] == [(g.start, g.end) for g in encoder]


@pytest.mark.parametrize("causal, window", [(True, None), (True, 1000), (True, 24),
                                            (False, None), (False, 24)])
@pytest.mark.parametrize("legacy", [False, True])
def test_causal_rule_equals_one_call_per_sequence(causal, window, legacy):
    lengths = _mixed_lengths()
    q, k, v, cu = _bin(lengths, kv_heads=2)
    kwargs = dict(scaling=0.3, sliding_window=window, cu_seq_lens_q=torch.from_numpy(cu))
    want, _ = reference_attention(_Module(causal), q, k, v, None, **kwargs)
    groups = SegmentGroups(cu, torch.device("cpu"), causal=causal,
                           rule=LEGACY_RULE if legacy else None)
    got, _ = reference_attention(_Module(causal), q, k, v, None, packserve_groups=groups,
                                 **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_groups_run_is_causal_without_a_mask(monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    lengths = _mixed_lengths()
    q, k, v, cu = _bin(lengths)
    groups = SegmentGroups(cu, torch.device("cpu"), causal=True)
    cpu.grouped_attention(groups, q, k, v, scaling=0.3, causal=True, sliding_window=None)
    assert len(calls) == len(groups.groups)
    assert all(c["is_causal"] and c["mask"] is None for c in calls)
    assert any(c["batch"] > 1 for c in calls)
    assert all(c["batch"] == 1 for c in calls if c["length"] > MAX_CAUSAL_LEN)


def test_window_masks_only_groups_it_binds_and_legacy_masks_every_group(monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    q, k, v, cu = _bin(_mixed_lengths())
    groups = SegmentGroups(cu, torch.device("cpu"), causal=True)
    cpu.grouped_attention(groups, q, k, v, scaling=0.3, causal=True, sliding_window=24)
    grouped = [c for c in calls if c["batch"] > 1]
    assert all((c["mask"] is None) == (c["length"] <= 24) for c in grouped)
    assert all(c["is_causal"] == (c["mask"] is None) for c in grouped)
    calls.clear()
    legacy = SegmentGroups(cu, torch.device("cpu"), causal=True, rule=LEGACY_RULE)
    cpu.grouped_attention(legacy, q, k, v, scaling=0.3, causal=True, sliding_window=None)
    assert all(c["mask"] == (c["batch"], 1, c["length"], c["length"])
               for c in calls if c["batch"] > 1)


def test_encoder_groups_mask_padded_keys_only(monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    q, k, v, cu = _bin(_mixed_lengths())
    groups = SegmentGroups(cu, torch.device("cpu"), causal=False)
    cpu.grouped_attention(groups, q, k, v, scaling=0.3, causal=False, sliding_window=None)
    grouped = [c for c in calls if c["batch"] > 1]
    assert grouped and all(c["mask"] == (c["batch"], 1, 1, c["length"]) and not c["is_causal"]
                           for c in grouped)
