"""The Triton paged-attention kernel on CUDA (skipped without a GPU): real model shapes
against ``reference_paged`` and the dense truth, long split-KV decodes, the start-up
self-check, and replay inside a CUDA graph with new metadata."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.worker.attention._paged_cases import (
    dense_truth,
    random_sequences,
    random_step,
    run_chunked,
)
from worker.attention import paged as pa
from worker.attention import triton_check as tc
from worker.attention import triton_paged as tp

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.float32: dict(atol=2e-3, rtol=2e-3)}
# (heads, kv_heads, head_dim): Qwen2.5-1.5B, Qwen2.5-7B, Llama-3-8B, D=80 / 96 / 256, MQA
SHAPES = [(12, 2, 128), (28, 4, 128), (32, 8, 128), (32, 32, 80), (16, 2, 96), (8, 4, 256),
          (16, 1, 64)]


def _reference(q, k, v, meta, scale, window):
    return pa.reference_paged(q.float(), k.float(), v.float(), meta, scale, window)


# Each distinct configuration compiles its own kernel (about a second each on the GPU),
# and the suite has one call of a few minutes: every shape once in bf16 at block 16, then
# the other dtypes, block sizes and windows on a few shapes.
MIXED = ([(torch.bfloat16, *shape, 16, None) for shape in SHAPES]
         + [(torch.float16, 12, 2, 128, 32, 100), (torch.bfloat16, 28, 4, 128, 256, None),
            (torch.bfloat16, 32, 32, 80, 32, 100), (torch.float16, 8, 4, 256, 16, 64)])


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size,window", MIXED)
def test_mixed_step_matches_reference(dtype, heads, kv_heads, head_dim, block_size, window):
    rng = np.random.default_rng(heads + head_dim)
    cached = [0, 1, 15, 16, 255, 700, 1023, 0, 300]
    new = [1, 1, 1, 1, 1, 1, 1, 333, 130]
    q, k, v, meta = random_step(rng, cached, new, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, block_size=block_size, device="cuda",
                                dtype=dtype)
    scale = head_dim ** -0.5
    got = tp.triton_paged(q, k, v, meta, scale, window)
    torch.testing.assert_close(got.float(), _reference(q, k, v, meta, scale, window),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [SHAPES[0], SHAPES[1], SHAPES[3]])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_step_any_split_matches_reference(dtype, heads, kv_heads, head_dim, num_splits):
    rng = np.random.default_rng(7)
    cached = [0, 17, 511, 2000, 63, 64]
    q, k, v, meta = random_step(rng, cached, [1] * len(cached), heads=heads,
                                kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                                device="cuda", dtype=dtype)
    scale = head_dim ** -0.5
    got = tp.triton_paged(q, k, v, meta, scale, None, num_splits=num_splits)
    torch.testing.assert_close(got.float(), _reference(q, k, v, meta, scale, None), **TOL[dtype])


@pytest.mark.parametrize("num_splits", [None, 4])
def test_float32_uses_full_precision_dots(num_splits):
    rng = np.random.default_rng(3)
    q, k, v, meta = random_step(rng, [0, 40, 300], [1, 1, 70], heads=12, kv_heads=2,
                                head_dim=128, block_size=16, device="cuda",
                                dtype=torch.float32)
    got = tp.triton_paged(q, k, v, meta, 0.088, None, num_splits=num_splits)
    torch.testing.assert_close(got, _reference(q, k, v, meta, 0.088, None),
                               **TOL[torch.float32])


@pytest.mark.parametrize("heads,kv_heads", [(12, 2)])
@pytest.mark.parametrize("window", [None, 4096])
def test_batch_one_32k_context_split_kv(heads, kv_heads, window):
    rng = np.random.default_rng(1)
    q, k, v, meta = random_step(rng, [32767], [1], heads=heads, kv_heads=kv_heads,
                                head_dim=128, block_size=16, device="cuda",
                                dtype=torch.bfloat16)
    assert tp.choose_num_splits(kv_heads, True, tp._num_sms(q.device), window) > 1
    want = _reference(q, k, v, meta, 0.088, window)
    for splits in (None, 64):
        got = tp.triton_paged(q, k, v, meta, 0.088, window, num_splits=splits)
        torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, 7)])
@pytest.mark.parametrize("seed", range(1))
def test_random_chunkings_match_dense_truth(dtype, kv_heads, window, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=int(rng.integers(1, 6))).tolist()
    seqs = random_sequences(lengths, kv_heads, rng, head_dim=96, device="cuda", dtype=dtype,
                            heads=8)
    num_blocks = sum(-(-n // 16) for n in lengths) + 4
    outs = run_chunked(seqs, rng, window, 0.11, block_size=16, num_blocks=num_blocks,
                       backend="triton")
    for (q, k, v), got in zip(seqs, outs):
        want = dense_truth(q, k, v, 0.11, window)
        torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,block_size,window", [
    (torch.bfloat16, 12, 2, 128, 16, None), (torch.bfloat16, 28, 4, 128, 16, None),
    (torch.float16, 16, 1, 64, 256, 64)])
def test_self_check_on_cuda(dtype, heads, kv_heads, head_dim, block_size, window):
    assert tc.self_check("cuda", dtype, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, block_size=block_size, window=window) is None


def _static_decode_meta(meta, width):
    """The same step in the buffers a CUDA graph reads: block tables padded to ``width``
    columns, no host-side fields."""
    tables = torch.nn.functional.pad(meta.block_tables, (0, width - meta.block_tables.shape[1]))
    return dataclasses.replace(meta, block_tables=tables, host_cu_seqlens_q=None,
                               host_seqlens_k=None, max_seqlen_k=None)


@pytest.mark.parametrize("heads,kv_heads", [(12, 2), (28, 4)])
def test_cuda_graph_replay_with_new_metadata(heads, kv_heads):
    """Capture the launcher once for a decode-only batch of 8, then replay it with new
    sequence lengths and block tables copied into the same buffers: same as eager."""
    rng, width, bs, dtype = np.random.default_rng(0), 80, 16, torch.bfloat16
    q, k, v, meta = random_step(rng, [5, 900, 17, 300, 1200, 64, 0, 31], [1] * 8, heads=heads,
                                kv_heads=kv_heads, head_dim=128, block_size=bs,
                                device="cuda", dtype=dtype)
    static = _static_decode_meta(meta, width)
    q_static = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for _ in range(2):
            tp.triton_paged(q_static, k, v, static, 0.088, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = tp.triton_paged(q_static, k, v, static, 0.088, None)
    graph.replay()
    torch.testing.assert_close(out_static.float(), _reference(q, k, v, meta, 0.088, None),
                               **TOL[dtype])

    # a new step over the same cache: other lengths, other (valid) blocks
    num_blocks = k.shape[0]
    lengths = [1200, 2, 640, 15, 16, 999, 33, 260]
    tables = [rng.choice(num_blocks, -(-n // bs), replace=False).tolist() for n in lengths]
    new_meta = pa.build_metadata(tables, [n - 1 for n in lengths], [1] * 8, bs, "cuda")
    new_q = torch.randn_like(q)
    fresh = _static_decode_meta(new_meta, width)
    for buf, src in ((q_static, new_q), (static.block_tables, fresh.block_tables),
                     (static.seqlens_k, fresh.seqlens_k), (static.cu_seqlens_q,
                                                           fresh.cu_seqlens_q)):
        buf.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = tp.triton_paged(new_q, k, v, fresh, 0.088, None)
    torch.testing.assert_close(out_static, eager, atol=0, rtol=0)
    torch.testing.assert_close(out_static.float(), _reference(new_q, k, v, new_meta, 0.088, None),
                               **TOL[dtype])
