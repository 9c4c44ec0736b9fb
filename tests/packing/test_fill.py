"""packing_cy.fill against a plain per-token reference, plus its errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packing_cy import _ffd, _ffd_py, fill, pack


def reference_fill(seqs, bin, starts=None, counts=None):
    ids, pos, cu = [], [], [0]
    for i in bin:
        first = 0 if starts is None else starts[i]
        take = len(seqs[i]) - first if counts is None else counts[i]
        for t in range(take):
            ids.append(seqs[i][first + t])
            pos.append(first + t)
        cu.append(len(ids))
    return ids, pos, cu


def flatten(seqs):
    offsets = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    tokens = (
        np.concatenate([np.asarray(s, np.int64) for s in seqs]) if seqs else np.empty(0, np.int64)
    )
    return tokens, offsets


def buffers(tokens=4096, seqs=256):
    return np.full(tokens, -7, np.int64), np.full(tokens, -7, np.int64), np.full(seqs, -7, np.int32)


@st.composite
def fill_cases(draw):
    seqs = draw(
        st.lists(st.lists(st.integers(0, 50000), min_size=1, max_size=40), min_size=1, max_size=25)
    )
    bin = draw(st.lists(st.integers(0, len(seqs) - 1), unique=True, max_size=len(seqs)))
    chunked = draw(st.booleans())
    starts = counts = None
    if chunked:
        starts = [draw(st.integers(0, len(s) - 1)) for s in seqs]
        counts = [draw(st.integers(1, len(s) - f)) for s, f in zip(seqs, starts)]
    return seqs, bin, starts, counts


@settings(max_examples=300, deadline=None)
@given(fill_cases())
def test_fill_matches_reference(case):
    seqs, bin, starts, counts = case
    tokens, offsets = flatten(seqs)
    ids, pos, cu = buffers()
    kw = {}
    if starts is not None:
        kw = dict(starts=np.asarray(starts, np.int64), counts=np.asarray(counts, np.int64))
    num_tokens, max_len = fill(tokens, offsets, np.asarray(bin, np.int64), ids, pos, cu, **kw)
    ref_ids, ref_pos, ref_cu = reference_fill(seqs, bin, starts, counts)
    assert num_tokens == len(ref_ids)
    assert ids[:num_tokens].tolist() == ref_ids
    assert pos[:num_tokens].tolist() == ref_pos
    assert cu[: len(bin) + 1].tolist() == ref_cu
    assert max_len == max(np.diff(ref_cu), default=0)
    assert (ids[num_tokens:] == -7).all() and (
        cu[len(bin) + 1 :] == -7
    ).all()  # nothing else written


@settings(max_examples=150, deadline=None)
@given(fill_cases())
def test_fill_twins_identical(case):
    seqs, bin, starts, counts = case
    tokens, offsets = flatten(seqs)
    kw = {}
    if starts is not None:
        kw = dict(starts=np.asarray(starts, np.int64), counts=np.asarray(counts, np.int64))
    out = []
    for impl in (_ffd, _ffd_py):
        bufs = buffers()
        result = impl.fill(tokens, offsets, np.asarray(bin, np.int64), *bufs, **kw)
        out.append((result, [b.tolist() for b in bufs]))
    assert out[0] == out[1]


def test_fill_each_bin_of_a_packing():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 1000, n).tolist() for n in rng.integers(1, 300, 200)]
    tokens, offsets = flatten(seqs)
    ids, pos, cu = buffers(tokens=1024, seqs=64)
    for bin in pack(np.diff(offsets), 1024):
        num_tokens, _ = fill(tokens, offsets, bin, ids, pos, cu)
        assert ids[:num_tokens].tolist() == reference_fill(seqs, bin)[0]
        assert (
            pos[cu[1 : len(bin) + 1] - 1] == np.diff(offsets)[bin] - 1
        ).all()  # positions restart


def test_empty_bin():
    ids, pos, cu = buffers()
    assert fill(np.arange(3), np.array([0, 3]), np.empty(0, np.int64), ids, pos, cu) == (0, 0)
    assert cu[0] == 0


@pytest.mark.parametrize(
    "bin, kw, error, words",
    [
        ([0, 5], {}, ValueError, ["sequence 5", "2 sequences"]),
        (
            [1],
            dict(starts=np.array([0, 3]), counts=np.array([1, 2])),
            ValueError,
            ["sequence 1", "4 tokens", "take 2 from position 3"],
        ),
        (
            [0],
            dict(starts=np.array([0, 0]), counts=np.array([0, 1])),
            ValueError,
            ["sequence 0", "take 0"],
        ),
    ],
)
def test_fill_rejects_bad_slices(bin, kw, error, words):
    tokens, offsets = flatten([[1, 2, 3], [4, 5, 6, 7]])
    ids, pos, cu = buffers()
    with pytest.raises(error) as err:
        fill(tokens, offsets, np.asarray(bin, np.int64), ids, pos, cu, **kw)
    assert all(w in str(err.value) for w in words)


def test_fill_rejects_small_buffers_before_writing():
    tokens, offsets = flatten([[1] * 10, [2] * 10])
    ids, pos, cu = buffers(tokens=15)
    with pytest.raises(ValueError, match="needs 20 entries of input_ids but the buffer holds 15"):
        fill(tokens, offsets, np.array([0, 1]), ids, pos, cu)
    assert (ids == -7).all()
    with pytest.raises(ValueError, match="cu_seqlens"):
        fill(tokens, offsets, np.array([0, 1]), *buffers(seqs=2)[:2], np.empty(2, np.int32))


@pytest.mark.parametrize("which", ["input_ids", "position_ids", "cu_seqlens"])
def test_fill_rejects_wrong_dtype(which):
    tokens, offsets = flatten([[1, 2]])
    ids, pos, cu = buffers()
    bufs = dict(input_ids=ids, position_ids=pos, cu_seqlens=cu)
    bufs[which] = bufs[which].astype(np.float32)
    with pytest.raises(TypeError, match=which):
        fill(tokens, offsets, np.array([0]), **bufs)
