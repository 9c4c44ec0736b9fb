"""A generation step's inputs: persistent per-row state and the one staged buffer.

Every running sequence owns a *row* for as long as it runs (vLLM's persistent input
batch, without compaction): a row of the token table, a row of the block table and a
row of the sampler's parameters. Each is written when it changes (new tokens, a new
block, a new sequence), never rebuilt, so the host work of a step is O(sequences
scheduled + tokens and blocks added), not O(sequences x context).

A step's host inputs are laid out in one buffer (pinned on CUDA) and reach the device
in one copy. Offsets, in int64 words, for T tokens, S sampling rows, B sequences and U
block-table entries that changed::

    [0, T)              input_ids        from packing_cy.fill (chunks read in place)
    [T, 2T)             position_ids     continue from each sequence's cached prefix
    [2T, 3T)            slot_mapping     cache slot of each new token
    [3T, 3T + S)        sample_rows      row of the step of each sequence that samples
    [3T + S, I)         table_rows       block-table row of each sequence (I = 3T + S + B)
    then, as int32:     cu_seqlens_q [B+1], cu_seqlens_k [B+1], seqlens_k [B]
    then, as int64:     update_index [U] (flat index into the block table), update_value [U]

A decode-only step padded to a CUDA-graph bucket of ``b`` sequences has T = S = B = b,
so everything but the updates sits at offsets that depend on ``b`` alone: the graph
captured for ``b`` reads them in place. Padding rows take token 0 at position 0, write
their K/V to the reserved scratch slot and attend to it alone (block-table row
``pad_row``, whose every entry is the scratch block); nothing ever reads what they write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import packing_cy
from worker.generate.sequence import Sequence


@dataclass(frozen=True)
class StepLayout:
    """Sizes of one step's buffer (see the module table)."""

    t: int  # tokens
    s: int  # sampling rows
    b: int  # sequences
    u: int = 0  # block-table entries that changed

    @property
    def i32(self) -> int:  # first word of the int32 area
        return 3 * self.t + self.s + self.b

    @property
    def updates(self) -> int:  # first word of the block-table updates
        return self.i32 + (3 * self.b + 2 + 1) // 2

    @property
    def words(self) -> int:
        return self.updates + 2 * self.u

    @classmethod
    def capacity(cls, max_tokens: int, max_seqs: int, max_updates: int,
                 max_samples: int | None = None) -> int:
        """Words the largest step may need (``max_samples``: sampling rows, default one
        per sequence; a speculative step samples several per decode)."""
        return cls(max_tokens, max_samples or max_seqs, max_seqs, max_updates).words


@dataclass(frozen=True)
class HostMeta:
    """What the host knows of a staged step (the device holds the rest)."""

    layout: StepLayout
    cu_seqlens_q: np.ndarray  # [B + 1] int64
    seqlens_k: np.ndarray  # [B] int64
    max_seqlen_q: int
    num_real: int  # sequences before padding
    width: int  # block-table columns the step reads
    upload_table: bool = False  # too many entries changed to stage: copy the whole table


