"""The FP8 KV cache: the cache-write op quantizes (saturating), the block count for the
same bytes grows by the itemsize ratio and admission sees it, scales come from the
checkpoint or one calibration forward, and generation runs end to end with prefix
caching, close to the unquantized engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.factories import token_lists
from worker.core.config import ConfigError
from worker.generate import generation
from worker.generate.generation import (
    Generation,
    GenerationSettings,
    plan_kv,
    resolve_num_kv_blocks,
)
from worker.generate.kv_scales import calibrate_kv_scales
from worker.generate.sampling import SamplingParams
from worker.kv.cache import KVCache, KVCacheSpec
from worker.quant.kv import FP8_E4M3, FP8_MAX, checkpoint_scales, dequantize, quantize

FP8 = FP8_E4M3


def test_write_quantizes_per_head_and_saturates():
    spec = KVCacheSpec(2, 3, 4, torch.float32, 4, FP8)
    cache = KVCache(spec, num_blocks=5, device="cpu")
    assert cache.kv.dtype == FP8 and cache.num_bytes == spec.bytes_per_block * 5
    scales = torch.tensor([[[0.5, 0.1, 0.01], [1.0, 0.2, 0.02]]] * 2)
    cache.set_scales(scales)
    k, v = torch.randn(3, 3, 4), torch.randn(3, 3, 4)
    k[0, 2, 0] = 1e6  # far beyond 448 * 0.01: saturates, never NaN
    slots = torch.tensor([17, 2, 9])
    cache.write(1, k, v, slots)
    ks, vs = cache.layer_scales(1)
    for i, s in enumerate(slots.tolist()):
        stored_k = cache.key(1)[s // 4, s % 4]
        assert torch.equal(stored_k.view(torch.uint8), quantize(k[i:i + 1], ks)[0].view(torch.uint8))
        back = dequantize(cache.value(1)[s // 4, s % 4], vs, torch.float32)
        assert ((back - v[i]).abs() <= v[i].abs() / 16 + 2 ** -9 * vs[:, None]).all()
    assert dequantize(cache.key(1)[4, 1], ks, torch.float32)[2, 0] == FP8_MAX * 0.01
    assert not torch.isnan(cache.kv.float()).any()
    assert cache.key(0).float().abs().sum() == 0  # other layers untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bytes_hold_itemsize_times_the_blocks(dtype):
    """bytes_per_token counts 1 byte per element; resolve_num_kv_blocks (the memory plan)
    derives exactly itemsize x the blocks for the same budget: 4x an fp32, 2x a bf16."""
    auto = KVCacheSpec(2, 2, 16, dtype, 16)
    fp8 = KVCacheSpec(2, 2, 16, dtype, 16, FP8)
    assert fp8.bytes_per_token * dtype.itemsize == auto.bytes_per_token
    assert KVCacheSpec(2, 2, 16, dtype, 16, dtype) == auto  # "auto" spelled out: the same
    settings = GenerationSettings(max_num_batched_tokens=512)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    blocks = [resolve_num_kv_blocks(settings, s, cpu, None, max_model_len=1 << 24)
              for s in (auto, fp8)]
    assert blocks[1] == dtype.itemsize * blocks[0] > 0


def test_admission_capacity_grows_with_an_fp8_cache(tiny_model, make_engine, monkeypatch):
    """The engine's capacity_tokens (what admission and the router lease against) and the
    planned blocks follow the FP8 cache: 4x for this fp32 model under the same cap."""
    monkeypatch.setattr(generation, "CPU_KV_CACHE_BYTES", 1 << 16)  # the cap binds
    kw = dict(kv_block_size=16, max_num_batched_tokens=256, max_num_running_seqs=8)
    auto = make_engine(tiny_model("llama"), **kw)
    fp8 = make_engine(tiny_model("llama"), kv_cache_dtype="fp8", **kw)
    assert fp8.memory.kv.spec.storage_dtype == FP8
    assert fp8.memory.kv.num_blocks == 4 * auto.memory.kv.num_blocks
    assert fp8.capacity_tokens == 4 * auto.capacity_tokens == fp8.memory.kv.num_blocks * 16


def _settings(**kw):
    return GenerationSettings(max_num_batched_tokens=256, max_num_running_seqs=4,
                              kv_block_size=16, num_kv_blocks=32, **kw)


def test_checkpoint_scales_are_used_and_validated(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), kv_block_size=16, max_num_batched_tokens=256)
    model = engine.runner.model
    model.kv_cache_scales = {0: (0.05, 0.02), 1: (0.03, 0.04)}
    try:
        kv = plan_kv(model, engine.device, _settings(kv_cache_dtype="fp8"), max_model_len=128)
        want = torch.tensor([[[0.05] * 2, [0.02] * 2], [[0.03] * 2, [0.04] * 2]])
        torch.testing.assert_close(kv.kv_scales, want)
        gen = Generation(model, engine.device, _settings(kv_cache_dtype="fp8"), kv,
                         max_model_len=128, vocab_size=engine.spec.vocab_size)
        assert gen.kv_scales_source == "checkpoint"
        torch.testing.assert_close(gen.cache.scales, want)
        model.kv_cache_scales = {0: (0.05, 0.02), 1: (0.03, float("nan"))}
        with pytest.raises(ConfigError, match="kv_cache_dtype.*layer 1"):
            plan_kv(model, engine.device, _settings(kv_cache_dtype="fp8"), max_model_len=128)
    finally:
        del model.kv_cache_scales
    assert checkpoint_scales(model, 2, 2) is None
    with pytest.raises(ConfigError, match="tensor_parallel_size"):  # no scales, TP: refused
        plan_kv(model, engine.device, _settings(kv_cache_dtype="fp8"), max_model_len=128,
                agree=lambda n: n)


def test_calibrated_scales_are_the_amax_of_the_calibration_kv(tiny_model, make_engine):
    """Independently of the paged path: K after RoPE and V straight from v_proj, over the
    same tokens, give the same per-layer, per-head maxima (times headroom / 448)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from worker.generate.kv_scales import calibration_tokens
    from worker.quant.kv import CALIBRATION_HEADROOM

    engine = make_engine(tiny_model("llama"), kv_block_size=16, max_num_batched_tokens=256)
    model, vocab = engine.runner.model, engine.spec.vocab_size
    spec = KVCacheSpec.for_model(model, torch.float32, 16, FP8)
    scales = calibrate_kv_scales(model, spec, torch.device("cpu"), None, vocab)
    ids = torch.tensor(calibration_tokens(None, vocab))[None]
    seen = {}
    hooks = [layer.input_layernorm.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=False)
        cos, sin = model.model.rotary_emb(seen[0], torch.arange(ids.shape[1])[None])
        for i, layer in enumerate(model.model.layers):
            attn, h = layer.self_attn, seen[i]
            k = attn.k_proj(h).view(1, -1, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, -1, spec.num_kv_heads, spec.head_dim)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            want_k = k.abs().amax(dim=(0, 2, 3)) * CALIBRATION_HEADROOM / FP8_MAX
            want_v = v.abs().amax(dim=(0, 1, 3)) * CALIBRATION_HEADROOM / FP8_MAX
            torch.testing.assert_close(scales[i, 0], want_k, rtol=1e-5, atol=0)
            torch.testing.assert_close(scales[i, 1], want_v, rtol=1e-5, atol=0)
    for hook in hooks:
        hook.remove()


GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
CLEAR_MARGIN = 0.25  # top-2 logprob gap of the reference beyond which fp8 must agree
LOGPROB_TOL = 0.15  # |logprob(fp8) - logprob(auto)| on agreeing tokens


def test_generation_end_to_end_with_prefix_caching(tiny_model, make_engine):
    """Two requests sharing a 4-block prefix on an FP8 engine: the second takes the
    prefix from the cache (fp8 blocks reused as stored) and generates exactly what it
    does with the cache off; against the unquantized engine, tokens agree wherever the
    reference's top-2 gap is clear, with logprobs within LOGPROB_TOL (measured: <= 0.08
    with gaps of 0.001-0.12 where they first parted)."""
    kw = dict(kv_block_size=16, max_num_batched_tokens=256, max_num_running_seqs=4)
    system = token_lists([64], seed=30)[0]
    prompts = [system + [7, 8, 9], system + [5, 6], *token_lists([20, 33], seed=5)]
    fp8 = make_engine(tiny_model("llama"), kv_cache_dtype="fp8", **kw)
    got = [fp8.generate([p], GREEDY)[0] for p in prompts]
    assert fp8._gen.kv_scales_source == "calibrated" and fp8._gen.cache.kv.dtype == FP8
    assert got[1].num_cached_tokens == 64 and fp8.stats.prefix_cache_hits > 0
    fresh = make_engine(tiny_model("llama"), kv_cache_dtype="fp8", enable_prefix_caching=False,
                        **kw).generate([prompts[1]], GREEDY)[0]
    assert fresh.num_cached_tokens == 0 and fresh.token_ids == got[1].token_ids
    for a, b in zip(fresh.logprobs, got[1].logprobs):
        assert abs(a.logprob - b.logprob) < 1e-4

    ref = make_engine(tiny_model("llama"), **kw)
    compared = 0
    for want, out in zip((ref.generate([p], GREEDY)[0] for p in prompts), got):
        assert len(out.token_ids) == GREEDY.max_tokens
        for w, o, lw, lo in zip(want.token_ids, out.token_ids, want.logprobs, out.logprobs):
            clear = lw.top[0][1] - lw.top[1][1] > CLEAR_MARGIN
            if w != o:
                assert not clear, (want.token_ids, out.token_ids)
                break  # the contexts differ from here on
            assert abs(lw.logprob - lo.logprob) < LOGPROB_TOL
            compared += 1
    assert compared >= 2 * GREEDY.max_tokens  # the comparison covered real ground
