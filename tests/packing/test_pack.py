"""packing_cy.pack: FFD properties, edge cases and errors.

Runs against whichever implementation ``packing_cy`` selected; `make test` runs this
folder twice, the second time with PACKSERVE_PURE_PYTHON=1.
"""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packing_cy
from packing_cy import lower_bound, pack


def aligned(lengths, align):
    return [-(-x // align) * align for x in lengths]


def naive_ffd(lengths, budget, align, max_seqs):
    """The definition, spelled out: O(n * bins) first fit over the decreasing order."""
    sizes = aligned(lengths, align)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins, loads = [], []
    for i in order:
        for b in range(len(bins)):
            if loads[b] + sizes[i] <= budget and (max_seqs == 0 or len(bins[b]) < max_seqs):
                bins[b].append(i)
                loads[b] += sizes[i]
                break
        else:
            bins.append([i])
            loads.append(sizes[i])
    return bins


@st.composite
def problems(draw, max_n=80):
    align = draw(st.sampled_from([1, 2, 3, 8, 16, 64]))
    budget = draw(st.integers(min_value=align, max_value=2048))
    max_len = budget // align * align  # largest length whose aligned size fits
    lengths = draw(st.lists(st.integers(1, max_len), max_size=max_n))
    max_seqs = draw(st.sampled_from([0, 0, 1, 2, 3, 7]))
    return lengths, budget, align, max_seqs


@settings(max_examples=300, deadline=None)
@given(problems())
def test_properties(problem):
    lengths, budget, align, max_seqs = problem
    bins = pack(lengths, budget, align=align, max_seqs=max_seqs)
    sizes = aligned(lengths, align)

    flat = np.concatenate(bins) if bins else np.empty(0, np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every index exactly once
    for b in bins:
        assert b.dtype == np.int64 and b.size > 0
        assert sum(sizes[i] for i in b) <= budget
        if max_seqs:
            assert b.size <= max_seqs
    assert len(bins) >= lower_bound(lengths, budget, align=align)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_replay_matches_first_fit_decreasing(problem):
    """Replaying the placement: no item could have gone into an earlier bin."""
    lengths, budget, align, max_seqs = problem
    got = [b.tolist() for b in pack(lengths, budget, align=align, max_seqs=max_seqs)]
    assert got == naive_ffd(lengths, budget, align, max_seqs)


def test_deterministic_and_input_untouched():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 3000, 5000)
    before = lengths.copy()
    first = pack(lengths, 8192)
    second = pack(lengths, 8192)
    assert len(first) == len(second)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert np.array_equal(lengths, before)


def test_ties_go_lower_index_first():
    # Four items of aligned size 16 and budget 32: pairs by index.
    assert [b.tolist() for b in pack([3, 16, 9, 1], 32)] == [[0, 1], [2, 3]]
    # Longest first, whatever its position.
    assert [b.tolist() for b in pack([5, 40, 17], 48)] == [[1], [2, 0]]


def test_empty_input():
    assert pack([], 16) == []
    assert pack(np.empty(0, np.int32), 16) == []


def test_one_item_equal_to_budget():
    assert [b.tolist() for b in pack([64], 64)] == [[0]]
    assert [b.tolist() for b in pack([64, 64, 1], 64, align=1)] == [[0], [1], [2]]


def test_align_one_packs_exact_lengths():
    bins = pack([5, 3, 2, 7, 1], 8, align=1)
    assert [b.tolist() for b in bins] == [[3, 4], [0, 1], [2]]


def test_max_seqs_caps_bins():
    bins = pack([1] * 10, 1024, max_seqs=3)
    assert [b.size for b in bins] == [3, 3, 3, 1]


def test_accepts_python_lists_and_int32():
    a = pack([100, 20, 300], 512)
    b = pack(np.asarray([100, 20, 300], np.int32), 512)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


@pytest.mark.parametrize(
    "lengths, budget, align, words",
    [
        ([4, 0, 2], 32, 16, ["sequence 1", "length 0"]),
        ([4, -3], 32, 16, ["sequence 1", "length -3"]),
        ([10, 33], 32, 16, ["sequence 1", "length 33", "48", "budget 32"]),
        ([40], 32, 1, ["sequence 0", "length 40", "budget 32"]),
    ],
)
def test_bad_lengths_name_index_length_and_budget(lengths, budget, align, words):
    with pytest.raises(ValueError) as err:
        pack(lengths, budget, align=align)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(budget=0), ["budget", "0"]),
        (dict(budget=64, align=0), ["align", "0"]),
        (dict(budget=64, max_seqs=-1), ["max_seqs", "-1"]),
    ],
)
def test_bad_parameters(kwargs, words):
    budget = kwargs.pop("budget")
    with pytest.raises(ValueError) as err:
        pack([1, 2], budget, **kwargs)
    assert all(w in str(err.value) for w in words)


def test_two_dimensional_lengths_rejected():
    with pytest.raises(ValueError, match="one-dimensional"):
        pack([[1, 2]], 64)


def test_near_lower_bound_on_many_small_items():
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 600, 20000)
    bins = pack(lengths, 16384)
    assert len(bins) <= 1.01 * lower_bound(lengths, 16384)


def test_selected_implementation():
    forced = os.environ.get("PACKSERVE_PURE_PYTHON", "") not in ("", "0")
    assert packing_cy.IMPLEMENTATION == ("python" if forced else "cython")
