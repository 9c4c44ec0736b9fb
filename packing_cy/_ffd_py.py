"""Pure-Python twin of ``_ffd.pyx``: the readable definition of the packer.

It returns exactly what the Cython kernel returns (the test suite runs against both
and a property test checks they agree). Use it to read the algorithm; use the kernel
to run it.

First-fit decreasing with a max segment tree::

    items    taken by aligned length, longest first; ties: lower input index first
    tree     leaves = bins (opened left to right), value = remaining capacity;
             an inner node holds the max of its children. Unopened leaves hold the
             whole budget, so the leftmost leaf that fits is either the earliest
             opened bin with room or, when none has room, the next bin to open.
    query    walk from the root, going left whenever the left subtree fits: O(log bins)
    max_seqs a bin that reaches the cap gets capacity -1 and never fits again
"""

from __future__ import annotations

import numpy as np

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


def pack_flat(
    lengths, budget: int, align: int = 16, max_seqs: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """FFD packing; bin ``b`` is ``flat[offsets[b]:offsets[b + 1]]`` (see ``packing_cy.pack``)."""
    lengths = as_lengths(lengths)
    check_params(budget, align, max_seqs)
    n = lengths.shape[0]
    if n == 0:
        return np.empty(0, np.int64), np.zeros(1, np.int64)
    aligned = (lengths + (align - 1)) // align * align
    bad = np.flatnonzero((lengths <= 0) | (aligned > budget))
    if bad.size:
        i = int(bad[0])
        raise bad_length(i, int(lengths[i]), align, budget)

    order = np.argsort(-aligned, kind="stable")
    size = 1 << (bin_bound(int(aligned.sum()), budget, n, max_seqs) - 1).bit_length()
    tree = [budget] * (2 * size)
    seqs_in_bin = [0] * size
    bin_of = [0] * n  # bin of the k-th placed item
    needs = aligned.tolist()
    num_bins = 0
    for k, i in enumerate(order.tolist()):  # one pass per item: the O(n log n) core
        need = needs[i]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        seqs_in_bin[b] += 1
        tree[node] = -1 if seqs_in_bin[b] == max_seqs else tree[node] - need
        node //= 2
        while node:  # stop as soon as an ancestor's max is unchanged
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2
        bin_of[k] = b
        num_bins = max(num_bins, b + 1)

    bin_of_arr = np.asarray(bin_of, dtype=np.int64)
    flat = order[np.argsort(bin_of_arr, kind="stable")].astype(np.int64, copy=False)
    offsets = np.zeros(num_bins + 1, np.int64)
    np.cumsum(np.bincount(bin_of_arr, minlength=num_bins), out=offsets[1:])
    return flat, offsets


def split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """``[flat[offsets[b]:offsets[b + 1]] for each bin b]``: views, no copies."""
    bounds = offsets.tolist()
    return [flat[bounds[b] : bounds[b + 1]] for b in range(len(bounds) - 1)]


def fill(token_ids, offsets, bin, input_ids, position_ids, cu_seqlens, *, starts=None, counts=None):
    """Write one packed bin into caller-given buffers (see ``packing_cy.fill``)."""
    check_fill_outputs(input_ids, position_ids, cu_seqlens)
    token_ids = np.asarray(token_ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    bin = np.asarray(bin, dtype=np.int64)
    n, k = offsets.shape[0] - 1, bin.shape[0]
    if k == 0:
        cu_seqlens[0] = 0
        return 0, 0
    out_of_range = np.flatnonzero((bin < 0) | (bin >= n))
    if out_of_range.size:
        raise bad_index(int(bin[out_of_range[0]]), n)

    seq_len = offsets[bin + 1] - offsets[bin]
    first = np.zeros(k, np.int64) if starts is None else np.asarray(starts, np.int64)[bin]
    take = seq_len - first if counts is None else np.asarray(counts, np.int64)[bin]
    bad = np.flatnonzero((first < 0) | (take < 1) | (first + take > seq_len))
    if bad.size:
        j = int(bad[0])
        raise bad_slice(int(bin[j]), int(first[j]), int(take[j]), int(seq_len[j]))
    if k + 1 > cu_seqlens.shape[0]:
        raise fill_overflow("cu_seqlens", k + 1, cu_seqlens.shape[0])
    num_tokens = int(take.sum())
    for name, buf in (("input_ids", input_ids), ("position_ids", position_ids)):
        if num_tokens > buf.shape[0]:
            raise fill_overflow(name, num_tokens, buf.shape[0])

    cu = np.zeros(k + 1, np.int64)
    np.cumsum(take, out=cu[1:])
    cu_seqlens[: k + 1] = cu
    local = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu[:-1], take)
    input_ids[:num_tokens] = token_ids[np.repeat(offsets[bin] + first, take) + local]
    position_ids[:num_tokens] = np.repeat(first, take) + local
    return num_tokens, int(take.max())
