"""GPU memory as NVML sees it: the whole physical device, not only this process.

The token-budget probe needs total and used memory of the physical GPU (other
processes, the CUDA context and the caching allocator's reserve all count). NVML
numbers devices in PCI bus order over the whole machine, while CUDA numbers only the
devices listed in ``CUDA_VISIBLE_DEVICES`` (Ray sets it to physical indices; users may
list GPU or MIG UUIDs). ``resolve_nvml_device`` maps one to the other.

Caveat: integer entries are NVML indices only when CUDA enumerates in PCI bus order
(``CUDA_DEVICE_ORDER=PCI_BUS_ID``); CUDA's default "fastest first" order is the same on
nodes with identical GPUs, which is the case this project targets.

``pynvml`` (the ``nvidia-ml-py`` package) is imported lazily, so this module imports on
machines without it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

_ENV_VISIBLE = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class GpuMemory:
    """One NVML memory reading, in bytes."""

    total_bytes: int
    used_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class NvmlDeviceRef:
    """How to open one physical device in NVML."""

    kind: str  # "index" (physical NVML index) or "uuid" ("GPU-..." / "MIG-...", maybe a prefix)
    value: str  # the index as text, or the UUID


class NvmlReader(Protocol):
    """Reads memory of the GPU that CUDA calls ``cuda_index`` in this process."""

    def read(self, cuda_index: int) -> GpuMemory: ...

    def device_name(self, cuda_index: int) -> str: ...


def resolve_nvml_device(cuda_index: int, visible: str | None) -> NvmlDeviceRef:
    """Map a process-local CUDA index to the physical device NVML should open.

    ``visible`` is the value of CUDA_VISIBLE_DEVICES (None: unset, all devices visible in
    order). Like CUDA, the list stops at the first entry it cannot parse.
    """
    if cuda_index < 0:
        raise ValueError(f"cuda_index must be >= 0, got {cuda_index}")
    if visible is None:
        return NvmlDeviceRef("index", str(cuda_index))
    entries = _parse_visible(visible)
    if cuda_index >= len(entries):
        raise ValueError(
            f"CUDA device {cuda_index} is not visible: {_ENV_VISIBLE}={visible!r} "
            f"lists {len(entries)} device(s)"
        )
    return entries[cuda_index]


def _parse_visible(visible: str) -> list[NvmlDeviceRef]:
    refs: list[NvmlDeviceRef] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if entry.startswith(("GPU-", "MIG-")):
            refs.append(NvmlDeviceRef("uuid", entry))
        elif entry.isdigit():
            refs.append(NvmlDeviceRef("index", str(int(entry))))
        else:  # "", "-1", "NoDevFiles": CUDA ignores this entry and everything after it
            break
    return refs


class PynvmlReader:
    """The real reader, through ``pynvml``. Initialises NVML once per process."""

    _lock = threading.Lock()
    _initialised = False

    def __init__(self, visible: str | None = None, *, use_env: bool = True) -> None:
        self._visible = os.environ.get(_ENV_VISIBLE) if use_env and visible is None else visible

    def read(self, cuda_index: int) -> GpuMemory:
        pynvml = self._nvml()
        info = pynvml.nvmlDeviceGetMemoryInfo(self._handle(pynvml, cuda_index))
        return GpuMemory(int(info.total), int(info.used), int(info.free))

    def device_name(self, cuda_index: int) -> str:
        pynvml = self._nvml()
        name = pynvml.nvmlDeviceGetName(self._handle(pynvml, cuda_index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def _nvml(self):
        import pynvml  # lazy: nvidia-ml-py is only needed on GPU machines

        with PynvmlReader._lock:
            if not PynvmlReader._initialised:
                pynvml.nvmlInit()
                PynvmlReader._initialised = True
        return pynvml

    def _handle(self, pynvml, cuda_index: int):
        ref = resolve_nvml_device(cuda_index, self._visible)
        if ref.kind == "index":
            return pynvml.nvmlDeviceGetHandleByIndex(int(ref.value))
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(ref.value)
        except pynvml.NVMLError:
            return self._handle_by_uuid_prefix(pynvml, ref.value)

    @staticmethod
    def _handle_by_uuid_prefix(pynvml, prefix: str):
        """CUDA accepts a unique UUID prefix in CUDA_VISIBLE_DEVICES; NVML wants it whole."""
        matches = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            if uuid.startswith(prefix):
                matches.append(handle)
        if len(matches) != 1:
            raise ValueError(
                f"{_ENV_VISIBLE} entry {prefix!r} matches {len(matches)} GPUs in NVML; "
                "give a full GPU UUID (nvidia-smi -L)"
            )
        return matches[0]


@dataclass
class FakeNvmlReader:
    """A reader for tests: fixed total, ``used_bytes`` set by the test."""

    total_bytes: int
    used_bytes: int
    name: str = "Fake GPU"

    def read(self, cuda_index: int) -> GpuMemory:
        return GpuMemory(self.total_bytes, self.used_bytes, self.total_bytes - self.used_bytes)

    def device_name(self, cuda_index: int) -> str:
        return self.name


class CudaMemInfoReader:
    """Fallback when nvidia-ml-py is missing: device-wide free/total from cudaMemGetInfo.

    Same physical numbers for the visible device, without the NVML name mapping.
    """

    def read(self, cuda_index: int) -> GpuMemory:
        import torch

        free, total = torch.cuda.mem_get_info(cuda_index)
        return GpuMemory(int(total), int(total - free), int(free))

    def device_name(self, cuda_index: int) -> str:
        import torch

        return torch.cuda.get_device_name(cuda_index)


def default_reader() -> NvmlReader:
    """``PynvmlReader`` when ``pynvml`` imports, else ``CudaMemInfoReader``."""
    try:
        import pynvml  # noqa: F401
    except ImportError:
        logger.warning("nvidia-ml-py is not installed: the probe reads cudaMemGetInfo instead")
        return CudaMemInfoReader()
    return PynvmlReader()
