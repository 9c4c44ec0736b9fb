"""Facts about this process that the deployments report (``state()``) and act on."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

from worker.core.memory import proc_bytes

logger = logging.getLogger("ray.serve")


def rss_bytes() -> int:
    """Anonymous resident memory of this process (heap and stacks: what it holds for
    itself, not the pages of Ray's shared object store it has mapped and touched, which
    VmRSS also counts); Linux ``/proc``, 0 elsewhere."""
    return proc_bytes("/proc/self/status", "RssAnon:") or 0


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: a process that
    built one large response would hold that much for good). No-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
