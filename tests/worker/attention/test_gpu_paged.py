"""The CUDA paged-attention backends against the dense ground truth (skipped without a
GPU). Each backend runs only where ``select_paged_backend`` could pick it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.worker.attention._paged_cases import dense_truth, random_sequences, run_chunked
from worker.attention import paged as pa

pytestmark = pytest.mark.gpu


def _available(backend: str) -> bool:
    if backend == "flash_attn":
        return importlib.util.find_spec("flash_attn") is not None
    if backend == "torch_paged":
        return pa.torch_paged_available()
    return True  # gather: torch >= 2.10 (the project's floor)


@pytest.mark.parametrize("backend,block_size", [("gather", 16), ("gather", 256),
                                                ("torch_paged", 256), ("flash_attn", 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, 7)])
@pytest.mark.parametrize("seed", range(3))
def test_cuda_backend_matches_dense_truth(backend, block_size, dtype, kv_heads, window, seed):
    if not _available(backend):
        pytest.skip(f"{backend} is not available with this torch / flash-attn")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=int(rng.integers(1, 6))).tolist()
    seqs = random_sequences(lengths, kv_heads, rng, head_dim=64, device="cuda", dtype=dtype)
    scale = 0.11
    num_blocks = sum(-(-n // block_size) for n in lengths) + 4
    outs = run_chunked(seqs, rng, window, scale, block_size=block_size,
                       num_blocks=num_blocks, backend=backend)
    for (q, k, v), got in zip(seqs, outs):
        want = dense_truth(q, k, v, scale, window)
        torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gather_agrees_with_the_reference_on_cuda(dtype):
    rng = np.random.default_rng(0)
    lengths = [5, 130, 1, 64]
    seqs = random_sequences(lengths, 2, rng, head_dim=64, device="cuda", dtype=dtype)
    ref = run_chunked(seqs, np.random.default_rng(1), None, 0.125, block_size=16,
                      num_blocks=32, backend="reference")
    got = run_chunked(seqs, np.random.default_rng(1), None, 0.125, block_size=16,
                      num_blocks=32, backend="gather")
    for a, b in zip(ref, got):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_auto_selection_on_cuda():
    """Our Triton kernel first (it passes its self-check here), then the block-table
    kernels at block size 256, then the gather path."""
    from worker.attention.triton_paged import triton_available

    checked = []

    def check(name):
        checked.append(name)
        return None

    first = "triton" if triton_available() else None
    assert pa.select_paged_backend("cuda", torch.bfloat16, 16, self_check=check) == \
        (first or "gather")
    assert checked == (["triton"] if first else [])
    block_table_kernel = _available("flash_attn") or pa.torch_paged_available()
    want = ("flash_attn" if _available("flash_attn") else "torch_paged") \
        if block_table_kernel else "gather"
    assert pa.select_paged_backend("cuda", torch.bfloat16, 256,
                                   self_check=lambda name: "failed") == want
