"""The block manager: a hypothesis state machine against a plain model, and the
invariant check itself catching corruption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker.kv.block_manager import AllocStatus, BlockInvariantError, BlockManager

NUM_BLOCKS, BLOCK_SIZE = 12, 4


class BlockMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.tokens: dict[int, int] = {}  # the model: reserved tokens per sequence

    @rule(seq=st.integers(0, 5), n=st.integers(0, 20))
    def allocate(self, seq, n):
        have = self.tokens.get(seq, 0)
        need = -(-(have + n) // BLOCK_SIZE) - -(-have // BLOCK_SIZE)
        free_before = self.bm.num_free_blocks
        tables_before = {s: list(self.bm.block_table(s)) for s in self.tokens}
        status = self.bm.allocate(seq, n)
        if need > free_before:
            assert status is AllocStatus.OUT_OF_BLOCKS
            assert self.bm.num_free_blocks == free_before  # all or nothing
            assert {s: list(self.bm.block_table(s)) for s in self.tokens} == tables_before
        else:
            assert status is AllocStatus.OK
            assert self.bm.num_free_blocks == free_before - need
            self.tokens[seq] = have + n
            assert self.bm.block_table(seq)[: len(tables_before.get(seq, []))] == \
                tables_before.get(seq, [])  # existing blocks never move

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        blocks = len(self.bm.block_table(seq))
        assert self.bm.free(seq) == blocks
        del self.tokens[seq]
        assert not self.bm.has(seq) and self.bm.free(seq) == 0

    @invariant()
    def consistent(self):
        self.bm.check_invariants()
        stats = self.bm.stats()
        assert stats.num_free_blocks + stats.num_used_blocks == NUM_BLOCKS
        assert stats.num_tokens == sum(self.tokens.values())
        slots = [self.bm.slot_mapping(s, 0, n) for s, n in self.tokens.items()]
        flat = np.concatenate(slots) if slots else np.empty(0, np.int64)
        assert len(np.unique(flat)) == flat.size  # no slot shared by two tokens
        assert flat.size == 0 or (flat.min() >= 0 and flat.max() < NUM_BLOCKS * BLOCK_SIZE)


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_slot_mapping_follows_the_table():
    bm = BlockManager(8, 4)
    bm.allocate(1, 3)
    bm.allocate(2, 5)
    bm.allocate(1, 6)  # sequence 1: 9 tokens over 3 blocks
    table = bm.block_table(1)
    assert len(table) == 3
    want = [table[p // 4] * 4 + p % 4 for p in range(2, 9)]
    assert bm.slot_mapping(1, 2, 7).tolist() == want
    with pytest.raises(ValueError, match="not reserved"):
        bm.slot_mapping(1, 5, 5)


def test_freed_blocks_are_reused_first():
    bm = BlockManager(4, 2)
    bm.allocate(1, 2)
    first = bm.block_table(1)[0]
    bm.free(1)
    bm.allocate(2, 1)
    assert bm.block_table(2) == [first]


@pytest.mark.parametrize("corrupt, message", [
    (lambda bm: bm.pool.free.popitem(), "ref 0 is not free"),  # leaked
    (lambda bm: bm.pool.free.__setitem__(bm.block_table(1)[0], None), "ref 1 is free"),
    (lambda bm: bm._tables[1].append(bm.pool.free.popitem()[0]), "has ref 0 but 1 owners"),
    (lambda bm: bm.pool.free.__setitem__(99, None), "out of range"),
    (lambda bm: bm.pool.ref.__setitem__(bm.block_table(1)[0], 2), "has ref 2 but 1 owners"),
    (lambda bm: bm.pool.cached.__setitem__(b"x" * 16, 0), "does not carry its hash"),
    (lambda bm: bm._tables[1].append(bm.block_table(1)[0]), "holds a block twice"),
])
def test_the_invariant_check_catches_corruption(corrupt, message):
    bm = BlockManager(6, 4)
    bm.allocate(1, 3)
    bm.check_invariants()
    corrupt(bm)
    with pytest.raises(BlockInvariantError, match=message):
        bm.check_invariants()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="num_new_tokens"):
        BlockManager(2, 16).allocate(0, -1)


def test_trim_returns_the_blocks_past_the_kept_tokens():
    bm = BlockManager(6, 4)
    bm.allocate(1, 5)
    bm.allocate(1, 6)  # 11 tokens: 3 blocks
    bm.trim(1, 5)
    assert bm.num_tokens(1) == 5 and len(bm.block_table(1)) == 2 and bm.num_free_blocks == 4
    bm.trim(1, 0)
    assert bm.has(1) and bm.block_table(1) == [] and bm.num_free_blocks == 6
    bm.check_invariants()
    bm.trim(2, 0)  # unknown: nothing to do
    with pytest.raises(ValueError, match="cannot trim"):
        bm.trim(1, 1)


def test_append_slot_is_allocate_one():
    """The decode fast path reserves exactly what ``allocate(seq, 1)`` would."""
    fast, slow = BlockManager(6, 4), BlockManager(6, 4)
    for bm in (fast, slow):
        bm.allocate(0, 3)
        bm.allocate(1, 4)
    for _ in range(9):  # crosses block boundaries until the pool runs dry
        for seq in (0, 1):
            ok = fast.append_slot(seq)
            assert ok == (slow.allocate(seq, 1) is AllocStatus.OK)
            assert fast.block_table(seq) == slow.block_table(seq)
            assert fast.num_tokens(seq) == slow.num_tokens(seq)
    assert fast.num_free_blocks == 0
    assert fast.append_slot(7) is False  # unknown sequence, no free block: the slow path
    fast.check_invariants()
