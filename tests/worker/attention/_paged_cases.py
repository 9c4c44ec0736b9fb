"""A harness for paged attention: whole sequences fed through the paged path in random
chunks, and the dense causal ground truth they must reproduce."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from worker.attention import paged as pa
from worker.kv.block_manager import AllocStatus, BlockManager
from worker.kv.cache import KVCache, KVCacheSpec

HEADS, HEAD_DIM = 4, 8


def dense_truth(q, k, v, scale, window, softcap=None):
    """[L, Hq, D] output of one whole sequence: causal (and windowed) softmax in float64,
    scores capped as ``softcap * tanh(s / softcap)`` when given."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i = torch.arange(q.shape[0])
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= i[None, :] > i[:, None] - window
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def random_sequences(lengths, kv_heads, rng, head_dim=HEAD_DIM, device="cpu",
                     dtype=torch.float32, heads=HEADS):
    """Per sequence (q [L, Hq, D], k [L, Hkv, D], v [L, Hkv, D])."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    return [tuple(torch.randn(n, h, head_dim, generator=g).to(device, dtype)
                  for h in (heads, kv_heads, kv_heads)) for n in lengths]


def random_step(rng, cached, new, *, heads, kv_heads, head_dim, block_size, device="cpu",
                dtype=torch.float32, num_layers=1, layer=0, block_major=False):
    """One step over a cache of random K/V: (q [T, Hq, D], k_cache, v_cache, meta).

    Sequence i has ``cached[i]`` tokens in the cache and brings ``new[i]`` (their K/V are
    in the cache already, as after ``KVCache.write``); block tables are scattered. The
    caches are layer views of ``[L, 2, N, bs, Hkv, D]`` like ``KVCache``'s, or with
    ``block_major`` of ``[N, bs, L, 2, Hkv, D]`` (views with non-contiguous strides).
    """
    sizes = [-(-(c + n) // block_size) for c, n in zip(cached, new)]
    num_blocks = sum(sizes) + 3
    order = [int(b) for b in rng.permutation(num_blocks)]
    tables = [order[sum(sizes[:i]): sum(sizes[: i + 1])] for i in range(len(sizes))]
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    shape = (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
    if block_major:
        shape = (num_blocks, block_size, num_layers, 2, kv_heads, head_dim)
    kv = torch.randn(shape, generator=g).to(device, dtype)
    k, v = (kv[:, :, layer, 0], kv[:, :, layer, 1]) if block_major else (kv[layer, 0], kv[layer, 1])
    q = torch.randn(sum(new), heads, head_dim, generator=g).to(device, dtype)
    return q, k, v, pa.build_metadata(tables, cached, new, block_size, device)


def _chunk_sizes(rng, live, seqs, done):
    """Per live sequence: a decode-sized 1 or a random prefill chunk of what is left."""
    sizes = []
    for i in live:
        left = len(seqs[i][0]) - done[i]
        sizes.append(int(min(left, rng.choice([1, rng.integers(1, left + 1)]))))
    return sizes


def run_chunked(seqs, rng, window, scale, *, block_size, num_blocks=64, backend="reference",
                softcap=None, cache_dtype=None, kv_scales=None):
    """Feed every sequence through ``PagedContext.attend`` in random chunks (several
    sequences per step, scattered blocks); returns each sequence's outputs [L, Hq, D].
    ``cache_dtype`` e4m3: an FP8 cache with ``kv_scales`` [1, 2, Hkv]."""
    q0, k0 = seqs[0][0], seqs[0][1]
    spec = KVCacheSpec(1, k0.shape[1], k0.shape[2], k0.dtype, block_size, cache_dtype)
    cache = KVCache(spec, num_blocks, q0.device)
    if kv_scales is not None:
        cache.set_scales(kv_scales)
    bm = BlockManager(num_blocks, block_size, order=rng.permutation(num_blocks))  # scattered
    done, outs = [0] * len(seqs), [torch.zeros_like(s[0]) for s in seqs]
    module = SimpleNamespace(layer_idx=0, is_causal=True)
    while any(d < len(s[0]) for d, s in zip(done, seqs)):
        live = [i for i, s in enumerate(seqs) if done[i] < len(s[0]) and rng.random() < 0.8]
        if not live:
            continue
        counts = _chunk_sizes(rng, live, seqs, done)
        for i, c in zip(live, counts):
            assert bm.allocate(i, c) is AllocStatus.OK
        meta = pa.build_metadata([bm.block_table(i) for i in live], [done[i] for i in live],
                                 counts, block_size, q0.device,
                                 with_context_slots=backend == "gather")
        want = np.concatenate([bm.slot_mapping(i, done[i], c) for i, c in zip(live, counts)])
        assert meta.slot_mapping.tolist() == want.tolist()
        pick = [slice(done[i], done[i] + c) for i, c in zip(live, counts)]
        q, k, v = (torch.cat([seqs[i][j][p] for i, p in zip(live, pick)]) for j in range(3))
        out, weights = _attend(cache, meta, backend, module, q, k, v, scale, window, softcap)
        assert weights is None and out.shape == (1, q.shape[0], q.shape[1], q.shape[2])
        cu = meta.host_cu_seqlens_q
        for n, (i, p) in enumerate(zip(live, pick)):
            outs[i][p] = out[0, cu[n]: cu[n + 1]]
            done[i] = p.stop
    bm.check_invariants()
    return outs


def _attend(cache, meta, backend, module, q, k, v, scale, window, softcap=None):
    """``PagedContext.attend`` for a registered backend; for ``"triton"`` before
    worker.attention.paged registers it, the same write-then-attend on the kernel."""
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    if backend in pa._BACKENDS:
        return pa.PagedContext(cache, meta, backend).attend(
            module, qt, kt, vt, None, scaling=scale, sliding_window=window, softcap=softcap)
    from worker.attention.triton_paged import triton_paged

    assert backend == "triton", backend
    layer = module.layer_idx
    cache.write(layer, k, v, meta.slot_mapping)
    scales = cache.layer_scales(layer) if cache.scales is not None else (None, None)
    out = triton_paged(qt[0].transpose(0, 1), cache.key(layer), cache.value(layer), meta,
                       scale, window, softcap=softcap, k_scale=scales[0], v_scale=scales[1])
    return out.unsqueeze(0), None
