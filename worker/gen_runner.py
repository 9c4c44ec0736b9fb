"""Run one generation step: stage the packed chunk batch, forward over the paged cache,
sample the next tokens.

Keep this file minimal. The step's host inputs are laid out in one persistent buffer
(pinned on CUDA) and reach the device in one copy (int64 words)::

    [0, T)              input_ids        from packing_cy.fill (chunks read in place)
    [T, 2T)             position_ids     continue from each sequence's cached prefix
    [2T, 3T)            slot_mapping     cache slot of each new token
    [3T, 3T + S)        sample_rows      row of each sequence's last token, S samplers
    then, as int32:     cu_seqlens_q [B+1], cu_seqlens_k [B+1], seqlens_k [B],
                        block_tables [B, W]

The host waits for every step's sampled tokens (the next step's inputs depend on
them), so one buffer is enough: it is never refilled while its copy is in flight.

Out of memory in the forward: ``run`` returns None and the engine recovers (see
``Generation.recover_from_oom``); sampling never ran, so no generator advanced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

import packing_cy
from worker.block_manager import BlockManager
from worker.gen_scheduler import GenSchedulerOutput
from worker.kv_cache import KVCache
from worker.paged_attention import PagedContext, PagedMetadata, context_slots
from worker.probe import is_out_of_memory
from worker.sampling import SampledTokens, Sampler
from worker.sequence import Sequence


class TokenTable:
    """Every running sequence's tokens in a row of one [rows, max_model_len] int64 array,
    so ``packing_cy.fill`` takes prefill chunks and decode tokens straight from it."""

    def __init__(self, num_rows: int, max_model_len: int):
        self.ids = np.zeros((num_rows, max_model_len), np.int64)
        self.flat = self.ids.reshape(-1)
        self.offsets = np.arange(num_rows + 1, dtype=np.int64) * max_model_len
        self.starts = np.zeros(num_rows, np.int64)  # per row: fill's ``starts``
        self.counts = np.zeros(num_rows, np.int64)  # per row: fill's ``counts``
        self._free = list(range(num_rows - 1, -1, -1))
        self._rows: dict[int, tuple[int, int]] = {}  # seq_id -> (row, tokens stored)

    def sync(self, seq: Sequence) -> int:
        """``seq``'s row, with every token it has written there; copies only new ones."""
        row, stored = self._rows.get(seq.seq_id, (None, 0))
        if row is None:
            row = self._free.pop()
        n = seq.num_tokens
        if stored < n:
            self.ids[row, stored:n] = seq.token_ids[stored:n]
        self._rows[seq.seq_id] = (row, n)
        return row

    def release(self, seq_id: int) -> None:
        entry = self._rows.pop(seq_id, None)
        if entry is not None:
            self._free.append(entry[0])

    @property
    def num_rows_used(self) -> int:
        return len(self._rows)


