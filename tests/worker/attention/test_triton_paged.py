"""The Triton paged-attention kernel against its twin (``reference_paged``) and the dense
ground truth, on CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).
Shapes stay tiny: the interpreter runs every program in Python."""

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

pytestmark = pytest.mark.skipif(not tp.triton_available(),
                                reason="needs triton (and TRITON_INTERPRET=1 without CUDA)")

SCALE = 0.37  # not 1/sqrt(d): the scale must be honoured
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _reference(q, k, v, meta, window, scale=SCALE):
    return pa.reference_paged(q.float(), k.float(), v.float(), meta, scale, window)


def _check(q, k, v, meta, window, tol=None, **kwargs):
    got = tp.triton_paged(q, k, v, meta, SCALE, window, **kwargs)
    assert got.shape == q.shape and got.dtype == q.dtype
    tol = tol or dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.float(), _reference(q, k, v, meta, window), **tol)
    return got


# (heads, kv_heads): GQA ratios 1, 4, 7 and MQA
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window", [
    (4, 4, 64, 16, None), (8, 2, 80, 32, None), (7, 1, 64, 16, 9), (4, 1, 80, 16, None)])
def test_random_chunkings_match_dense_attention(heads, kv_heads, head_dim, block_size, window):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    seqs = random_sequences([5, 40, 17], kv_heads, rng, head_dim=head_dim, heads=heads)
    outs = run_chunked(seqs, rng, window, SCALE, block_size=block_size, num_blocks=16,
                       backend="triton")
    for (q, k, v), got in zip(seqs, outs):
        torch.testing.assert_close(got.double(), dense_truth(q, k, v, SCALE, window),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("window", [None, 9])
def test_softcapped_chunkings_match_dense_attention(backend, window):
    """Gemma 2's cap (scores as c * tanh(s / c)), small enough to bite, on both the
    kernel and its twin, against the float64 truth; without the cap the truth differs."""
    rng = np.random.default_rng(7)
    seqs = random_sequences([5, 40, 17], 2, rng, head_dim=64, heads=4)
    outs = run_chunked(seqs, rng, window, 1.0, block_size=16, num_blocks=16,
                       backend=backend, softcap=1.5)
    for (q, k, v), got in zip(seqs, outs):
        want = dense_truth(q, k, v, 1.0, window, softcap=1.5)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    q, k, v = seqs[1]
    capped = dense_truth(q, k, v, 1.0, window, softcap=1.5)
    assert (dense_truth(q, k, v, 1.0, window) - capped).abs().max() > 0.05


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window", [
    (4, 4, 64, 16, None), (8, 2, 64, 32, None), (7, 1, 80, 16, None), (4, 1, 64, 32, 20),
    (8, 2, 80, 16, 7)])
def test_mixed_step_matches_reference(heads, kv_heads, head_dim, block_size, window):
    """Decodes and prefill chunks after cached prefixes, in one launch; one chunk spans
    several q blocks (BLOCK_Q = 64 // QPK) and several key tiles."""
    rng = np.random.default_rng(block_size + heads)
    cached, new = [0, 9, 3 * block_size - 1, 70, 0, 5], [1, 1, 1, 30, 21, 1]
    q, k, v, meta = random_step(rng, cached, new, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, block_size=block_size)
    _check(q, k, v, meta, window)


@pytest.mark.parametrize("block_size", [16, 32])
def test_contexts_ending_on_and_one_past_a_block_boundary(block_size):
    rng = np.random.default_rng(block_size)
    b = block_size
    cached, new = [b - 1, b, 2 * b - 1, 2 * b - 3, 2 * b - 4], [1, 1, 1, 3, 5]
    q, k, v, meta = random_step(rng, cached, new, heads=4, kv_heads=2, head_dim=64,
                                block_size=b)
    assert sorted(set(meta.host_seqlens_k.tolist())) == [b, b + 1, 2 * b, 2 * b + 1]
    _check(q, k, v, meta, None)


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (8, 2, 11), (7, 1, None)])
def test_bfloat16_matches_reference(heads, kv_heads, window):
    rng = np.random.default_rng(7)
    q, k, v, meta = random_step(rng, [0, 33, 50], [1, 1, 20], heads=heads, kv_heads=kv_heads,
                                head_dim=64, block_size=16, dtype=torch.bfloat16)
    _check(q, k, v, meta, window, tol=BF16_TOL)


@pytest.mark.parametrize("decode_only,num_splits", [(True, 2), (True, 4), (True, 16),
                                                     (False, 3), (False, 4)])
