"""The paged KV cache's memory: one tensor for every layer's K and V blocks.

Layout (allocated once, never resized)::

    kv      [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]  storage dtype
    key(l)  kv[l, 0]   [num_blocks, block_size, num_kv_heads, head_dim]
    value(l) kv[l, 1]
    scales  [num_layers, 2, num_kv_heads] fp32   FP8 only (else None): K, V scale per head

The storage dtype is the model's (``kv_cache_dtype="auto"``) or e4m3 (``"fp8"``): then
``write`` quantizes and every reader dequantizes with ``scales`` (``worker.quant.kv``).
The scales live in one tensor at a fixed address, set in place before the first step
(``set_scales``), so a captured CUDA graph reads them wherever they came from.

A token in cache slot ``s`` sits at ``key(l).view(-1, H, D)[s]`` with
``s = block * block_size + offset`` (see ``worker.kv.block_manager``). The same layout is
what flash-attn's and torch's paged kernels take as their page pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from worker.quant.kv import is_fp8, quantize

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one token's KV across the model, and the block size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the compute dtype: what attention reads the cache as (the model's)
    block_size: int
    cache_dtype: torch.dtype | None = None  # what the cache stores; None: ``dtype``

    def __post_init__(self) -> None:
        if self.cache_dtype == self.dtype:  # one spelling of "as the model computes"
            object.__setattr__(self, "cache_dtype", None)

    @classmethod
    def from_model_config(cls, config, dtype: torch.dtype, block_size: int,
                          cache_dtype: torch.dtype | None = None) -> KVCacheSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype, block_size,
                   cache_dtype)

    @classmethod
    def for_model(cls, model, dtype: torch.dtype, block_size: int,
                  cache_dtype: torch.dtype | None = None) -> KVCacheSpec:
        """The cache of this rank: a tensor-parallel rank holds only its KV heads
        (``model.tp_layout``, worker.parallel.shard)."""
        spec = cls.from_model_config(model.config, dtype, block_size, cache_dtype)
        layout = getattr(model, "tp_layout", None)
        if layout is None or layout.size == 1:
            return spec
        return cls(spec.num_layers, layout.num_kv_heads, spec.head_dim, dtype, block_size,
                   spec.cache_dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.cache_dtype or self.dtype

    @property
    def quantized(self) -> bool:
        """FP8 storage: writes quantize, reads dequantize with the cache's scales."""
        return is_fp8(self.storage_dtype)

    @property
    def bytes_per_token(self) -> int:
        """2 (K and V) * layers * kv heads * head dim * bytes per stored element."""
        return (2 * self.num_layers * self.num_kv_heads * self.head_dim
                * self.storage_dtype.itemsize)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for_bytes(self, num_bytes: int) -> int:
        return max(0, int(num_bytes) // self.bytes_per_block)

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.block_size)


class KVCache:
    """Every layer's K/V blocks on ``device``, zero-filled once."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.spec, self.num_blocks = spec, num_blocks
        self.kv = torch.zeros(spec.num_layers, 2, num_blocks, spec.block_size,
                              spec.num_kv_heads, spec.head_dim, dtype=spec.storage_dtype,
                              device=device)
        self.scales: torch.Tensor | None = None  # [L, 2, Hkv] fp32, FP8 storage only
        if spec.quantized:
            self.scales = torch.ones(spec.num_layers, 2, spec.num_kv_heads,
                                     dtype=torch.float32, device=device)
            self._bytes = self.kv.view(torch.uint8)  # index_copy_ has no e4m3 kernel on CPU
        logger.info("KV cache: %d blocks x %d tokens, %s, %.3f GiB", num_blocks,
                    spec.block_size, str(spec.storage_dtype).removeprefix("torch."),
                    self.num_bytes / GIB)

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.spec.block_size

    def key(self, layer: int) -> torch.Tensor:  # [num_blocks, block_size, Hkv, D]
        return self.kv[layer, 0]

    def value(self, layer: int) -> torch.Tensor:  # [num_blocks, block_size, Hkv, D]
        return self.kv[layer, 1]

    def set_scales(self, scales: torch.Tensor) -> None:
        """FP8: the K/V scales, [L, 2, Hkv] (or [L, 2, 1], one per tensor), copied in
        place. Set before the first write: blocks already written keep their old scale."""
        if self.scales is None:
            raise ValueError(f"a {self.spec.storage_dtype} KV cache takes no scales")
        self.scales.copy_(scales.to(self.scales.device, torch.float32).expand_as(self.scales))

    def layer_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8: (k_scale [Hkv], v_scale [Hkv]) fp32 views of ``layer``."""
        return self.scales[layer, 0], self.scales[layer, 1]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Store new tokens' K/V: ``key``/``value`` [T, Hkv, D], ``slot_mapping`` [T] int64;
        FP8: quantized with the layer's scales (saturating at +-448)."""
        s = self.spec
        if self.scales is not None:
            for i, x in enumerate((key, value)):  # K, then V
                dst = self._bytes[layer, i].view(-1, s.num_kv_heads, s.head_dim)
                dst.index_copy_(0, slot_mapping,
                                quantize(x, self.scales[layer, i]).view(torch.uint8))
            return
        self.kv[layer, 0].view(-1, s.num_kv_heads, s.head_dim).index_copy_(0, slot_mapping, key)
        self.kv[layer, 1].view(-1, s.num_kv_heads, s.head_dim).index_copy_(0, slot_mapping, value)


def kv_bytes_from_report(report, step_tokens: int) -> int:
    """Bytes left for the KV cache after a probe (``worker.budget.report.BudgetReport``): what the
    utilization cap allows, minus what is used (weights, context), the margin, the fixed
    activation bytes, and activations for a step of ``step_tokens`` tokens."""
    missing = [name for name in ("total_bytes", "used_bytes", "utilization_cap",
                                 "margin_bytes", "activation_bytes_per_token")
               if getattr(report, name, None) is None]
    if missing:
        raise ValueError(f"the budget report was not measured ({', '.join(missing)} unset); "
                         "set num_kv_blocks")
    fixed = report.activation_fixed_bytes or 0.0
    activations = report.activation_bytes_per_token * step_tokens + fixed
    free = report.total_bytes * report.utilization_cap - report.used_bytes - report.margin_bytes
    return int(free - activations)
