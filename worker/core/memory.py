"""The two rules about running out of memory that both the runners and the budget use.

What counts as an out-of-memory error (the runners turn it into a smaller budget, the
probe into a measured limit) and how a budget shrinks after one (both schedulers). They
live here, below everything else in ``worker/``, so neither side imports the other.
"""

from __future__ import annotations


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM as torch raises it (also the older RuntimeError spelling)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def shrunk_budget(failed_num_tokens: int, align: int, minimum: int) -> int:
    """The budget after a step of ``failed_num_tokens`` ran out of memory: 90% of it,
    rounded down to ``align`` when at least ``align``, and never below ``minimum``
    (``align`` for pooled bins, 1 for generation steps, which may be single decodes)."""
    target = int(failed_num_tokens * 0.9)
    if target >= align:
        target -= target % align
    return max(minimum, target)


def proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a Linux ``/proc`` file (``MemAvailable:`` of ``/proc/meminfo``,
    ``RssAnon:`` of ``/proc/self/status``) in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
