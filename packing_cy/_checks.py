"""Argument checks and error messages shared by the Cython kernel and its Python twin.

Both implementations must raise the same errors with the same words, so the text
lives here once.
"""

from __future__ import annotations

import numpy as np


def as_lengths(lengths) -> np.ndarray:
    """Return ``lengths`` as a contiguous int64 array (no copy when it already is one)."""
    arr = np.ascontiguousarray(lengths, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {arr.shape}")
    return arr


def check_params(budget: int, align: int, max_seqs: int) -> None:
    if budget <= 0:
        raise ValueError(f"budget must be > 0 tokens, got {budget}")
    if align <= 0:
        raise ValueError(f"align must be > 0, got {align}")
    if max_seqs < 0:
        raise ValueError(f"max_seqs must be >= 0 (0 = no cap), got {max_seqs}")


def bad_length(index: int, length: int, align: int, budget: int) -> ValueError:
    """The error for item ``index``: non-positive, or larger than the budget once aligned."""
    if length <= 0:
        return ValueError(f"sequence {index} has length {length}; lengths must be >= 1")
    aligned = -(-length // align) * align
    return ValueError(
        f"sequence {index} has length {length} (aligned to {align}: {aligned}), "
        f"which exceeds the token budget {budget}; raise the budget or split the sequence"
    )


def bin_bound(total_aligned: int, budget: int, n: int, max_seqs: int) -> int:
    """An upper bound on the bins first-fit can open (sizes its segment tree).

    Take two bins a < b that never reach ``max_seqs`` items. When b's first item x
    arrived, a was open with a free item slot, so x did not fit: load(a) + load(b) >
    budget. Summing over consecutive pairs, there are at most ``2 * total / budget + 1``
    such bins. Bins that do reach the cap hold ``max_seqs`` items each, so there are at
    most ``n // max_seqs`` of those.
    """
    bound = 2 * (total_aligned // budget) + 2
    if max_seqs > 0:
        bound += n // max_seqs
    return max(1, min(n, bound))


def check_fill_outputs(input_ids, position_ids, cu_seqlens) -> None:
    for name, arr, dtype in (
        ("input_ids", input_ids, np.int64),
        ("position_ids", position_ids, np.int64),
        ("cu_seqlens", cu_seqlens, np.int32),
    ):
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
            raise TypeError(f"{name} must be a one-dimensional numpy {np.dtype(dtype)} array")
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            raise TypeError(f"{name} must be contiguous and writeable")


def fill_overflow(what: str, needed: int, capacity: int) -> ValueError:
    return ValueError(f"fill needs {needed} entries of {what} but the buffer holds {capacity}")


def bad_slice(index: int, start: int, count: int, length: int) -> ValueError:
    return ValueError(
        f"sequence {index} has {length} tokens; cannot take {count} from position {start} "
        f"(need 0 <= start < {length} and 1 <= count <= {length} - start)"
    )


def bad_index(index: int, n: int) -> ValueError:
    return ValueError(f"bin names sequence {index} but there are {n} sequences")
