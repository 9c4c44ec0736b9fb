"""First-fit-decreasing bin packing of variable-length sequences under a token budget.

A compiled kernel (``_ffd.pyx``) beside a readable pure-Python twin (``_ffd_py.py``)
with identical output, laid out like propcache: the kernel is used when it is built,
``PACKSERVE_PURE_PYTHON=1`` forces the twin, and ``IMPLEMENTATION`` says which one
runs. The whole test suite runs against both.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from . import _ffd_py

__all__ = ["IMPLEMENTATION", "fill", "lower_bound", "pack", "pack_flat"]

_WANT_PURE = os.environ.get("PACKSERVE_PURE_PYTHON", "") not in ("", "0")

if _WANT_PURE:
    pack_flat, fill, _split = _ffd_py.pack_flat, _ffd_py.fill, _ffd_py.split
    IMPLEMENTATION = "python"
else:
    try:
        from ._ffd import fill, pack_flat
        from ._ffd import split as _split
    except ImportError:  # not built (e.g. a source checkout without `pip install -e .`)
        warnings.warn(
            "packing_cy: the Cython kernel is not built; using the pure-Python twin "
            "(run `make install` or `pip install -e .` to build it)",
            RuntimeWarning,
            stacklevel=2,
        )
        pack_flat, fill, _split = _ffd_py.pack_flat, _ffd_py.fill, _ffd_py.split
        IMPLEMENTATION = "python"
    else:
        IMPLEMENTATION = "cython"


def pack(lengths, budget: int, *, align: int = 16, max_seqs: int = 0) -> list[np.ndarray]:
    """Pack sequences into bins of at most ``budget`` aligned tokens (first-fit decreasing).

    Each length is rounded up to a multiple of ``align``; items are taken longest
    aligned length first (ties: lower input index first); each goes into the
    earliest-opened bin that has room and holds fewer than ``max_seqs`` items
    (0 = no cap), else into a new bin. O(n log n).

    Returns one int64 array of input indices per bin, bins in opening order, indices
    in placement order. Raises ValueError, naming the index, the length and the
    budget, for a length <= 0 or an aligned length above ``budget``.
    """
    flat, offsets = pack_flat(lengths, budget, align, max_seqs)
    return _split(flat, offsets)


def lower_bound(lengths, budget: int, *, align: int = 16) -> int:
    """The fewest bins any packing can use: ceil(sum of aligned lengths / budget)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(((lengths + (align - 1)) // align * align).sum())
    return -(-total // budget)
