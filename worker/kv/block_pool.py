"""The KV cache's blocks as a ref-counted pool, with the prefix cache in it.

Every block is either owned (ref count >= 1: it sits in that many sequences' block
tables) or free (ref 0: in ``free``, in the order blocks are handed out). A full block
whose K/V were computed may carry a hash (``block_hash``): its tokens chained to its
parent block's hash, so equal hashes mean equal prefixes. Hashed blocks stay in the
cache (``cached``: hash -> block) after their last owner lets go, and a new request
takes the longest chain of them instead of computing those tokens again.

The free queue is the eviction order, least recently used first::

    head (handed out / evicted next)                            tail (kept longest)
    [ unhashed blocks | hashed blocks, least recently released ... most recently ]

A sequence releases its blocks last first, so a chain's tail (specific to one request)
is evicted before its head (a shared system prompt). A free hashed block handed out is
evicted: its hash leaves ``cached``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

HASH_BYTES = 16  # blake2b digest size: 128 bits, collisions out of reach


def root_hash(salt: str) -> bytes:
    """The parent hash of a sequence's first block: everything besides the tokens that
    changes a block's K/V (the model, later its adapters) goes into ``salt``."""
    return hashlib.blake2b(salt.encode(), digest_size=HASH_BYTES).digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: bytes,
                 start: int, stop: int) -> list[bytes]:
    """Hashes of full blocks ``start .. stop - 1`` of ``token_ids``, each chained to the
    one before (``parent`` is block ``start - 1``'s hash, or the root)."""
    if stop <= start:
        return []
    tokens = np.asarray(token_ids[start * block_size: stop * block_size], np.int64)
    out = []
    for i in range(stop - start):  # per new full block, once per block
        digest = hashlib.blake2b(parent, digest_size=HASH_BYTES)
        digest.update(tokens[i * block_size: (i + 1) * block_size].tobytes())
        parent = digest.digest()
        out.append(parent)
    return out


class BlockPool:
    """``num_blocks`` blocks: ref counts, the free queue and the hash -> block map."""

    def __init__(self, num_blocks: int, order: Iterable[int] | None = None):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        order = list(range(num_blocks)) if order is None else [int(b) for b in order]
        if sorted(order) != list(range(num_blocks)):
            raise ValueError(f"order must list each of the {num_blocks} blocks once")
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(order)
        self.num_evictions = 0  # hashed blocks handed out for other content

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def take_free(self, n: int) -> list[int]:
        """``n`` free blocks (the caller checked there are enough), each owned once."""
        blocks = []
        for _ in range(n):  # per block handed out
            block, _ = self.free.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:  # evict: the block is about to hold other tokens
                del self.cached[h]
                self.block_hash[block] = None
                self.num_evictions += 1
            self.ref[block] = 1
            blocks.append(block)
        return blocks

    def share(self, block: int) -> None:
        """One more owner of a cached ``block`` (a prefix hit)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One owner fewer for each of ``blocks`` (a table, first block first); blocks
        left without owners go free: hashed ones to the tail (the table's last block
        first, so its first block is kept longest), unhashed ones to the head."""
        for block in reversed(blocks):  # per block of the released table
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is None:
                    self.free.move_to_end(block, last=False)

    def register(self, block: int, h: bytes) -> bool:
        """Cache ``block`` (full, computed) under ``h``; False when that content is
        cached already (in another block) or the block is."""
        if h in self.cached or self.block_hash[block] is not None:
            return False
        self.block_hash[block] = h
        self.cached[h] = block
        return True

    def check(self, owners: list[int]) -> list[str]:
        """What is inconsistent, given each block's number of owning tables."""
        problems = []
        for block in range(self.num_blocks):
            ref, free = self.ref[block], block in self.free
            if ref != owners[block]:
                problems.append(f"block {block} has ref {ref} but {owners[block]} owners")
            if ref < 0 or (ref == 0) != free:
                problems.append(f"block {block} ref {ref} is {'free' if free else 'not free'}")
        if len(self.free) + sum(1 for r in self.ref if r > 0) != self.num_blocks:
            problems.append("free and owned blocks do not add up")
        for h, block in self.cached.items():
            if self.block_hash[block] != h:
                problems.append(f"cached block {block} does not carry its hash")
        if sum(h is not None for h in self.block_hash) != len(self.cached):
            problems.append("hashed blocks and the cache disagree")
        return problems
