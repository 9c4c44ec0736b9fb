"""The FP8 KV cache on CUDA (skipped without a GPU): the Triton kernel reading e4m3 with
per-head scales (the kernel's fp8 -> bf16 / fp16 conversion and its scale folding, which
the interpreter cannot prove compiles), ``gather``'s dequantizing copy, the start-up
self-check, and an engine that picks ``triton``, captures its graphs and generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.worker.attention._paged_cases import random_step
from worker.attention import paged as pa
from worker.attention import triton_check as tc
from worker.attention import triton_paged as tp
from worker.quant.kv import FP8_E4M3, dequantize, quantize

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}
SHAPES = [(12, 2, 128), (28, 4, 128), (32, 8, 128), (32, 32, 80)]


def _fp8_step(dtype, heads, kv_heads, head_dim, block_size=16, with_context_slots=False):
    rng = np.random.default_rng(heads + head_dim)
    cached, new = [0, 1, 15, 16, 255, 700, 0, 300], [1, 1, 1, 1, 1, 1, 133, 30]
    q, k, v, meta = random_step(rng, cached, new, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, block_size=block_size, device="cuda",
                                dtype=dtype)
    if with_context_slots:
        meta = pa.build_metadata(*_tables(meta), block_size, "cuda", with_context_slots=True)
    g = torch.Generator().manual_seed(1)
    scales = [((0.5 + torch.rand(kv_heads, generator=g)) / 64).cuda() for _ in range(2)]
    k8, v8 = (quantize(x.flatten(0, 1), s).view(x.shape) for x, s in zip((k, v), scales))
    want = pa.reference_paged(q.float(), dequantize(k8, scales[0], torch.float32),
                              dequantize(v8, scales[1], torch.float32), meta,
                              head_dim ** -0.5, None)
    return q, k8, v8, scales, meta, want


def _tables(meta):
    lens, cu = meta.host_seqlens_k, meta.host_cu_seqlens_q
    new = np.diff(cu)
    bs = meta.block_size
    tables = [meta.block_tables[i, : -(-int(n) // bs)].tolist() for i, n in enumerate(lens)]
    return tables, (lens - new).tolist(), new.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_over_fp8_matches_reference_on_dequantized_kv(dtype, heads, kv_heads, head_dim,
                                                             num_splits):
    q, k8, v8, (ks, vs), meta, want = _fp8_step(dtype, heads, kv_heads, head_dim)
    got = tp.triton_paged(q, k8, v8, meta, head_dim ** -0.5, None, num_splits=num_splits,
                          k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


def test_gather_over_fp8_matches_reference():
    if not pa.torch_varlen_available():
        pytest.skip("needs torch varlen_attn")
    q, k8, v8, (ks, vs), meta, want = _fp8_step(torch.bfloat16, 12, 2, 128,
                                                with_context_slots=True)
    got = pa.gather_paged(q, k8, v8, meta, 128 ** -0.5, None, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_check_passes_over_fp8(dtype):
    assert tc.self_check("cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128,
                         block_size=16, kv_dtype=FP8_E4M3) is None


def test_engine_with_fp8_cache_uses_triton_and_graphs(tiny_model, make_engine):
    from tests.factories import token_lists
    from worker.generate.sampling import SamplingParams

    engine = make_engine(tiny_model("llama"), device="cuda", dtype="bfloat16",
                         kv_cache_dtype="fp8", kv_block_size=16, max_num_batched_tokens=512,
                         max_num_running_seqs=8, num_kv_blocks=64)
    system = token_lists([64], seed=30)[0]
    params = SamplingParams(temperature=0, max_tokens=8)
    first = engine.generate([system + [1, 2]], params)[0]
    second = engine.generate([system + [3]], params)[0]
    gen = engine.generation
    assert gen.backend == "triton" and gen.cache.kv.dtype == FP8_E4M3
    assert gen.graph_report is not None and gen.runner.num_graph_steps > 0
    assert second.num_cached_tokens == 64
    assert len(first.token_ids) == len(second.token_ids) == 8