def test_split_kv_matches_reference(decode_only, num_splits):
    """Forced splits, more of them than key tiles too (16 splits over <= 3 tiles: empty
    splits write nothing but a -inf max), on decode-only and mixed steps."""
    rng = np.random.default_rng(num_splits)
    cached, new = [150, 3, 64, 31], [1, 1, 1, 1] if decode_only else [1, 12, 1, 1]
    q, k, v, meta = random_step(rng, cached, new, heads=4, kv_heads=2, head_dim=64,
                                block_size=16)
    _check(q, k, v, meta, None, num_splits=num_splits)
    _check(q, k, v, meta, 40, num_splits=num_splits)


def test_split_kv_bfloat16():
    rng = np.random.default_rng(3)
    q, k, v, meta = random_step(rng, [200, 17], [1, 1], heads=7, kv_heads=1, head_dim=80,
                                block_size=32, dtype=torch.bfloat16)
    _check(q, k, v, meta, None, tol=BF16_TOL, num_splits=4)


@pytest.mark.parametrize("block_major", [False, True])
def test_cache_views_and_strided_query(block_major):
    """Layer views of a multi-layer cache (storage offset; with ``block_major`` also
    non-contiguous strides) and a transposed query view like ``PagedContext.attend``'s."""
    rng = np.random.default_rng(11)
    q, k, v, meta = random_step(rng, [0, 20, 40], [1, 1, 9], heads=4, kv_heads=2,
                                head_dim=64, block_size=16, num_layers=3, layer=1,
                                block_major=block_major)
    assert k.storage_offset() > 0 and k.is_contiguous() != block_major
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_strided.is_contiguous()
    _check(q_strided, k, v, meta, None)


def test_decode_grid_and_general_grid_agree():
    """A decode-only step runs on the one-program-per-sequence grid; told it is mixed
    (max_seqlen_q 2) it takes the binary-search grid: same result."""
    rng = np.random.default_rng(5)
    q, k, v, meta = random_step(rng, [30, 0, 63, 16], [1, 1, 1, 1], heads=7, kv_heads=1,
                                head_dim=64, block_size=16)
    decode = _check(q, k, v, meta, None)
    general = tp.triton_paged(q, k, v, dataclasses.replace(meta, max_seqlen_q=2), SCALE, None)
    torch.testing.assert_close(general, decode, atol=1e-6, rtol=1e-6)


def test_reads_no_host_metadata():
    """The launcher decides from shapes and max_seqlen_q only (CUDA-graph safe): it works
    with every host-side field of the metadata removed, padding sequences included."""
    rng = np.random.default_rng(2)
    q, k, v, meta = random_step(rng, [5, 40, 0, 0], [1, 1, 0, 0], heads=4, kv_heads=1,
                                head_dim=64, block_size=16)
    bare = dataclasses.replace(meta, host_cu_seqlens_q=None, host_seqlens_k=None,
                               max_seqlen_k=None, slot_mapping=None, cu_seqlens_k=None)
    got = tp.triton_paged(q, k, v, bare, SCALE, None, num_splits=2)
    real = dataclasses.replace(meta, block_tables=meta.block_tables[:2],
                               host_cu_seqlens_q=meta.host_cu_seqlens_q[:3],
                               host_seqlens_k=meta.host_seqlens_k[:2])
    torch.testing.assert_close(got, _reference(q, k, v, real, None), atol=2e-5, rtol=2e-5)


def test_self_check_passes_on_cpu():
    assert tc.self_check("cpu", torch.float32, num_heads=4, num_kv_heads=2, head_dim=64,
                         block_size=16) is None


def test_self_check_reports_instead_of_raising():
    message = tc.self_check("cpu", torch.float32, num_heads=5, num_kv_heads=2, head_dim=64,
                            block_size=16)
    assert isinstance(message, str) and "Hq % Hkv" in message


def test_heuristics():
    assert tp.kernel_config(12, 2, 128, decode_only=True) == (16, 2, 64, 128)
    assert tp.kernel_config(28, 4, 80, decode_only=False) == (64, 9, 64, 128)
    assert tp.kernel_config(64, 1, 256, decode_only=True) == (64, 1, 32, 256)
    assert tp.kernel_config(12, 2, 128, decode_only=False, itemsize=4) == (64, 10, 32, 128)
    assert tp.choose_num_splits(4, True, 132) == 64
    assert tp.choose_num_splits(8, True, 132) == 32
    assert tp.choose_num_splits(64, True, 132) == 4
    assert tp.choose_num_splits(200, True, 132) == 1
    assert tp.choose_num_splits(4, False, 132) == 1
    assert tp.choose_num_splits(4, True, 132, window=256, tile=64) == 4
