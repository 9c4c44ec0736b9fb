"""Paged attention over an FP8 (e4m3) KV cache, on CPU: the torch path (``reference``;
``gather`` needs CUDA, tests/worker/attention/test_gpu_triton.py) and the Triton kernel
under the interpreter, against the float64 / fp32 truth computed on the *dequantized* K/V (both
see the same values, so the tolerance is tight), and against the unquantized K/V
within e4m3's error. Also: which backends an FP8 cache may select, and the kernel's
start-up self-check over an FP8 cache."""

from __future__ import annotations

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
from worker.core.config import ConfigError, EngineConfig
from worker.generate.generation import GenerationSettings
from worker.quant.kv import FP8_E4M3, dequantize, quantize

SCALE = 64 ** -0.5  # the usual 1/sqrt(d): scores of realistic spread
needs_triton = pytest.mark.skipif(not tp.triton_available(),
                                  reason="needs triton (and TRITON_INTERPRET=1 without CUDA)")


def _scales(kv_heads, seed, size=0.02):
    """[1, 2, Hkv] K and V scales that differ by head (values reach ~ +-200 in e4m3)."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(1, 2, kv_heads, generator=g)) * size


def _round_trip(x, scale):  # [L, Hkv, D] -> what an FP8 cache gives back
    return dequantize(quantize(x, scale), scale, x.dtype)


def _assert_within_fp8_error(got, unquantized):
    """e4m3 rounds each K/V element by at most 1/16 of itself (3 mantissa bits), about 3%
    RMS on N(0, 1) data; the attention output's relative RMS error measured 2.8-3.3% on
    these cases. Below 1/16, and not zero: the cache did quantize."""
    rel = ((got.double() - unquantized.double()).norm() / unquantized.double().norm()).item()
    assert 2e-3 < rel < 1 / 16, rel


BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads,window,softcap", [
    (4, 2, None, None), (8, 1, 9, None), (4, 4, None, 1.5)])
def test_chunked_fp8_cache_matches_dense_truth_on_dequantized_kv(backend, heads, kv_heads,
                                                                 window, softcap):
    """Sequences written through ``PagedContext.attend`` (the cache-write op quantizes)
    in random chunks: the outputs equal dense attention over the round-tripped K/V to
    fp32 accuracy, and differ from the unquantized truth by e4m3's error only."""
    rng = np.random.default_rng(heads + kv_heads)
    seqs = random_sequences([5, 40, 17], kv_heads, rng, head_dim=64, heads=heads)
    scales = _scales(kv_heads, heads)
    outs = run_chunked(seqs, rng, window, SCALE, block_size=16, num_blocks=16, backend=backend,
                       softcap=softcap, cache_dtype=FP8_E4M3, kv_scales=scales)
    for (q, k, v), got in zip(seqs, outs):
        kd, vd = _round_trip(k, scales[0, 0]), _round_trip(v, scales[0, 1])
        want = dense_truth(q, kd, vd, SCALE, window, softcap)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
        _assert_within_fp8_error(got, dense_truth(q, k, v, SCALE, window, softcap))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_mixed_step_over_an_fp8_cache(backend, num_splits):
    """Decodes and a prefill chunk after cached prefixes in one call, GQA, per-head
    scales, forced split-KV for the kernel: equal to the reference on the dequantized
    cache (the definition), in the kernel's own fp32 arithmetic."""
    if backend == "reference" and num_splits:
        pytest.skip("split-KV is the kernel's")
    rng = np.random.default_rng(5)
    q, k, v, meta = random_step(rng, [0, 9, 47, 70], [1, 1, 1, 30], heads=8, kv_heads=2,
                                head_dim=64, block_size=16)
    scales = _scales(2, 3)[0]
    k8, v8 = (quantize(x.flatten(0, 1), s).view(x.shape) for x, s in zip((k, v), scales))
    assert k8.dtype == FP8_E4M3
    kd, vd = (dequantize(x, s, torch.float32) for x, s in zip((k8, v8), scales))
    want = pa.reference_paged(q, kd, vd, meta, SCALE, None)
    if backend == "reference":
        got = pa.reference_paged(q, k8, v8, meta, SCALE, None, k_scale=scales[0],
                                 v_scale=scales[1])
    else:
        got = tp.triton_paged(q, k8, v8, meta, SCALE, None, num_splits=num_splits,
                              k_scale=scales[0], v_scale=scales[1])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    _assert_within_fp8_error(got, pa.reference_paged(q, k, v, meta, SCALE, None))


@needs_triton
def test_kernel_refuses_fp8_without_scales():
    rng = np.random.default_rng(1)
    q, k, v, meta = random_step(rng, [3], [1], heads=4, kv_heads=2, head_dim=64, block_size=16)
    with pytest.raises(ValueError, match="e4m3"):
        tp.triton_paged(q, k.to(FP8_E4M3), v.to(FP8_E4M3), meta, SCALE, None)


@needs_triton
def test_self_check_over_an_fp8_cache_passes_and_catches_a_wrong_kernel(monkeypatch):
    kwargs = dict(num_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    assert tc.self_check("cpu", torch.float32, kv_dtype=FP8_E4M3, **kwargs) is None

    def ignores_v_scale(*args, v_scale=None, **kw):  # a kernel that forgot one scale
        return tp.triton_paged(*args, v_scale=torch.ones_like(v_scale), **kw)

    monkeypatch.setattr(tc, "triton_paged", ignores_v_scale)
    problem = tc.self_check("cpu", torch.float32, kv_dtype=FP8_E4M3, **kwargs)
    assert problem is not None and "fp8 KV=True" in problem


def test_fp8_cache_candidates_and_refusals(monkeypatch):
    """flash_attn and torch_paged read the page pool in q's dtype: never candidates
    over an FP8 cache, refused by name when asked for; triton falls back to gather."""
    monkeypatch.setattr(pa, "flash_attn_available", lambda: True)
    monkeypatch.setattr(pa, "torch_paged_available", lambda: True)
    monkeypatch.setattr(pa, "torch_varlen_available", lambda: True)
    monkeypatch.setattr(tp, "triton_available", lambda: True)
    plain = pa.paged_backend_candidates("cuda", torch.bfloat16, 256)
    assert plain == ["triton", "flash_attn", "torch_paged", "gather", "reference"]
    fp8 = pa.paged_backend_candidates("cuda", torch.bfloat16, 256, fp8_kv=True)
    assert fp8 == ["triton", "gather", "reference"]
    for name in ("flash_attn", "torch_paged"):
        with pytest.raises(ConfigError, match="paged_attention_backend.*kv_cache_dtype"):
            pa.check_paged_backend(name, "cuda", torch.bfloat16, 256, fp8_kv=True)
        pa.check_paged_backend(name, "cuda", torch.bfloat16, 256)  # fine without FP8
    chosen = pa.select_paged_backend("cuda", torch.bfloat16, 256, "auto",
                                     lambda name: "did not compile", fp8_kv=True)
    assert chosen == "gather"


def test_settings_refuse_flash_attn_with_an_fp8_cache():
    config = EngineConfig(model="m", paged_attention_backend="flash_attn",
                          kv_cache_dtype="fp8")
    with pytest.raises(ConfigError) as err:
        GenerationSettings.from_config(config, "cuda", torch.bfloat16, measured=False)
    assert err.value.field == "paged_attention_backend" and "kv_cache_dtype" in str(err.value)
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        GenerationSettings(max_num_batched_tokens=64, kv_cache_dtype="int4")
