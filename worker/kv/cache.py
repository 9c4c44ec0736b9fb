"""The paged KV cache's memory: one tensor for every layer's K and V blocks.

Layout (allocated once, never resized)::

    kv      [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]  model dtype
    key(l)  kv[l, 0]   [num_blocks, block_size, num_kv_heads, head_dim]
    value(l) kv[l, 1]

A token in cache slot ``s`` sits at ``key(l).view(-1, H, D)[s]`` with
``s = block * block_size + offset`` (see ``worker.kv.block_manager``). The same layout is
what flash-attn's and torch's paged kernels take as their page pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one token's KV across the model, and the block size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @classmethod
    def from_model_config(cls, config, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype, block_size)

    @classmethod
    def for_model(cls, model, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
        """The cache of this rank: a tensor-parallel rank holds only its KV heads
        (``model.tp_layout``, worker.parallel.shard)."""
        spec = cls.from_model_config(model.config, dtype, block_size)
        layout = getattr(model, "tp_layout", None)
        if layout is None or layout.size == 1:
            return spec
        return cls(spec.num_layers, layout.num_kv_heads, spec.head_dim, dtype, block_size)

    @property
    def bytes_per_token(self) -> int:
        """2 (K and V) * layers * kv heads * head dim * bytes per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

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
                              spec.num_kv_heads, spec.head_dim, dtype=spec.dtype, device=device)
        logger.info("KV cache: %d blocks x %d tokens, %.3f GiB", num_blocks, spec.block_size,
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

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Store new tokens' K/V: ``key``/``value`` [T, Hkv, D], ``slot_mapping`` [T] int64."""
        s = self.spec
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
