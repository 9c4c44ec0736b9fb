"""The Cython kernel and its pure-Python twin return identical results."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from packing_cy import _ffd, _ffd_py

from .test_pack import problems


@settings(max_examples=400, deadline=None)
@given(problems(max_n=200))
def test_pack_flat_identical(problem):
    lengths, budget, align, max_seqs = problem
    flat_c, off_c = _ffd.pack_flat(lengths, budget, align, max_seqs)
    flat_p, off_p = _ffd_py.pack_flat(lengths, budget, align, max_seqs)
    assert np.array_equal(flat_c, flat_p)
    assert np.array_equal(off_c, off_p)
    assert flat_c.dtype == flat_p.dtype == np.int64


def test_identical_on_large_skewed_input():
    rng = np.random.default_rng(3)
    lengths = np.clip(rng.lognormal(6, 1.3, 30000), 1, 16384).astype(np.int64)
    for max_seqs in (0, 64):
        c = _ffd.pack_flat(lengths, 16384, 16, max_seqs)
        p = _ffd_py.pack_flat(lengths, 16384, 16, max_seqs)
        assert np.array_equal(c[0], p[0]) and np.array_equal(c[1], p[1])


def test_identical_when_keys_exceed_counting_table():
    # budget // align above the counting-sort table size takes the argsort path.
    lengths = [5_000_000, 7, 4_999_999, 12]
    c = _ffd.pack_flat(lengths, 10_000_000, 1, 0)
    p = _ffd_py.pack_flat(lengths, 10_000_000, 1, 0)
    assert np.array_equal(c[0], p[0]) and np.array_equal(c[1], p[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 100), min_size=1, max_size=30), st.integers(1, 128))
def test_same_errors(lengths, budget):
    results = []
    for impl in (_ffd, _ffd_py):
        try:
            flat, offsets = impl.pack_flat(lengths, budget, 16, 0)
            results.append(("ok", flat.tolist(), offsets.tolist()))
        except ValueError as err:
            results.append(("error", str(err)))
    assert results[0] == results[1]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([1, 16, 17, 100, 250, 512]), max_size=300),
    st.sampled_from([512, 600, 1024]),
    st.sampled_from([0, 1, 2, 5]),
)
def test_identical_on_runs_of_equal_sizes(lengths, budget, max_seqs):
    """Few distinct sizes: the kernel places runs of equal items in one step."""
    c = _ffd.pack_flat(lengths, budget, 16, max_seqs)
    p = _ffd_py.pack_flat(lengths, budget, 16, max_seqs)
    assert np.array_equal(c[0], p[0]) and np.array_equal(c[1], p[1])
