"""Batched LoRA on the base model's linear layers: rows of many adapters and of the base
model in one forward.

Every targeted ``nn.Linear`` of the model is wrapped once at start (``LoRALinear``) with
slot buffers for ``max_loras`` resident adapters, zero-padded to ``max_lora_rank``::

    a  [max_loras, in_features, max_rank]     A^T of each slot's adapter
    b  [max_loras, max_rank, out_features]    scaling * B^T (0 for a module it skips)

A forward's rows each belong to a slot or to the base model. The runner sorts the rows of
adapters by slot once per step (``LoRABatch``: a permutation and each slot's end offset)
and sets it in a context variable, as it does the attention context; every wrapped
layer then adds, for those rows only::

    y[perm] += grouped_mm(grouped_mm(x[perm], a, offs), b, offs)     (shrink, then expand)

``torch.nn.functional.grouped_mm`` runs one GEMM per slot over its contiguous rows, in one
call (the MoE experts use the same kernel); slots with no rows are empty groups. Base rows
cost nothing, and a step with no adapter rows (no context) is the base layer alone.

Which kernel: measured on this project's 2-vCPU VM (``benchmarks/lora.py --kernels``,
8 slots, rank 16), grouped_mm is 1.1-2.3x faster than a Python loop over the slots for
8 to 512 rows at hidden 256 to 4,096, and level with it (0.85-1.02x) for thousands of
rows: the loop is only the fallback. On CUDA torch fuses grouped_mm for bfloat16 on
SM90+ only; elsewhere it loops internally. ``check_grouped_mm`` runs it once at start
against the loop on the model's device and dtype and keeps the loop (one warning) if it
is missing, raises or disagrees (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.quant.fp8 import Fp8Linear

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LoRARows:
    """Rows of one forward that belong to adapters, sorted by slot."""

    perm: torch.Tensor  # [R] int64: row index of each adapter row, slot by slot
    offs: torch.Tensor  # [max_loras] int32: end of each slot's rows in ``perm``
    counts: tuple[int, ...]  # rows per slot (host)
    grouped: bool  # grouped_mm (else the loop over slots)

    @classmethod
    def of(cls, slots: np.ndarray, num_slots: int, device, grouped: bool) -> LoRARows | None:
        """``slots`` [N]: each row's slot, -1 for the base model. None if no row has one."""
        mine = np.flatnonzero(slots >= 0)
        if mine.size == 0:
            return None
        order = mine[np.argsort(slots[mine], kind="stable")]
        counts = np.bincount(slots[mine], minlength=num_slots)
        perm = torch.from_numpy(order.astype(np.int64)).to(device, non_blocking=True)
        offs = torch.from_numpy(np.cumsum(counts).astype(np.int32)).to(device, non_blocking=True)
        return cls(perm, offs, tuple(int(c) for c in counts), grouped)


@dataclass(frozen=True)
class LoRABatch:
    """What a forward's wrapped layers read: the adapter rows of its tokens, and of the
    rows its LM head computes (the sampled or scored ones)."""

    tokens: LoRARows | None
    head: LoRARows | None = None


_CURRENT: ContextVar[LoRABatch | None] = ContextVar("packserve_lora", default=None)


@contextlib.contextmanager
def lora_context(batch: LoRABatch | None):
    """Run a forward (and its LM head) with ``batch`` visible to every ``LoRALinear``."""
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: LoRARows
               ) -> torch.Tensor:
    """``[R, out]``: each adapter row's ``scaling * B A x`` (rows in ``rows.perm`` order)."""
    xs = x.index_select(0, rows.perm)
    if rows.grouped:
        return F.grouped_mm(F.grouped_mm(xs, a, offs=rows.offs), b, offs=rows.offs)
    return loop_delta(xs, a, b, rows.counts)


def loop_delta(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, counts) -> torch.Tensor:
    """The plain-torch twin of the two grouped GEMMs: one pair of matmuls per slot."""
    out = xs.new_empty(xs.shape[0], b.shape[-1])
    start = 0
    for slot, n in enumerate(counts):  # per resident slot (max_loras)
        if n:
            out[start: start + n] = (xs[start: start + n] @ a[slot]) @ b[slot]
            start += n
    return out


