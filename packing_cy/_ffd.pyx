# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled first-fit-decreasing packer. ``_ffd_py.py`` is its readable twin.

Same algorithm and output as the twin; two changes for speed, neither visible in the
result:
- the descending sort is a stable counting sort on ``aligned // align`` (at most
  ``budget // align`` keys), O(n), instead of a comparison sort;
- the segment tree and the bin grouping run in C loops over typed memoryviews.
"""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t

cnp.import_array()

from ._checks import (
    as_lengths,
    bad_index,
    bad_length,
    bad_slice,
    bin_bound,
    check_fill_outputs,
    check_params,
    fill_overflow,
)

# Above this many distinct keys the counting sort's table costs more than it saves.
cdef int64_t MAX_COUNTING_KEYS = 1 << 22


cdef void _descending_order(
    const int64_t[::1] keys, int64_t max_key, int64_t[::1] start, int64_t[::1] order,
) noexcept nogil:
    """Stable counting sort of item indices by key, largest key first.

    ``start`` is zeroed scratch of ``max_key + 1`` entries.
    """
    cdef Py_ssize_t n = keys.shape[0], i
    cdef int64_t k, pos = 0, c
    for i in range(n):
        start[keys[i]] += 1
    k = max_key
    while k >= 0:
        c = start[k]
        start[k] = pos
        pos += c
        k -= 1
    for i in range(n):
        order[start[keys[i]]] = i
        start[keys[i]] += 1


cdef extern from *:
    int __builtin_ctz(unsigned int x) nogil

# The tree is 8-ary: the 8 children of a node are contiguous int32 (32 bytes, within one
# cache line), so a walk is 6 levels for 262,144 bins instead of 18 for a binary tree,
# and each level is a branch-free compare of 8 values.
cdef enum:
    ARITY = 8
    LEVEL_ALIGN = 16  # each level starts on a 64-byte boundary of int32s


cdef class _Tree:
    """Level offsets of an 8-ary max tree with at least ``num_leaves`` leaves.

    ======  =========================  ===============================
    level   nodes                      children of node j (level l)
    ======  =========================  ===============================
    0       1 (root)                   offsets[l + 1] + 8 * j + 0..7
    depth   8 ** depth >= num_leaves   (leaves: leaf b is bin b)
    ======  =========================  ===============================
    """

    cdef public int depth
    cdef int64_t offsets[24]
    cdef public int64_t size
    cdef public int64_t num_leaves

    def __cinit__(self, int64_t num_leaves):
        cdef int64_t width = 1, pos = 0
        self.depth = 0
        while True:
            self.offsets[self.depth] = pos
            pos += (width + LEVEL_ALIGN - 1) // LEVEL_ALIGN * LEVEL_ALIGN
            if width >= num_leaves:
                break
            width *= ARITY
            self.depth += 1
        self.size = pos
        self.num_leaves = width


cdef int64_t _place_all(
    const int64_t[::1] keys, const int64_t[::1] order, int64_t max_seqs,
    _Tree shape, int32_t[::1] tree, int32_t[::1] seqs_in_bin, int64_t[::1] bin_of,
) except -1 nogil:
    """Run first fit over ``order``; write each placed item's bin; return the bin count.

    Capacities are counted in units of ``align`` (an item of aligned length ``a`` fits a
    budget ``B`` exactly when ``a // align <= B // align``), which keeps the tree in
    int32. ``tree`` (``shape.size`` entries, all ``budget // align``) and
    ``seqs_in_bin`` (zeroed) are scratch.
    """
    cdef Py_ssize_t j = 0, run, n = order.shape[0]
    cdef int depth = shape.depth, level, c
    cdef int64_t b, num_bins = 0, node, base, leaf, count
    cdef int32_t need, best, value, room
    cdef unsigned int fits
    while j < n:
        need = <int32_t> keys[order[j]]
        # Down: the leftmost child whose subtree has room (the parent says one has).
        node = 0
        for level in range(1, depth + 1):
            base = shape.offsets[level] + ARITY * node
            fits = 0
            for c in range(ARITY):
                fits |= (tree[base + c] >= need) << c
            node = ARITY * node + __builtin_ctz(fits)
        b = node
        leaf = shape.offsets[depth] + b
        # The next items of the same size go to this bin too while it fits them: every
        # bin to its left had too little room (or no free slot) for this size and has not
        # changed. So a run is placed with one tree update instead of one per item.
        room = tree[leaf] - need
        count = seqs_in_bin[b] + 1
        run = 1
        while (j + run < n and room >= need and count != max_seqs
               and keys[order[j + run]] == need):
            room -= need
            count += 1
            run += 1
        seqs_in_bin[b] = <int32_t> count
        tree[leaf] = -1 if count == max_seqs else room
        for c in range(run):
            bin_of[j + c] = b
        j += run
        if b + 1 > num_bins:
            num_bins = b + 1
        # Up: refresh each ancestor's max; stop once one is unchanged.
        level = depth - 1
        while level >= 0:
            node //= ARITY
            base = shape.offsets[level + 1] + ARITY * node
            best = tree[base]
            for c in range(1, ARITY):
                value = tree[base + c]
                if value > best:
                    best = value
            if tree[shape.offsets[level] + node] == best:
                break
            tree[shape.offsets[level] + node] = best
            level -= 1
    return num_bins


def pack_flat(lengths, int64_t budget, int64_t align=16, int64_t max_seqs=0):
    """FFD packing; bin ``b`` is ``flat[offsets[b]:offsets[b + 1]]`` (see ``packing_cy.pack``)."""
    arr = as_lengths(lengths)
    check_params(budget, align, max_seqs)
    cdef Py_ssize_t n = arr.shape[0], i, j
    if n == 0:
        return np.empty(0, np.int64), np.zeros(1, np.int64)
    cdef const int64_t[::1] lens = arr
    keys_arr = np.empty(n, np.int64)
    cdef int64_t[::1] keys = keys_arr
    cdef int64_t length, key, max_key = budget // align, total = 0, shift = 0
    cdef bint pow2 = (align & (align - 1)) == 0
    while pow2 and (1 << shift) < align:
        shift += 1
    for i in range(n):
        length = lens[i]
        key = (length + align - 1) >> shift if pow2 else (length + align - 1) // align
        if length <= 0 or key > max_key:
            raise bad_length(i, length, align, budget)
        keys[i] = key
        total += key

    order_arr = np.empty(n, np.int64)
    cdef int64_t[::1] order = order_arr
    cdef int64_t[::1] start
    if max_key <= MAX_COUNTING_KEYS:
        start = np.zeros(max_key + 1, np.int64)
        with nogil:
            _descending_order(keys, max_key, start, order)
    else:
        order_arr[:] = np.argsort(-keys_arr, kind="stable")

    bin_of_arr = np.empty(n, np.int64)
    cdef int64_t[::1] bin_of = bin_of_arr
    if max_key > 2**31 - 1:
        raise ValueError(f"budget // align must be below 2**31, got {max_key}")
    cdef _Tree shape = _Tree(bin_bound(total * align, budget, n, max_seqs))
    cdef int32_t[::1] tree = np.full(shape.size, max_key, np.int32)
    cdef int32_t[::1] seqs_in_bin = np.zeros(shape.num_leaves, np.int32)
    cdef int64_t num_bins
    with nogil:
        num_bins = _place_all(keys, order, max_seqs, shape, tree, seqs_in_bin, bin_of)

    offsets_arr = np.zeros(num_bins + 1, np.int64)
    flat_arr = np.empty(n, np.int64)
    cdef int64_t[::1] offsets = offsets_arr
    cdef int64_t[::1] flat = flat_arr
    with nogil:
        for j in range(num_bins):  # seqs_in_bin holds each bin's final item count
            offsets[j + 1] = offsets[j] + seqs_in_bin[j]
        # Scatter in placement order, using offsets[b] as bin b's cursor, then shift back.
        for j in range(n):
            flat[offsets[bin_of[j]]] = order[j]
            offsets[bin_of[j]] += 1
        j = num_bins
        while j > 0:
            offsets[j] = offsets[j - 1]
            j -= 1
        offsets[0] = 0
    return flat_arr, offsets_arr


def fill(token_ids, offsets, bin, input_ids, position_ids, cu_seqlens, *, starts=None, counts=None):
    """Write one packed bin into caller-given buffers (see ``packing_cy.fill``)."""
    check_fill_outputs(input_ids, position_ids, cu_seqlens)
    cdef const int64_t[::1] tok = np.ascontiguousarray(token_ids, dtype=np.int64)
    cdef const int64_t[::1] off = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef const int64_t[::1] idx = np.ascontiguousarray(bin, dtype=np.int64)
    cdef const int64_t[::1] first_of
    cdef const int64_t[::1] count_of
    cdef bint has_starts = starts is not None, has_counts = counts is not None
    if has_starts:
        first_of = np.ascontiguousarray(starts, dtype=np.int64)
    if has_counts:
        count_of = np.ascontiguousarray(counts, dtype=np.int64)
    cdef int64_t[::1] out_ids = input_ids
    cdef int64_t[::1] out_pos = position_ids
    cdef int32_t[::1] out_cu = cu_seqlens
    cdef Py_ssize_t n = off.shape[0] - 1, k = idx.shape[0], j
    cdef int64_t i, first, take, seq_len, t, src, dst = 0, max_len = 0

    # Pass 1: check every slice and the capacities before writing anything.
    if k + 1 > out_cu.shape[0]:
        raise fill_overflow("cu_seqlens", k + 1, out_cu.shape[0])
    for j in range(k):
        i = idx[j]
        if i < 0 or i >= n:
            raise bad_index(i, n)
        seq_len = off[i + 1] - off[i]
        first = first_of[i] if has_starts else 0
        take = count_of[i] if has_counts else seq_len - first
        if first < 0 or take < 1 or first + take > seq_len:
            raise bad_slice(i, first, take, seq_len)
        dst += take
    if dst > out_ids.shape[0]:
        raise fill_overflow("input_ids", dst, out_ids.shape[0])
    if dst > out_pos.shape[0]:
        raise fill_overflow("position_ids", dst, out_pos.shape[0])

    # Pass 2: write.
    dst = 0
    with nogil:
        out_cu[0] = 0
        for j in range(k):
            i = idx[j]
            seq_len = off[i + 1] - off[i]
            first = first_of[i] if has_starts else 0
            take = count_of[i] if has_counts else seq_len - first
            src = off[i] + first
            for t in range(take):
                out_ids[dst + t] = tok[src + t]
                out_pos[dst + t] = first + t
            dst += take
            out_cu[j + 1] = <int32_t> dst
            if take > max_len:
                max_len = take
    return dst, max_len


def split(flat_arr, offsets_arr):
    """``[flat[offsets[b]:offsets[b + 1]] for each bin b]``: views, no copies.

    Views are made through numpy's C API: slicing from Python costs about 130 ns a bin,
    as much as packing itself for 100k+ bins.
    """
    cdef cnp.ndarray flat = np.ascontiguousarray(flat_arr, dtype=np.int64)
    cdef const int64_t[::1] offsets = offsets_arr
    cdef Py_ssize_t b, num_bins = offsets.shape[0] - 1
    cdef cnp.npy_intp dim
    cdef char* data = <char*> cnp.PyArray_DATA(flat)
    cdef cnp.ndarray view
    bins = [None] * num_bins
    for b in range(num_bins):
        dim = offsets[b + 1] - offsets[b]
        view = cnp.PyArray_SimpleNewFromData(1, &dim, cnp.NPY_INT64, data + offsets[b] * sizeof(int64_t))
        cnp.set_array_base(view, flat)
        bins[b] = view
    return bins
