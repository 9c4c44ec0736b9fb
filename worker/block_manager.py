"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, per-sequence tables.

A sequence's token ``p`` lives in cache slot ``table[p // block_size] * block_size +
p % block_size``. Blocks are handed out on demand (``allocate`` for the tokens a step
adds) and all returned at once (``free``, on finish, abort or preemption). No prefix
sharing: every block has at most one owner, which ``check_invariants`` verifies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class AllocStatus(enum.Enum):
    OK = "ok"
    OUT_OF_BLOCKS = "out of free KV blocks"


class BlockInvariantError(AssertionError):
    """A leaked, double-owned or miscounted block: a bug, never a user error."""


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_seqs: int  # sequences holding a table (possibly empty)
    num_tokens: int  # token slots reserved over all sequences
    block_size: int

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` token slots, owned by sequence ids."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) "
                             "must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        # A stack: the block freed last is reused first (still warm in the device caches).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._num_tokens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def num_tokens(self, seq_id: int) -> int:
        """Token slots reserved for ``seq_id`` (0 for an unknown sequence)."""
        return self._num_tokens.get(seq_id, 0)

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's blocks in order. Read-only: do not mutate the returned list."""
        return self._tables.get(seq_id, [])

    def num_blocks_needed(self, seq_id: int, num_new_tokens: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-(self.num_tokens(seq_id) + num_new_tokens) // self.block_size) - have)

    def can_allocate(self, seq_id: int, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq_id, num_new_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_new_tokens: int) -> AllocStatus:
        """Reserve slots for ``num_new_tokens`` more tokens: all the blocks needed or none."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        need = self.num_blocks_needed(seq_id, num_new_tokens)
        if need > len(self._free):
            return AllocStatus.OUT_OF_BLOCKS
        table = self._tables.setdefault(seq_id, [])
        if need:
            table.extend(self._free[-need:][::-1])
            del self._free[-need:]
        self._num_tokens[seq_id] = self.num_tokens(seq_id) + num_new_tokens
        return AllocStatus.OK

    def append_slot(self, seq_id: int) -> bool:
        """``allocate(seq_id, 1)`` for a sequence that holds a table, on the decode hot
        path (once per running sequence per step); False when a block is needed and
        none is free (nothing changed then)."""
        n = self._num_tokens.get(seq_id)
        if n is None:
            return self.allocate(seq_id, 1) is AllocStatus.OK
        if n % self.block_size == 0:
            if not self._free:
                return False
            self._tables[seq_id].append(self._free.pop())
        self._num_tokens[seq_id] = n + 1
        return True

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Keep slots for ``seq_id``'s first ``num_tokens`` tokens only; return the blocks
        past them (undoes the reservations of a step that did not run)."""
        if not 0 <= num_tokens <= self.num_tokens(seq_id):
            raise ValueError(f"cannot trim sequence {seq_id} to {num_tokens} tokens: it "
                             f"holds {self.num_tokens(seq_id)}")
        if seq_id not in self._tables:
            return
        table = self._tables[seq_id]
        keep = -(-num_tokens // self.block_size)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self._num_tokens[seq_id] = num_tokens

    def free(self, seq_id: int) -> int:
        """Return every block of ``seq_id`` to the free list; the number returned."""
        table = self._tables.pop(seq_id, None)
        self._num_tokens.pop(seq_id, None)
        if not table:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    def slot_mapping(self, seq_id: int, start: int, count: int) -> np.ndarray:
        """Cache slots of tokens ``start .. start + count - 1`` -> [count] int64."""
        if start < 0 or start + count > self.num_tokens(seq_id):
            raise ValueError(f"tokens [{start}, {start + count}) of sequence {seq_id} are not "
                             f"reserved (it has {self.num_tokens(seq_id)})")
        table = np.asarray(self._tables.get(seq_id, []), dtype=np.int64)
        pos = np.arange(start, start + count, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def stats(self) -> BlockStats:
        used = self.num_blocks - len(self._free)
        return BlockStats(self.num_blocks, len(self._free), used, len(self._tables),
                          sum(self._num_tokens.values()), self.block_size)

    def check_invariants(self) -> None:
        """Raise ``BlockInvariantError`` unless every block is free xor owned exactly once,
        and every table holds exactly the blocks its reserved tokens need."""
        seen = np.zeros(self.num_blocks, np.int64)
        free = np.asarray(self._free, np.int64)
        owned = [b for table in self._tables.values() for b in table]
        for ids in (free, np.asarray(owned, np.int64)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
                raise BlockInvariantError(f"block id out of range [0, {self.num_blocks})")
            np.add.at(seen, ids, 1)
        if (seen > 1).any():
            raise BlockInvariantError(f"blocks held twice: {np.flatnonzero(seen > 1).tolist()}")
        if (seen == 0).any():
            raise BlockInvariantError(f"leaked blocks: {np.flatnonzero(seen == 0).tolist()}")
        for seq_id, table in self._tables.items():
            want = -(-self._num_tokens.get(seq_id, 0) // self.block_size)
            if len(table) != want:
                raise BlockInvariantError(f"sequence {seq_id} holds {len(table)} blocks for "
                                          f"{self._num_tokens.get(seq_id, 0)} tokens "
                                          f"(needs {want})")
        if self._tables.keys() != self._num_tokens.keys():
            raise BlockInvariantError("block tables and token counts name different sequences")
