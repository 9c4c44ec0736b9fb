"""The Phase-0 token budget probe: how many packed tokens one forward may hold on this GPU.

Procedure (after the weights are on the GPU):

1. NVML: total memory of the physical device and what is already used (weights, CUDA
   context, other processes).
2. Warm-up forwards at growing packed sizes (512, 1024, 2048, ...) through the caller's
   ``run_packed(num_tokens)``; around each, the allocator's peak over the post-load
   baseline. Growing stops at the configured maximum, when the linear fit predicts the
   next size would not fit, or at the first out-of-memory error.
3. A line through (tokens, peak over baseline): slope = activation bytes per token,
   intercept = fixed bytes (workspaces, kernels' scratch). The slope is the larger of
   the least-squares fit and the slope between the two largest warm-ups: small warm-ups
   are dominated by fixed costs and pull a least-squares slope low (on an H100 with a
   Qwen2.5-7B shape: 133 KiB/token fitted, 139.7 KiB/token measured at 400k tokens).
4. budget = floor((total * cap - used - margin - intercept) / per_token), with
   per_token = activation (+ KV bytes per token when KV is reserved), rounded down to a
   multiple of ``align`` and clamped to ``max_budget_tokens``.
5. A budget above the largest warm-up is an extrapolation: it is run once, and backed
   off by 10% per out-of-memory error until it fits. Allocated bytes stay linear, but a
   bin whose single tensors are many GiB can fail on allocator fragmentation below
   the predicted size (seen on an H100: predicted 413k tokens, largest fit 397k).

The KV bytes per token (2 * layers * kv_heads * head_dim * dtype bytes) are always
reported: forward-only work keeps no KV, generation does.

On CPU the budget comes from configuration (``config_budget``). An override skips the
measurement but still reports what NVML read. The CLI, ``python -m worker.budget.cli``,
is ``worker/budget/cli.py`` (kept apart so this module stays the probe alone).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.budget.nvml import GpuMemory, NvmlReader
from worker.budget.report import GIB, BudgetReport, WarmupPoint
from worker.budget.report import gib as _gib
from worker.budget.report import kib as _kib
from worker.core.memory import is_out_of_memory

logger = logging.getLogger(__name__)

class BudgetError(ValueError):
    """No useful budget fits; the message names the factors and the settings to change."""


class WarmupStop(str, enum.Enum):
    """Why the warm-up stopped growing."""

    REACHED_MAX = "reached max_budget_tokens"
    PREDICTED_OVER_CAP = "next size predicted over the cap"
    OUT_OF_MEMORY = "out of memory"


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe may use. Validated; errors name the field."""

    utilization_cap: float = 0.90  # fraction of NVML total the process may fill
    margin_bytes: int = GIB  # kept free on top of the cap (fragmentation, other allocs)
    override_tokens: int | None = None  # skip measurement, use this budget
    align: int = 16  # budget rounded down to a multiple of this
    max_budget_tokens: int = 65536  # clamp; also the largest warm-up size
    reserve_kv: bool = False  # add KV bytes per token (generation keeps KV)
    warmup_start_tokens: int = 512  # first warm-up size; doubles from there

    def __post_init__(self) -> None:
        if not 0.0 < self.utilization_cap <= 1.0:
            raise ValueError(f"utilization_cap must be in (0, 1], got {self.utilization_cap}")
        if self.margin_bytes < 0:
            raise ValueError(f"margin_bytes must be >= 0, got {self.margin_bytes}")
        if self.align < 1:
            raise ValueError(f"align must be >= 1, got {self.align}")
        if self.max_budget_tokens < self.align:
            raise ValueError(
                f"max_budget_tokens ({self.max_budget_tokens}) must be >= align ({self.align})"
            )
        if self.warmup_start_tokens < 1:
            raise ValueError(f"warmup_start_tokens must be >= 1, got {self.warmup_start_tokens}")
        if self.override_tokens is not None and self.override_tokens < 1:
            raise ValueError(f"override_tokens must be >= 1, got {self.override_tokens}")

    def warmup_sizes(self) -> list[int]:
        """Doubling sizes from ``warmup_start_tokens``, ending exactly at the maximum."""
        sizes, n = [], min(self.warmup_start_tokens, self.max_budget_tokens)
        while n < self.max_budget_tokens:
            sizes.append(n)
            n *= 2
        return sizes + [self.max_budget_tokens]