class GenRunner:
    """Owns the step buffers and the sampler; borrows the model, cache and block tables."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, blocks: BlockManager, device, *,
                 backend: str, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int):
        self.model, self.cache, self.blocks, self.device = model, cache, blocks, device
        self.base, self.head = model.base_model, model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.backend, self.sampler = backend, Sampler()
        self.table = TokenTable(max_num_seqs, max_model_len)
        self.max_tokens, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.max_width = -(-max_model_len // blocks.block_size)
        words = 3 * self.max_tokens + self.max_seqs
        words += (3 * self.max_seqs + 2 + self.max_seqs * self.max_width + 1) // 2
        self.host = torch.zeros(words, dtype=torch.int64, pin_memory=device.pin_memory)
        self.dev = (torch.empty(words, dtype=torch.int64, device=device.device)
                    if device.needs_copy else self.host)
        # Test-only fault injection: called as fault_hook(num_tokens, num_seqs) before
        # every forward; raise torch.OutOfMemoryError from it to exercise OOM recovery.
        self.fault_hook: Callable[[int, int], None] | None = None

    def release(self, seq: Sequence) -> None:
        """Forget ``seq``'s tokens (it finished or was preempted)."""
        self.table.release(seq.seq_id)

    @torch.inference_mode()
    def run(self, out: GenSchedulerOutput) -> tuple[list[Sequence], SampledTokens] | None:
        """Run the step; returns the sequences that sampled and their new tokens, or None
        when the forward ran out of device memory. The K/V it wrote then sit in slots
        not counted as computed, and are written again when the tokens are rescheduled.
        Out of memory while sampling is not caught: generators may have advanced."""
        rows, starts, picked = self._rows(out)
        samplers = [out.seqs[i] for i in picked]
        try:
            logits = self._logits(out, rows, starts, picked)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            return None  # leaving the except block frees the traceback's tensors
        params = [s.params for s in samplers]
        return samplers, self.sampler.sample(logits, params, [s.generator for s in samplers])

    def _logits(self, out: GenSchedulerOutput, rows, starts, picked) -> torch.Tensor:
        """Stage and forward the step -> [len(picked), vocab] fp32 logits."""
        lay = _Layout(out.num_tokens, len(picked), len(out.seqs),
                      max(len(self.blocks.block_table(s.seq_id)) for s in out.seqs))
        cu_q, seqlens_k, max_q = self._fill_host(out, rows, starts, picked, lay)
        if self.fault_hook is not None:
            self.fault_hook(out.num_tokens, len(out.seqs))
        dev = self._copy(lay.words)
        meta = self._metadata(dev, lay, cu_q, seqlens_k, max_q)
        ctx = PagedContext(self.cache, meta, self.backend)
        hidden = self.base(input_ids=dev[: lay.t].view(1, -1),
                           position_ids=dev[lay.t: 2 * lay.t].view(1, -1),
                           use_cache=False, packserve_paged=ctx).last_hidden_state[0]
        logits = self.head(hidden.index_select(0, dev[3 * lay.t: lay.i32])).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _rows(self, out: GenSchedulerOutput):
        """Token-table rows, chunk starts, and which sequences sample, in step order."""
        rows = np.empty(len(out.seqs), np.int64)
        starts = np.empty(len(out.seqs), np.int64)
        picked = []
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):  # per sequence
            row = rows[i] = self.table.sync(seq)
            starts[i] = self.table.starts[row] = seq.num_computed
            self.table.counts[row] = n
            if seq.num_computed + n == seq.num_tokens:  # reaches its end: samples next
                picked.append(i)
        return rows, starts, picked

    def _fill_host(self, out: GenSchedulerOutput, rows, starts, picked, lay: _Layout):
        """Write the whole step into the host buffer (see the module table)."""
        h, t, b, w = self.host.numpy(), lay.t, lay.b, lay.w
        i32 = h[lay.i32:].view(np.int32)
        cu_q, cu_k, lens_k = i32[: b + 1], i32[b + 1: 2 * b + 2], i32[2 * b + 2: 3 * b + 2]
        _, max_q = packing_cy.fill(self.table.flat, self.table.offsets, rows, h[:t],
                                   h[t: 2 * t], cu_q, starts=self.table.starts,
                                   counts=self.table.counts)
        seqlens_k = starts + np.asarray(out.num_new_tokens, np.int64)
        cu_k[0] = 0
        np.cumsum(seqlens_k, out=cu_k[1:])
        lens_k[:] = seqlens_k
        tables = i32[3 * b + 2: 3 * b + 2 + b * w].reshape(b, w)
        tables[:] = 0
        for i, seq in enumerate(out.seqs):  # per scheduled sequence, every step
            table = self.blocks.block_table(seq.seq_id)
            tables[i, : len(table)] = table
        bs, pos = self.blocks.block_size, h[t: 2 * t]
        seq_of_token = np.repeat(np.arange(b), out.num_new_tokens)
        h[2 * t: 3 * t] = tables[seq_of_token, pos // bs].astype(np.int64) * bs + pos % bs
        h[3 * t: lay.i32] = cu_q[1:][picked].astype(np.int64) - 1  # last row of each
        return cu_q.astype(np.int64), seqlens_k, max_q

    def _metadata(self, dev: torch.Tensor, lay: _Layout, cu_q, seqlens_k, max_q):
        t, b, w = lay.t, lay.b, lay.w
        d32 = dev[lay.i32: lay.words].view(torch.int32)
        meta = PagedMetadata(
            slot_mapping=dev[2 * t: 3 * t], cu_seqlens_q=d32[: b + 1],
            cu_seqlens_k=d32[b + 1: 2 * b + 2], seqlens_k=d32[2 * b + 2: 3 * b + 2],
            block_tables=d32[3 * b + 2: 3 * b + 2 + b * w].view(b, w),
            max_seqlen_q=int(max_q), max_seqlen_k=int(seqlens_k.max()),
            host_cu_seqlens_q=cu_q, host_seqlens_k=seqlens_k,
            block_size=self.blocks.block_size)
        if self.backend != "gather":
            return meta
        slots = context_slots(meta.block_tables, meta.seqlens_k, meta.cu_seqlens_k,
                              int(seqlens_k.sum()), meta.block_size)
        return dataclasses.replace(meta, context_slots=slots)

    def _copy(self, words: int) -> torch.Tensor:
        if self.dev is not self.host:
            self.dev[:words].copy_(self.host[:words], non_blocking=True)
        return self.dev


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Sizes of one step's buffer: tokens, samplers, sequences, block-table width."""

    t: int
    s: int
    b: int
    w: int

    @property
    def i32(self) -> int:  # first word of the int32 area
        return 3 * self.t + self.s

    @property
    def words(self) -> int:
        return self.i32 + (3 * self.b + 2 + self.b * self.w + 1) // 2
