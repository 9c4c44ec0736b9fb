"""Prefix caching: greedy tokens are identical with the cache on and off (shared prefixes
of 0, 1, many and all full blocks; chunked and unchunked; preemption; an abort inside a
shared prefix), hits skip exactly the shared full blocks, eviction keeps the most
recently used chains, and the block pool's ref counts stay consistent throughout."""

from __future__ import annotations

import numpy as np
import pytest

from tests.factories import token_lists
from worker.generate.sampling import SamplingParams
from worker.kv.block_pool import BlockPool, chain_hashes, root_hash

BS = 4  # KV block size of these tests
GREEDY = SamplingParams(temperature=0, max_tokens=8)
SYSTEM = token_lists([40], seed=21)[0]  # 10 full blocks
TAILS = token_lists([1, 3, 4, 9, 13], seed=22)


def _prompts():
    """Prompts sharing 0, 1, many and all full blocks with SYSTEM (and each other)."""
    distinct = token_lists([5, 17], seed=23)
    return [
        SYSTEM + TAILS[0],  # the first of the family
        SYSTEM + TAILS[1],  # all 10 blocks shared
        SYSTEM[:4] + TAILS[2],  # 1 block shared
        SYSTEM[:28] + TAILS[3],  # 7 blocks shared
        list(SYSTEM),  # all of SYSTEM, a multiple of the block size: its last block recomputed
        SYSTEM + TAILS[4],
        *distinct,  # nothing shared
        SYSTEM[:3] + TAILS[0],  # less than one block shared: nothing
    ]


CONFIGS = {
    "chunk7": dict(max_num_batched_tokens=32, max_num_running_seqs=8, max_prefill_chunk=7),
    "unlimited": dict(max_num_batched_tokens=512, max_num_running_seqs=16),
    "preempt": dict(max_num_batched_tokens=32, max_num_running_seqs=8, max_prefill_chunk=8,
                    num_kv_blocks=28),
}