class BatchState:
    """Rows of persistent host state, one per running sequence (see the module docstring).

    ``tokens`` [rows, max_model_len] int64 holds each row's token ids (``packing_cy.fill``
    reads chunks from it in place); ``tables`` [rows + 1, width] int32 holds block ids,
    the last row being the padding row. ``sampling`` is the sampler's per-row state.
    """

    def __init__(self, num_rows: int, max_model_len: int, block_size: int, scratch_block: int,
                 sampling):
        self.block_size = block_size
        self.width = -(-max_model_len // block_size)  # block-table columns
        self.tokens = np.zeros((num_rows, max_model_len), np.int64)
        self.flat = self.tokens.reshape(-1)
        self.offsets = np.arange(num_rows + 1, dtype=np.int64) * max_model_len
        self.starts = np.zeros(num_rows, np.int64)  # per row: fill's ``starts``
        self.counts = np.zeros(num_rows, np.int64)  # per row: fill's ``counts``
        self.tables = np.zeros((num_rows + 1, self.width), np.int32)
        self.lora_slots = np.full(num_rows, -1, np.int64)  # per row: its adapter's slot
        self.pad_row = num_rows
        self.tables[self.pad_row] = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.sampling = sampling
        self._num_stored = [0] * num_rows  # per row: tokens written
        self._num_synced = [0] * num_rows  # per row: block ids written
        self._free = list(range(num_rows - 1, -1, -1))
        self._rows: dict[int, int] = {}  # seq_id -> row
        self._updates: list[np.ndarray] = []  # flat table indices changed since the last take
        self._values: list[np.ndarray] = []

    @property
    def num_rows_used(self) -> int:
        return len(self._rows)

    def sync(self, seq: Sequence, table: list[int]) -> int:
        """``seq``'s row with its new tokens and blocks written (a new row on first sight).
        Runs for every scheduled sequence every step: a decode writes one token, and one
        block id every ``block_size`` steps."""
        row = self._rows.get(seq.seq_id)
        if row is None:
            row = self._rows[seq.seq_id] = self._free.pop()
            self._num_stored[row] = self._num_synced[row] = 0
            self.sampling.set(row, seq.params, seq.generator, seq.prompt_len, seq.matcher)
            self.lora_slots[row] = seq.lora_slot
        stored, n = self._num_stored[row], len(seq.token_ids)
        if stored + 1 == n:
            self.tokens[row, stored] = seq.token_ids[stored]
        elif stored < n:
            self.tokens[row, stored:n] = seq.token_ids[stored:n]
        self._num_stored[row] = n
        synced, m = self._num_synced[row], len(table)
        if synced < m:
            self.tables[row, synced:m] = table[synced:m]
            self._updates.append(np.arange(row * self.width + synced, row * self.width + m))
            self._values.append(self.tables[row, synced:m])
            self._num_synced[row] = m
        elif synced > m:  # blocks were returned: the kept prefix is still in place
            self._num_synced[row] = m
        return row

    def tokens_of(self, seq: Sequence) -> np.ndarray | None:
        """``seq``'s tokens so far, as its row holds them (the new ones written first, as
        ``sync`` would); None when it has no row. A view: read it before the row changes."""
        row = self._rows.get(seq.seq_id)
        if row is None:
            return None
        stored, n = self._num_stored[row], len(seq.token_ids)
        if stored < n:
            self.tokens[row, stored:n] = seq.token_ids[stored:n]
            self._num_stored[row] = n
        return self.tokens[row, :n]

    def resync_blocks(self, seq_id: int) -> None:
        """Write ``seq_id``'s whole block table again at its next sync (after blocks
        past a kept prefix were returned and may come back as other blocks)."""
        row = self._rows.get(seq_id)
        if row is not None:
            self._num_synced[row] = 0

    def keep_blocks(self, seq_id: int, num_blocks: int) -> None:
        """``seq_id`` returned the blocks past its first ``num_blocks`` (a speculative
        step's rejected slots): the columns past them are written again when blocks come
        back there, whatever their ids."""
        row = self._rows.get(seq_id)
        if row is not None and self._num_synced[row] > num_blocks:
            self._num_synced[row] = num_blocks

    def release(self, seq_id: int) -> None:
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self.sampling.clear(row)
            self._free.append(row)

    def take_updates(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices, block ids) written to the host table since the last call."""
        if not self._updates:
            return _EMPTY, _EMPTY
        idx, val = np.concatenate(self._updates), np.concatenate(self._values)
        self._updates.clear()
        self._values.clear()
        return idx, val


_EMPTY = np.zeros(0, np.int64)


def stage_step(host: np.ndarray, state: BatchState, seqs: list[Sequence],
               num_new_tokens: list[int], rows: np.ndarray, picked: list[int],
               pad_to: int = 0, max_updates: int | None = None,
               sample_rows: np.ndarray | None = None) -> HostMeta:
    """Write one step into ``host`` (the int64 view of the staging buffer); ``pad_to`` > 0
    pads a decode-only step with padding rows up to that many sequences; ``sample_rows``:
    the step's token positions whose logits are wanted (default: the last token of each
    ``picked`` sequence; a speculative step wants several per decode). More than
    ``max_updates`` changed block-table entries (only after ``resync_blocks`` of long
    sequences) are not staged: the step asks for the whole table to be uploaded."""
    b_real = len(seqs)
    b = max(pad_to, b_real)
    counts = np.asarray(num_new_tokens, np.int64)
    starts = state.starts[rows]
    t_real = int(counts.sum())
    t, s = (b, b) if pad_to else (t_real, len(picked) if sample_rows is None
                                   else len(sample_rows))
    idx, val = state.take_updates()
    upload = max_updates is not None and idx.shape[0] > max_updates
    if upload:
        idx = val = _EMPTY
    lay = StepLayout(t, s, b, int(idx.shape[0]))
    i32 = host[lay.i32: lay.updates].view(np.int32)
    cu_q, cu_k, lens_k = i32[: b + 1], i32[b + 1: 2 * b + 2], i32[2 * b + 2: 3 * b + 2]
    pos = host[t: 2 * t]
    _, max_q = packing_cy.fill(state.flat, state.offsets, rows, host[:t], pos, cu_q,
                               starts=state.starts, counts=state.counts)
    seqlens_k = np.empty(b, np.int64)
    seqlens_k[:b_real] = starts + counts
    seq_of_token = np.repeat(np.arange(b_real), counts)
    p = pos[:t_real]
    host[2 * t: 2 * t + t_real] = (state.tables[rows[seq_of_token], p // state.block_size]
                                   .astype(np.int64) * state.block_size + p % state.block_size)
    if sample_rows is None:
        host[3 * t: 3 * t + len(picked)] = cu_q[1:][picked].astype(np.int64) - 1  # last rows
    else:
        host[3 * t: 3 * t + s] = sample_rows
    table_rows = host[3 * t + s: lay.i32]
    table_rows[:b_real] = rows
    if b > b_real:  # padding rows (decode-only steps): see the module docstring
        host[t_real:t] = 0
        pos[t_real:] = 0
        host[2 * t + t_real: 3 * t] = state.scratch_slot
        host[3 * t + b_real: 3 * t + s] = np.arange(b_real, b)
        table_rows[b_real:] = state.pad_row
        seqlens_k[b_real:] = 1
        cu_q[b_real + 1:] = np.arange(b_real + 1, b + 1)
    lens_k[:] = seqlens_k
    cu_k[0] = 0
    np.cumsum(seqlens_k, out=cu_k[1:])
    host[lay.updates: lay.updates + lay.u] = idx
    host[lay.updates + lay.u: lay.words] = val
    width = -(-int(seqlens_k.max()) // state.block_size) if b else 1
    return HostMeta(lay, cu_q.astype(np.int64), seqlens_k, max(int(max_q), 1), b_real, width,
                    upload)


def apply_updates(table: torch.Tensor, dev: torch.Tensor, meta: HostMeta,
                  state: BatchState) -> None:
    """Scatter the step's changed block-table entries into the device table (or upload
    the whole table when the step asked for it)."""
    lay = meta.layout
    if meta.upload_table:
        table.copy_(torch.from_numpy(state.tables))
    elif lay.u:
        index = dev[lay.updates: lay.updates + lay.u]
        value = dev[lay.updates + lay.u: lay.words].to(table.dtype)
        table.view(-1).index_copy_(0, index, value)
