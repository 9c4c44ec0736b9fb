"""Persistent staging buffers: a packed bin goes to the device in one copy.

Each of the two slots owns one contiguous int64 host buffer (pinned on CUDA) and a
device buffer of the same size, allocated once. A bin of ``T`` tokens and ``B``
sequences is laid out tightly so one ``non_blocking`` copy of its prefix moves it
(``k`` = 3 for models with token types, the BERT family, else 2)::

    words [0, T)                    input_ids       int64
    words [T, 2T)                   position_ids    int64
    words [2T, 3T)                  token_type_ids  int64 (k = 3 only; zeros unless pairs)
    words [kT, kT + ceil((B+1)/2))  cu_seqlens      int32 (the words' bytes, viewed as int32)

``packing_cy.fill`` writes straight into numpy views of the host buffer. The copy runs
on a side stream; the compute stream waits on the copy's event. Slots alternate, so
filling bin k+1 overlaps the forward of bin k, and a slot is not refilled before its
last copy finished (host side) nor recopied before the forward that read it finished
(device side). On CPU the device buffer *is* the host buffer and every wait is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import packing_cy


@dataclass(frozen=True)
class StagedBin:
    """One bin on the device, ready for the forward. Views into a staging slot."""

    input_ids: torch.Tensor  # [1, T] int64, device
    position_ids: torch.Tensor  # [1, T] int64, device
    cu_seqlens: torch.Tensor  # [B + 1] int32, device
    host_cu_seqlens: np.ndarray  # [B + 1] int32, host; valid until this slot is restaged
    token_type_ids: torch.Tensor | None  # [1, T] int64, device; None without token types
    num_tokens: int  # T
    max_seqlen: int
    slot: int

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1


class _Slot:
    def __init__(self, words: int, device):
        self.host = torch.empty(words, dtype=torch.int64, pin_memory=device.pin_memory)
        self.dev = (torch.empty(words, dtype=torch.int64, device=device.device)
                    if device.needs_copy else self.host)
        self.copy_done = device.event()  # host buffer free again once this completes
        self.compute_done = device.event()  # device buffer free again once this completes


class Staging:
    """Two staging slots sized for ``max_num_tokens`` tokens and ``max_num_seqs`` sequences."""

    def __init__(self, max_num_tokens: int, max_num_seqs: int, device,
                 token_types: bool = False):
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.device = device
        self.num_rows = 3 if token_types else 2  # token-wide rows per bin (k above)
        words = self.num_rows * max_num_tokens + (max_num_seqs + 2) // 2
        self._slots = [_Slot(words, device), _Slot(words, device)]
        self._next = 0
        self.timer = None  # a worker.core.timing.StepTimer while the engine is observed

    def stage(self, token_ids: np.ndarray, offsets: np.ndarray, bin: np.ndarray,
              token_type_ids: np.ndarray | None = None) -> StagedBin:
        """Fill the next slot with ``bin`` (indices into the sequences) and start its copy.
        ``token_type_ids`` (beside ``token_ids``) is staged when this staging has the row
        for it; without it the row is zeros."""
        index, slot = self._next, self._slots[self._next]
        self._next ^= 1
        num_tokens = int((offsets[bin + 1] - offsets[bin]).sum())
        num_seqs = int(bin.shape[0])
        if num_tokens > self.max_num_tokens or num_seqs > self.max_num_seqs:
            raise ValueError(
                f"bin of {num_tokens} tokens / {num_seqs} sequences exceeds the staging "
                f"buffers ({self.max_num_tokens} tokens / {self.max_num_seqs} sequences)"
            )
        k = self.num_rows
        used = k * num_tokens + (num_seqs + 2) // 2
        slot.copy_done.synchronize()
        host_ids, host_pos, host_types, host_cu = _views(slot.host, num_tokens, num_seqs, k)
        _, max_seqlen = packing_cy.fill(
            token_ids, offsets, bin, host_ids.numpy(), host_pos.numpy(), host_cu.numpy()
        )
        if host_types is not None:
            if token_type_ids is None:
                host_types.zero_()
            else:  # the same fill over the types: positions and cu_seqlens come out equal
                packing_cy.fill(token_type_ids, offsets, bin, host_types.numpy(),
                                host_pos.numpy(), host_cu.numpy())
        self._copy(slot, used)
        ids, pos, types, cu = _views(slot.dev, num_tokens, num_seqs, k)
        return StagedBin(ids.view(1, -1), pos.view(1, -1), cu, host_cu.numpy(),
                         None if types is None else types.view(1, -1),
                         num_tokens, max_seqlen, index)

    def host_words(self, staged: StagedBin) -> torch.Tensor:
        """The host words ``staged`` was filled from (a tensor-parallel rank 0 sends them to
        the other ranks); valid until its slot is restaged."""
        used = self.num_rows * staged.num_tokens + (staged.num_seqs + 2) // 2
        return self._slots[staged.slot].host[:used]

    def stage_words(self, words: torch.Tensor, num_tokens: int, num_seqs: int,
                    max_seqlen: int) -> StagedBin:
        """Stage a bin from another rank's ``host_words``: the same bin, on this device."""
        index, slot = self._next, self._slots[self._next]
        self._next ^= 1
        if num_tokens > self.max_num_tokens or num_seqs > self.max_num_seqs:
            raise ValueError(f"bin of {num_tokens} tokens / {num_seqs} sequences exceeds the "
                             f"staging buffers ({self.max_num_tokens} / {self.max_num_seqs})")
        slot.copy_done.synchronize()
        host_cu = _views(slot.host, num_tokens, num_seqs, self.num_rows)[3]
        slot.host[: words.numel()].copy_(words)
        self._copy(slot, words.numel())
        ids, pos, types, cu = _views(slot.dev, num_tokens, num_seqs, self.num_rows)
        return StagedBin(ids.view(1, -1), pos.view(1, -1), cu, host_cu.numpy(),
                         None if types is None else types.view(1, -1),
                         num_tokens, max_seqlen, index)

    def release(self, staged: StagedBin) -> None:
        """Call once the forward that reads ``staged`` is enqueued (or failed)."""
        slot = self._slots[staged.slot]
        slot.compute_done.record(self.device.compute_stream())

    def _copy(self, slot: _Slot, used: int) -> None:
        timer = self.timer
        if timer is not None:
            timer.h2d_bytes += 8 * used  # int64 words
        if slot.dev is slot.host:
            return
        dev, stream = self.device, self.device.copy_stream()
        with dev.use_stream(stream):
            dev.wait_event(stream, slot.compute_done)
            if timer is not None:
                timer.copy.begin(stream)
            slot.dev[:used].copy_(slot.host[:used], non_blocking=True)
            if timer is not None:
                timer.copy.end(stream)
            slot.copy_done.record(stream)
        dev.wait_event(dev.compute_stream(), slot.copy_done)


def _views(buf: torch.Tensor, num_tokens: int, num_seqs: int, rows: int):
    """input_ids, position_ids, token_type_ids (None unless ``rows`` is 3) and
    cu_seqlens of a bin laid out at the start of ``buf``."""
    t = num_tokens
    types = buf[2 * t: 3 * t] if rows == 3 else None
    cu_words = buf[rows * t: rows * t + (num_seqs + 2) // 2]
    return buf[:t], buf[t: 2 * t], types, cu_words.view(torch.int32)[: num_seqs + 1]
