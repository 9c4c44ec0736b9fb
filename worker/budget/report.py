"""The probe's report: every factor of the token budget, printable in GiB.

Kept apart from ``worker.budget.probe`` so the measurement reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30
KIB = 1 << 10


def gib(n: float) -> str:
    return f"{n / GIB:.3f} GiB"


def kib(n: float) -> str:
    return f"{n / KIB:.2f} KiB"


@dataclass(frozen=True)
class WarmupPoint:
    num_tokens: int
    peak_bytes: int  # allocator peak during the forward, over the post-load baseline


@dataclass(frozen=True)
class BudgetReport:
    """Every factor of the budget. Byte fields are None where they were not measured."""

    source: str  # "measured" | "override" | "config"
    budget_tokens: int
    align: int
    max_budget_tokens: int | None = None
    raw_budget_tokens: int | None = None  # before rounding and clamping
    device_index: int | None = None
    device_name: str | None = None
    total_bytes: int | None = None  # NVML total of the physical device
    used_bytes: int | None = None  # NVML used after the weights were loaded
    utilization_cap: float | None = None
    margin_bytes: int | None = None
    weights_allocated_bytes: int | None = None  # torch allocated after load
    parameter_bytes: int | None = None  # sum of parameter sizes
    activation_bytes_per_token: float | None = None  # fit slope
    activation_fixed_bytes: float | None = None  # fit intercept (>= 0)
    kv_bytes_per_token: int | None = None
    reserve_kv: bool = False
    warmup: tuple[WarmupPoint, ...] = field(default_factory=tuple)
    warmup_stop: str | None = None
    verify_backoffs: int = 0  # 10% back-offs before an extrapolated budget ran
    used_after_warmup_bytes: int | None = None  # NVML again, allocator cache included

    @property
    def bytes_per_token(self) -> float | None:
        if self.activation_bytes_per_token is None:
            return None
        kv = (self.kv_bytes_per_token or 0) if self.reserve_kv else 0
        return self.activation_bytes_per_token + kv

    @property
    def free_bytes(self) -> int | None:
        """NVML free memory after weights: what the budget is a fraction of."""
        if self.total_bytes is None or self.used_bytes is None:
            return None
        return self.total_bytes - self.used_bytes

    @property
    def fraction_of_free(self) -> float | None:
        """Peak bytes the budget implies (fixed + tokens), over the free bytes."""
        per_token, free = self.bytes_per_token, self.free_bytes
        if per_token is None or not free:
            return None
        fixed = self.activation_fixed_bytes or 0.0
        return (fixed + per_token * self.budget_tokens) / free

    def to_log_lines(self) -> list[str]:
        """Every factor, bytes in GiB and per-token bytes in KiB."""
        lines = [f"budget source: {self.source}"]
        if self.device_index is not None:
            lines.append(f"device: cuda:{self.device_index} ({self.device_name or 'unknown'})")
        for label, value in (
            ("total memory (NVML)", self.total_bytes),
            ("used after weights (NVML)", self.used_bytes),
            ("free after weights (NVML)", self.free_bytes),
            ("weights allocated (torch)", self.weights_allocated_bytes),
            ("parameter bytes", self.parameter_bytes),
            ("margin", self.margin_bytes),
            ("activation fixed (fit intercept)", self.activation_fixed_bytes),
            ("used after warm-up (NVML, allocator cache kept)", self.used_after_warmup_bytes),
        ):
            if value is not None:
                lines.append(f"{label}: {gib(value)}")
        if self.utilization_cap is not None and self.total_bytes is not None:
            capped = self.total_bytes * self.utilization_cap
            lines.append(f"utilization cap: {self.utilization_cap:.2f} -> {gib(capped)}")
        if self.activation_bytes_per_token is not None:
            lines.append(f"activation per token: {kib(self.activation_bytes_per_token)}")
        if self.kv_bytes_per_token is not None:
            state = "reserved" if self.reserve_kv else "not reserved: forward only"
            lines.append(f"kv per token: {kib(self.kv_bytes_per_token)} ({state})")
        if self.warmup:
            points = ", ".join(f"{p.num_tokens} -> {gib(p.peak_bytes)}" for p in self.warmup)
            lines.append(f"warm-up peaks over baseline: {points}; stop: {self.warmup_stop}")
        if self.raw_budget_tokens is not None:
            lines.append(f"raw budget (before align/clamp): {self.raw_budget_tokens} tokens")
        if self.verify_backoffs:
            lines.append(f"verification: {self.verify_backoffs} back-off(s) of 10% after OOM")
        tail = f"budget: {self.budget_tokens} tokens (align {self.align}"
        tail += f", max {self.max_budget_tokens})" if self.max_budget_tokens else ")"
        if self.fraction_of_free is not None:
            tail += f", {self.fraction_of_free:.1%} of free memory"
        return lines + [tail]
