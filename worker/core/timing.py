"""Step timing that costs nothing unobserved: spans of CUDA events or host clock readings.

The packed runner and the staging buffers hold a ``StepTimer`` as ``.timer`` only while
an observer is registered (``worker.engine.observe``, whose docstring says what each
number means); it lives down here, below every folder that measures.
"""

from __future__ import annotations

import math
import time


class _Spans:
    """Reusable (start, end) marks: CUDA events recorded on a stream, or host clock
    readings. Grown on first use, then reused every step: nothing allocated after."""

    def __init__(self, cuda: bool):
        self._cuda = cuda
        self._marks: list[list] = []
        self.num = 0  # closed spans this step

    def begin(self, stream=None) -> None:
        """Open span ``num`` (a span opened and never ended is overwritten by the next)."""
        if self.num == len(self._marks):
            self._marks.append([_event(), _event()] if self._cuda else [0.0, 0.0])
        mark = self._marks[self.num]
        if self._cuda:
            mark[0].record(stream)
        else:
            mark[0] = time.perf_counter()

    def end(self, stream=None) -> None:
        mark = self._marks[self.num]
        if self._cuda:
            mark[1].record(stream)
        else:
            mark[1] = time.perf_counter()
        self.num += 1

    def seconds(self) -> tuple[float, ...]:
        """Every closed span's seconds; resets for the next step."""
        out = []
        for start, end in self._marks[: self.num]:  # per bin, observed steps only
            if self._cuda:
                if not end.query():
                    end.synchronize()  # not reached: the step already read results back
                out.append(start.elapsed_time(end) / 1e3)
            else:
                out.append(end - start)
        self.num = 0
        return tuple(out)


def _event():
    import torch

    return torch.cuda.Event(enable_timing=True)


class StepTimer:
    """What the runner and the staging buffers measure for one step (see the module
    docstring). They hold it as ``.timer`` only while an observer is registered."""

    def __init__(self, cuda: bool):
        self.forward = _Spans(cuda)
        self.copy = _Spans(cuda)
        self.bin_num_tokens: list[int] = []
        self.h2d_bytes = 0

    def end_bin(self, num_tokens: int, stream=None) -> None:
        self.forward.end(stream)
        self.bin_num_tokens.append(num_tokens)

    def take(self) -> tuple[tuple[int, ...], tuple[float, ...], int, float]:
        """(bin tokens, forward seconds, h2d bytes, h2d seconds); resets."""
        bins, seconds = tuple(self.bin_num_tokens), self.forward.seconds()
        h2d_bytes, h2d_seconds = self.h2d_bytes, math.fsum(self.copy.seconds())
        self.bin_num_tokens.clear()
        self.h2d_bytes = 0
        return bins, seconds, h2d_bytes, h2d_seconds
