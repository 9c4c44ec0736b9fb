"""Generation settings: EngineConfig fields, their resolution, KV cache sizing on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.core.config import ConfigError, EngineConfig
from worker.generate.generation import (
    GEN_MEASURED_STEP_TOKENS,
    GenerationSettings,
    resolve_num_kv_blocks,
)
from worker.kv.cache import KVCacheSpec


@pytest.mark.parametrize("field,value", [("kv_block_size", 0), ("num_kv_blocks", 0),
                                         ("max_num_running_seqs", 0), ("max_prefill_chunk", -1),
                                         ("num_kv_blocks", 2.5)])
def test_engine_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError) as info:
        EngineConfig(model="m", **{field: value})
    assert info.value.field == field and f"EngineConfig.{field}" in str(info.value)


def test_running_seqs_must_fit_one_step():
    with pytest.raises(ConfigError) as info:
        GenerationSettings(max_num_batched_tokens=32, max_num_running_seqs=64)
    assert info.value.field == "max_num_running_seqs"


def _resolved(**fields):
    return EngineConfig(model="m", max_num_batched_tokens=fields.pop("budget", 65536),
                        **fields)


def test_from_config():
    cpu = GenerationSettings.from_config(_resolved(), "cpu", torch.float32, measured=False)
    assert cpu.kv_block_size == 16 and cpu.max_num_batched_tokens == 65536
    measured = GenerationSettings.from_config(_resolved(), "cuda", torch.bfloat16, measured=True)
    assert measured.max_num_batched_tokens == GEN_MEASURED_STEP_TOKENS
    explicit = GenerationSettings.from_config(_resolved(kv_block_size=32, max_prefill_chunk=512,
                                                        max_num_running_seqs=8), "cpu",
                                              torch.float32, measured=False)
    assert (explicit.kv_block_size, explicit.max_prefill_chunk,
            explicit.max_num_running_seqs) == (32, 512, 8)


def test_cpu_kv_blocks():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                       block_size=16)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    settings = GenerationSettings(max_num_batched_tokens=64, max_num_running_seqs=4)
    # every running sequence at full length: 4 * ceil(100 / 16) blocks, well under 1 GiB
    assert resolve_num_kv_blocks(settings, spec, cpu, None, 100) == 4 * 7
    big = KVCacheSpec(num_layers=80, num_kv_heads=8, head_dim=128, dtype=torch.float32,
                      block_size=16)  # 640 KiB per token: 1 GiB caps it
    want = (1 << 30) // big.bytes_per_block
    assert resolve_num_kv_blocks(settings, big, cpu, None, 100_000) == want
    fixed = GenerationSettings(max_num_batched_tokens=64, max_num_running_seqs=4,
                               num_kv_blocks=3)
    assert resolve_num_kv_blocks(fixed, spec, cpu, None, 100) == 3