class LoRALinear(nn.Module):
    """``base`` plus the slots' LoRA for the rows of the current ``LoRABatch``."""

    def __init__(self, base: nn.Linear, max_loras: int, max_rank: int, *, head: bool = False):
        super().__init__()
        self.base, self.head = base, head
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fp8 = isinstance(base, Fp8Linear)  # its weight is e4m3: only the layer runs it
        to = {"dtype": base.dtype if self.fp8 else base.weight.dtype,
              "device": base.weight.device}
        self.register_buffer("a", torch.zeros(max_loras, self.in_features, max_rank, **to),
                             persistent=False)
        self.register_buffer("b", torch.zeros(max_loras, max_rank, self.out_features, **to),
                             persistent=False)
        self.targeted = [False] * max_loras  # per slot: its adapter has weights here

    @property
    def weight(self) -> torch.Tensor:  # the LM head's callers read its weight (vocab size)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            y = self.base(x)
        else:
            y = F.linear(x, self.base.weight, self.base.bias)  # not self.base(x): one module
            #   call per layer, as without LoRA (a call costs as much as a tiny CPU matmul)
        batch = _CURRENT.get()
        rows = None if batch is None else (batch.head if self.head else batch.tokens)
        if rows is None or not any(n and t for n, t in zip(rows.counts, self.targeted)):
            return y  # no adapter of the step targets this layer
        shape = y.shape
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        y2.index_add_(0, rows.perm, lora_delta(x2, self.a, self.b, rows).to(y2.dtype))
        return y2.view(shape)

    def set_slot(self, slot: int, a_t: torch.Tensor | None, b_t: torch.Tensor | None) -> None:
        """Slot ``slot`` holds ``a_t`` [in, r] and ``b_t`` [r, out] (scaled), or nothing
        for this module (None: the adapter does not target it)."""
        self.b[slot].zero_()
        self.targeted[slot] = a_t is not None
        if a_t is None:
            return
        r = a_t.shape[1]
        self.a[slot].zero_()
        self.a[slot, :, :r].copy_(a_t, non_blocking=True)
        self.b[slot, :r].copy_(b_t, non_blocking=True)

    def extra_repr(self) -> str:
        return f"slots={self.a.shape[0]}, max_rank={self.a.shape[2]}, head={self.head}"


def check_grouped_mm(layer: LoRALinear) -> bool:
    """Whether grouped_mm runs on ``layer``'s device and dtype and equals the loop (on
    random slots and rows); False (one warning) otherwise."""
    w = layer.a  # the slots' device and dtype (an FP8 base's weight is e4m3)
    gen = torch.Generator().manual_seed(0)
    num_slots, rank = layer.a.shape[0], layer.a.shape[2]
    a = torch.randn(num_slots, layer.in_features, rank, generator=gen).to(w.device, w.dtype)
    b = torch.randn(num_slots, rank, layer.out_features, generator=gen).to(w.device, w.dtype)
    x = torch.randn(13, layer.in_features, generator=gen).to(w.device, w.dtype)
    slots = np.array([s % num_slots for s in range(13)], np.int64)
    slots[3] = -1
    rows = LoRARows.of(slots, num_slots, w.device, True)
    try:
        got = lora_delta(x, a, b, rows).float()
    except Exception as exc:  # noqa: BLE001 - any failure means the loop
        logger.warning("LoRA: grouped_mm unavailable on %s %s (%r); the slot loop runs",
                       w.device, w.dtype, exc)
        return False
    want = loop_delta(x.index_select(0, rows.perm), a, b, rows.counts).float()
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    tolerance = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if err > tolerance:
        logger.warning("LoRA: grouped_mm disagrees with the loop on %s %s (relative error "
                       "%.3g); the slot loop runs", w.device, w.dtype, err)
        return False
    return True