def _engine(make_engine, tiny_model, config, caching):
    return make_engine(tiny_model("qwen2"), kv_block_size=BS, enable_prefix_caching=caching,
                       **CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_outputs_identical_with_and_without_the_cache(config, tiny_model, make_engine):
    prompts = _prompts()
    plain = _engine(make_engine, tiny_model, config, False)
    cached = _engine(make_engine, tiny_model, config, True)
    # One batch (requests admitted in the same steps share nothing yet), then each prompt
    # again one at a time (each finds what the earlier ones left in the cache).
    want = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert [o.token_ids for o in cached.generate(prompts, GREEDY)] == want
    for prompt, expected in zip(prompts, want):
        assert cached.generate([prompt], GREEDY)[0].token_ids == expected
        cached.check_kv_invariants()
    stats = cached.stats
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries > stats.prefix_cache_hits
    assert plain.stats.prefix_cache_hits == 0 and plain.stats.prefix_cache_queries == 0
    if config == "preempt":
        assert sum(o.num_preemptions for o in cached.generate(prompts, GREEDY)) > 0


def test_a_hit_prefills_only_what_differs(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), kv_block_size=16, max_num_batched_tokens=512,
                         max_num_running_seqs=8)
    system = token_lists([100], seed=30)[0]  # 6 full blocks of 16 and 4 tokens
    first = engine.generate([system + [7, 8, 9]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    computed_before = engine.stats.num_tokens
    second = engine.generate([system + [5, 6]], GREEDY)[0]
    assert second.num_cached_tokens == 96
    prefill = len(system) + 2 - 96  # the rest of the prompt, computed in one step
    assert engine.stats.num_tokens - computed_before == prefill + GREEDY.max_tokens - 1
    want = make_engine(tiny_model("llama"), kv_block_size=16, max_num_batched_tokens=512,
                       enable_prefix_caching=False).generate([system + [5, 6]], GREEDY)[0]
    assert second.token_ids == want.token_ids


def test_eviction_keeps_the_most_recently_used_chains(tiny_model, make_engine):
    """A cache of 24 blocks: chains A then B (8 blocks each) are cached; a third request
    needs room, which comes from A's chain (released first: least recently used)."""
    engine = make_engine(tiny_model("llama"), kv_block_size=BS, num_kv_blocks=24,
                         max_num_batched_tokens=64, max_num_running_seqs=4)
    a, b, c = token_lists([33, 33, 60], seed=31)
    one = SamplingParams(temperature=0, max_tokens=1)
    engine.generate([a], one)
    engine.generate([b], one)
    evicted_before = engine.stats.prefix_cache_evictions
    engine.generate([c], one)  # 15 blocks: the 8 never-used ones, then A's
    assert engine.stats.prefix_cache_evictions > evicted_before
    assert engine.generate([b], one)[0].num_cached_tokens == 32  # B survived whole
    assert engine.generate([a], one)[0].num_cached_tokens < 32  # A's chain lost its head
    engine.check_kv_invariants()


def test_an_abort_inside_a_shared_prefix(tiny_model, make_engine):
    """B takes blocks A computed; A is aborted while both hold them: B is unaffected and
    every block ends free (or cached), with consistent ref counts at every step."""
    engine = make_engine(tiny_model("llama"), kv_block_size=BS, max_num_batched_tokens=16,
                         max_num_running_seqs=4, max_prefill_chunk=8)
    gen = engine.generation
    want = make_engine(tiny_model("llama"), kv_block_size=BS, max_num_batched_tokens=16,
                       max_num_running_seqs=4, enable_prefix_caching=False
                       ).generate([SYSTEM + TAILS[3]], GREEDY)[0]
    seq_a = gen.make_sequence(SYSTEM + TAILS[2], GREEDY)
    gen.submit(seq_a)
    for _ in range(3):  # A prefills 24 tokens: 6 full blocks registered
        engine.step()
    seq_b = gen.make_sequence(SYSTEM + TAILS[3], GREEDY)
    gen.submit(seq_b)
    while seq_b.num_cached_tokens is None:  # B waits while A computes the shared blocks
        engine.step()
    assert seq_b.num_cached_tokens == 40  # then takes all 10 of A's SYSTEM blocks
    assert not seq_a.finished
    shared = set(gen.blocks.block_table(seq_a.seq_id)) & set(gen.blocks.block_table(seq_b.seq_id))
    assert len(shared) == 10 and all(gen.blocks.pool.ref[blk] == 2 for blk in shared)
    assert engine.abort(seq_a.seq_id)
    engine.check_kv_invariants()
    assert all(gen.blocks.pool.ref[blk] == 1 for blk in shared)
    while not seq_b.finished:
        engine.step()
        engine.check_kv_invariants()
    assert seq_b.output_ids == want.token_ids
    assert gen.blocks.stats().num_used_blocks == 0


def test_chain_hashes_depend_on_every_earlier_token():
    root = root_hash("model-a")
    tokens = list(range(12))
    full = chain_hashes(tokens, 4, root, 0, 3)
    assert chain_hashes(tokens, 4, full[0], 1, 3) == full[1:]  # extended in pieces
    changed = chain_hashes([99] + tokens[1:], 4, root, 0, 3)
    assert all(x != y for x, y in zip(full, changed))  # a change in block 0 moves every hash
    assert chain_hashes(tokens, 4, root_hash("model-b"), 0, 3)[0] != full[0]  # salted


def test_pool_release_order_and_eviction():
    pool = BlockPool(6)
    first = pool.take_free(3)
    for i, blk in enumerate(first):
        assert pool.register(blk, bytes([i]) * 16)
    assert not pool.register(first[0], b"z" * 16)  # already hashed
    scratch = pool.take_free(1)  # unhashed
    pool.release(first)
    pool.release(scratch)
    order = list(pool.free)
    # unhashed first, then the never-used ones, then the chain's last block before its first
    assert order[0] == scratch[0]
    assert order.index(first[2]) < order.index(first[1]) < order.index(first[0])
    pool.share(first[0])  # a hit takes it off the free queue
    assert first[0] not in pool.free and pool.ref[first[0]] == 1
    taken = pool.take_free(5)  # everything free, evicting two hashed blocks
    assert pool.num_evictions == 2 and set(pool.cached.values()) == {first[0]}
    assert not pool.check([1 if b in taken or b == first[0] else 0 for b in range(6)])
    assert np.all(np.asarray(pool.ref) == 1)