class MemoryStats(Protocol):
    """The allocator counters the probe needs (torch.cuda for real, a fake in tests)."""

    def allocated_bytes(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak_allocated_bytes(self) -> int: ...

    def release_cached(self) -> None: ...


class TorchCudaMemory:
    """``MemoryStats`` over ``torch.cuda`` for one device; synchronizes before reading."""

    def __init__(self, device_index: int) -> None:
        import torch

        self._torch, self._device = torch, torch.device("cuda", device_index)

    def allocated_bytes(self) -> int:
        self._torch.cuda.synchronize(self._device)
        return int(self._torch.cuda.memory_allocated(self._device))

    def reset_peak(self) -> None:
        self._torch.cuda.synchronize(self._device)
        self._torch.cuda.reset_peak_memory_stats(self._device)

    def peak_allocated_bytes(self) -> int:
        self._torch.cuda.synchronize(self._device)
        return int(self._torch.cuda.max_memory_allocated(self._device))

    def release_cached(self) -> None:
        self._torch.cuda.synchronize(self._device)
        self._torch.cuda.empty_cache()


def kv_bytes_per_token(model_config, dtype_bytes: int) -> int:
    """2 (K and V) * layers * kv heads * head dim * bytes per element."""
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def fit_line(points: Sequence[WarmupPoint]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of peak bytes against tokens; intercept >= 0.

    One point gives slope = bytes / tokens. A negative intercept is a fit artifact and
    would inflate the budget, so it is clamped to 0 and the slope refit through 0.
    """
    if not points:
        raise ValueError("fit_line needs at least one warm-up point, got 0")
    xs = [float(p.num_tokens) for p in points]
    ys = [float(p.peak_bytes) for p in points]
    if len(points) == 1 or len(set(xs)) == 1:
        return max(ys) / xs[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    if intercept < 0:
        return sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
    return slope, intercept


def conservative_line(points: Sequence[WarmupPoint]) -> tuple[float, float]:
    """(slope, intercept) safe to extrapolate past the largest warm-up.

    Slope: the larger of the least-squares slope and the slope of the top segment; the
    line passes through the largest point (intercept clamped at 0, which only raises it).
    """
    slope, intercept = fit_line(points)
    if len(points) >= 2 and points[-1].num_tokens != points[-2].num_tokens:
        top = (points[-1].peak_bytes - points[-2].peak_bytes) / (
            points[-1].num_tokens - points[-2].num_tokens)
        if top > slope:
            slope = top
            intercept = max(0.0, points[-1].peak_bytes - slope * points[-1].num_tokens)
    return slope, intercept


def _verify(run_packed, memory: MemoryStats, budget: int, largest_run: int, align: int,
            max_backoffs: int = 8) -> tuple[int, int]:
    """Run an extrapolated budget once; back off 10% per OOM. -> (budget, backoffs).

    A budget no larger than the largest warm-up already ran and is returned as is.
    """
    backoffs = 0
    while budget > largest_run:
        if backoffs == max_backoffs:
            return _round_down(largest_run, align), backoffs
        try:
            run_packed(budget)
            return budget, backoffs
        except Exception as exc:  # anything but OOM is re-raised
            if not is_out_of_memory(exc):
                raise
        memory.release_cached()  # outside the except block: its traceback pins tensors
        logger.warning("budget %d tokens ran out of memory when verified; backing off", budget)
        budget = _round_down(int(budget * 0.9), align)
        backoffs += 1
    return budget, backoffs


def measure_budget(
    run_packed: Callable[[int], None],
    *,
    model_config,
    dtype_bytes: int,
    nvml: NvmlReader,
    memory: MemoryStats,
    device_index: int = 0,
    settings: ProbeSettings = ProbeSettings(),
    parameter_bytes: int | None = None,
) -> BudgetReport:
    """Measure (or take the override of) the packed-token budget; see the module docstring.

    ``run_packed(n)`` runs one packed forward of ``n`` tokens of synthetic sequences and
    returns once it is done (the engine supplies it). Call after the weights are loaded.
    Raises BudgetError when less than ``align`` tokens fit.
    """
    reading: GpuMemory = nvml.read(device_index)
    baseline = memory.allocated_bytes()
    common = {
        "align": settings.align,
        "max_budget_tokens": settings.max_budget_tokens,
        "device_index": device_index,
        "device_name": nvml.device_name(device_index),
        "total_bytes": reading.total_bytes,
        "used_bytes": reading.used_bytes,
        "utilization_cap": settings.utilization_cap,
        "margin_bytes": settings.margin_bytes,
        "weights_allocated_bytes": baseline,
        "parameter_bytes": parameter_bytes,
        "kv_bytes_per_token": kv_bytes_per_token(model_config, dtype_bytes),
        "reserve_kv": settings.reserve_kv,
    }
    if settings.override_tokens is not None:
        report = BudgetReport(source="override", budget_tokens=settings.override_tokens, **common)
        _log(report)
        return report

    limit = reading.total_bytes * settings.utilization_cap - reading.used_bytes
    limit -= settings.margin_bytes
    points, stop = _warm_up(run_packed, memory, baseline, settings.warmup_sizes(), limit)
    if not points:
        raise BudgetError(
            f"the smallest warm-up forward ({settings.warmup_sizes()[0]} tokens) ran out of "
            f"memory with {_gib(reading.free_bytes)} free of {_gib(reading.total_bytes)}; "
            "lower warmup_start_tokens or free GPU memory"
        )
    slope, intercept = conservative_line(points)
    kv = common["kv_bytes_per_token"] if settings.reserve_kv else 0
    per_token = slope + kv
    usable = limit - intercept
    raw = math.floor(usable / per_token) if per_token > 0 else settings.max_budget_tokens
    budget = _round_down(min(raw, settings.max_budget_tokens), settings.align)
    budget, backoffs = _verify(run_packed, memory, budget, points[-1].num_tokens, settings.align)
    report = BudgetReport(
        source="measured",
        budget_tokens=budget,
        raw_budget_tokens=raw,
        activation_bytes_per_token=slope,
        activation_fixed_bytes=intercept,
        warmup=tuple(points),
        warmup_stop=stop.value,
        verify_backoffs=backoffs,
        used_after_warmup_bytes=nvml.read(device_index).used_bytes,
        **common,
    )
    _log(report)
    if budget < settings.align:
        raise BudgetError(
            f"budget {budget} tokens is below align {settings.align}: usable {_gib(usable)} "
            f"for {_kib(per_token)} per token; raise utilization_cap "
            f"({settings.utilization_cap}), lower margin_bytes ({settings.margin_bytes}) "
            "or set an override"
        )
    return report


def config_budget(budget_tokens: int, *, align: int = 16, max_budget_tokens: int | None = None,
                  kv_bytes: int | None = None) -> BudgetReport:
    """The CPU path: the budget is the configured value, nothing is measured."""
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    report = BudgetReport(source="config", budget_tokens=budget_tokens, align=align,
                          max_budget_tokens=max_budget_tokens, kv_bytes_per_token=kv_bytes)
    _log(report)
    return report


def _warm_up(run_packed, memory: MemoryStats, baseline: int, sizes: list[int],
             limit_bytes: float) -> tuple[list[WarmupPoint], WarmupStop]:
    points: list[WarmupPoint] = []
    for n in sizes:
        if len(points) >= 2:
            slope, intercept = fit_line(points)
            if intercept + slope * n > limit_bytes:
                return points, WarmupStop.PREDICTED_OVER_CAP
        memory.reset_peak()
        oom = False
        try:
            run_packed(n)
        except Exception as exc:  # anything but OOM is re-raised
            if not is_out_of_memory(exc):
                raise
            oom = True  # release outside the except block: the traceback pins tensors
        if oom:
            memory.release_cached()
            logger.warning("warm-up forward of %d tokens ran out of memory; stop growing", n)
            return points, WarmupStop.OUT_OF_MEMORY
        points.append(WarmupPoint(n, memory.peak_allocated_bytes() - baseline))
    return points, WarmupStop.REACHED_MAX


def _round_down(n: int, align: int) -> int:
    return max(0, n) // align * align


def _log(report: BudgetReport) -> None:
    for line in report.to_log_lines():
        logger.info("token budget: %s", line)
