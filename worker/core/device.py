"""A tiny device abstraction so CPU and CUDA take the same code path.

``CpuDevice`` answers every stream and event call with a no-op and never pins memory
(``pin_memory=True`` raises without CUDA); ``CudaDevice`` gives a side stream for
host-to-device copies and real events. Callers never branch on the device type.
"""

from __future__ import annotations

import contextlib

import torch


class _NullEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CpuDevice:
    """Host memory is device memory: no pinning, no streams, nothing to wait for."""

    pin_memory = False
    needs_copy = False  # staging may hand the host buffer straight to the model

    def __init__(self, device: torch.device):
        self.device = device

    def event(self):
        return _NullEvent()

    def copy_stream(self):
        return None

    def compute_stream(self):
        return None

    def use_stream(self, stream):
        return contextlib.nullcontext()

    def wait_event(self, stream, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass


class CudaDevice:
    """Pinned host memory, one side stream for copies, events to order the two."""

    pin_memory = True
    needs_copy = True

    def __init__(self, device: torch.device):
        self.device = device
        self._copy_stream = torch.cuda.Stream(device=device)

    def event(self):
        return torch.cuda.Event()

    def copy_stream(self):
        return self._copy_stream

    def compute_stream(self):
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


def make_device(name: str) -> CpuDevice | CudaDevice:
    """``"cpu"`` or ``"cuda[:N]"``; CUDA must be available for the latter."""
    device = torch.device(name)
    if device.type == "cpu":
        return CpuDevice(device)
    if not torch.cuda.is_available():
        from worker.core.config import ConfigError

        raise ConfigError("device", f"{name!r} was asked for but torch sees no CUDA device")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return CudaDevice(device)
