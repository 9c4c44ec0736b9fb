"""KV cache sizing and slot writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.kv.cache import KVCache, KVCacheSpec, kv_bytes_from_report


def test_spec_from_a_model_config():
    cfg = SimpleNamespace(num_attention_heads=12, hidden_size=1536, num_hidden_layers=28,
                          num_key_value_heads=2)
    spec = KVCacheSpec.from_model_config(cfg, torch.bfloat16, block_size=16)
    assert (spec.num_kv_heads, spec.head_dim) == (2, 128)
    assert spec.bytes_per_token == 2 * 28 * 2 * 128 * 2  # Qwen2.5-1.5B: 28 KiB per token
    assert spec.bytes_per_block == spec.bytes_per_token * 16
    assert spec.num_blocks_for_bytes(spec.bytes_per_block * 10 + 5) == 10
    assert spec.num_blocks_for_tokens(33) == 3


def test_write_puts_tokens_at_their_slots():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=4, dtype=torch.float32,
                       block_size=4)
    cache = KVCache(spec, num_blocks=5, device="cpu")
    assert cache.num_bytes == spec.bytes_per_block * 5
    k, v = torch.randn(3, 3, 4), torch.randn(3, 3, 4)
    slots = torch.tensor([17, 2, 9])
    cache.write(1, k, v, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(cache.key(1)[s // 4, s % 4], k[i])
        assert torch.equal(cache.value(1)[s // 4, s % 4], v[i])
    assert cache.key(0).abs().sum() == 0  # other layers untouched
    assert int((cache.key(1).abs().sum((-1, -2)) > 0).sum()) == 3


def test_bytes_from_a_probe_report():
    gib = 1 << 30
    report = SimpleNamespace(total_bytes=80 * gib, used_bytes=10 * gib, utilization_cap=0.9,
                             margin_bytes=gib, activation_bytes_per_token=1000.0,
                             activation_fixed_bytes=2 * gib)
    want = 80 * gib * 0.9 - 10 * gib - gib - 2 * gib - 1000 * 4096
    assert kv_bytes_from_report(report, 4096) == int(want)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        kv_bytes_from_report(SimpleNamespace(total_bytes=None), 16)
