"""The paged KV cache's bookkeeping: per-sequence block tables over a ref-counted pool
(``worker.kv.block_pool``), with prefix caching.

A sequence's token ``p`` lives in cache slot ``table[p // block_size] * block_size +
p % block_size``. Blocks are handed out on demand (``allocate`` for the tokens a step
adds) and all released at once (``free``, on finish, abort or preemption). With prefix
caching, a new sequence first takes the longest chain of cached full blocks that
matches its prompt (``take_prefix``; those tokens are not computed again), and every
full block it computes is registered under its chained hash (``register``), so the
next request with the same prefix finds it. Shared blocks are only ever full ones: a
sequence writes new tokens into blocks it alone owns. ``check_invariants`` verifies
ref counts against the tables.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from worker.kv.block_pool import BlockPool


class AllocStatus(enum.Enum):
    OK = "ok"
    OUT_OF_BLOCKS = "out of free KV blocks"


class BlockInvariantError(AssertionError):
    """A leaked, double-owned or miscounted block: a bug, never a user error."""


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    num_free_blocks: int  # evictable cached blocks included
    num_used_blocks: int
    num_seqs: int  # sequences holding a table (possibly empty)
    num_tokens: int  # token slots reserved over all sequences
    block_size: int
    num_cached_blocks: int = 0  # blocks holding a hashed (reusable) prefix
    num_evictions: int = 0  # cached blocks handed out for other content so far

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` token slots, owned by sequence ids.
    ``order``: the order free blocks are first handed out (tests scatter them)."""

    def __init__(self, num_blocks: int, block_size: int, *, order: Iterable[int] | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) "
                             "must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pool = BlockPool(num_blocks, order)
        self._tables: dict[int, list[int]] = {}
        self._num_tokens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

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
        return self.num_blocks_needed(seq_id, num_new_tokens) <= self.pool.num_free

    def allocate(self, seq_id: int, num_new_tokens: int) -> AllocStatus:
        """Reserve slots for ``num_new_tokens`` more tokens: all the blocks needed or none."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        need = self.num_blocks_needed(seq_id, num_new_tokens)
        if need > self.pool.num_free:
            return AllocStatus.OUT_OF_BLOCKS
        table = self._tables.setdefault(seq_id, [])
        if need:
            table.extend(self.pool.take_free(need))
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
            if not self.pool.num_free:
                return False
            self._tables[seq_id].extend(self.pool.take_free(1))
        self._num_tokens[seq_id] = n + 1
        return True

    def take_prefix(self, seq_id: int, hashes: list[bytes]) -> int:
        """Give ``seq_id`` (which holds no table yet) the longest chain of cached blocks
        matching ``hashes`` (its full blocks' chained hashes, the ones it may skip);
        returns the number of blocks taken (their tokens count as computed)."""
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds blocks")
        cached, blocks = self.pool.cached, []
        for h in hashes:  # per matching block, at admission
            block = cached.get(h)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self.pool.share(block)
        self._tables[seq_id] = blocks
        self._num_tokens[seq_id] = len(blocks) * self.block_size
        return len(blocks)

    def num_cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading blocks of ``hashes`` the cache holds (nothing is taken)."""
        cached = self.pool.cached
        for i, h in enumerate(hashes):  # per matching block, at admission
            if h not in cached:
                return i
        return len(hashes)

    def register(self, seq_id: int, first: int, hashes: list[bytes], stop: int) -> None:
        """Cache ``seq_id``'s full, computed blocks ``first .. stop - 1`` under
        ``hashes[first:stop]`` (``hashes`` is the chain from its first block)."""
        table = self._tables[seq_id]
        for i in range(first, stop):  # per newly full block, once each
            self.pool.register(table[i], hashes[i])

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Keep slots for ``seq_id``'s first ``num_tokens`` tokens only; release the
        blocks past them (undoes the reservations of a step that did not run)."""
        if not 0 <= num_tokens <= self.num_tokens(seq_id):
            raise ValueError(f"cannot trim sequence {seq_id} to {num_tokens} tokens: it "
                             f"holds {self.num_tokens(seq_id)}")
        if seq_id not in self._tables:
            return
        table = self._tables[seq_id]
        keep = -(-num_tokens // self.block_size)
        self.pool.release(table[keep:])
        del table[keep:]
        self._num_tokens[seq_id] = num_tokens

    def free(self, seq_id: int) -> int:
        """Release every block of ``seq_id``; the number it held."""
        table = self._tables.pop(seq_id, None)
        self._num_tokens.pop(seq_id, None)
        if not table:
            return 0
        self.pool.release(table)
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
        free = self.pool.num_free
        return BlockStats(self.num_blocks, free, self.num_blocks - free, len(self._tables),
                          sum(self._num_tokens.values()), self.block_size,
                          self.pool.num_cached, self.pool.num_evictions)

    def check_invariants(self) -> None:
        """Raise ``BlockInvariantError`` unless every block's ref count equals the tables
        holding it, free blocks are exactly those with none, the cache map agrees with
        the blocks' hashes, and every table holds exactly the blocks its tokens need."""
        owners = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                if not 0 <= block < self.num_blocks:
                    raise BlockInvariantError(f"block id {block} out of range "
                                              f"[0, {self.num_blocks})")
                owners[block] += 1
        for block in self.pool.free:
            if not 0 <= block < self.num_blocks:
                raise BlockInvariantError(f"free block id {block} out of range")
        for table in self._tables.values():
            if len(set(table)) != len(table):
                raise BlockInvariantError(f"a table holds a block twice: {table}")
        problems = self.pool.check(owners)
        if problems:
            raise BlockInvariantError("; ".join(problems[:5]))
        for seq_id, table in self._tables.items():
            want = -(-self._num_tokens.get(seq_id, 0) // self.block_size)
            if len(table) != want:
                raise BlockInvariantError(f"sequence {seq_id} holds {len(table)} blocks for "
                                          f"{self._num_tokens.get(seq_id, 0)} tokens "
                                          f"(needs {want})")
        if self._tables.keys() != self._num_tokens.keys():
            raise BlockInvariantError("block tables and token counts name different sequences")
