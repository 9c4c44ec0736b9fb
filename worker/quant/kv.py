"""The FP8 KV cache's numbers: the storage dtype, the scales, quantize and dequantize.

A cached K or V element ``x`` of layer ``l`` and KV head ``h`` is stored as
``e4m3(clamp(x / scale[l, k_or_v, h], -448, 448))`` and read back as
``float(stored) * scale[l, k_or_v, h]``. The clamp is what makes an out-of-range value
saturate instead of becoming NaN (CUDA's cast does not saturate).

| where the scales come from | when                                                   |
|----------------------------|--------------------------------------------------------|
| the checkpoint             | ``model.kv_cache_scales`` = {layer: (k_scale, v_scale)} (per tensor, set by the loader from ModelOpt / compressed-tensors ``k_scale`` / ``v_scale``) |
| a calibration forward      | otherwise: per layer and KV head, ``amax * CALIBRATION_HEADROOM / 448`` over a fixed text (``worker.generate.kv_scales``) |

Why a headroom of 4 costs nearly nothing: e4m3 keeps its 3 mantissa bits over 2^-6 ..
448, a range of 2^15, so mapping the calibrated maximum to 112 instead of 448 leaves every
value above ``amax / 7000`` at full relative precision; what it buys is that a later
input 4x larger than anything the calibration saw still round-trips (docs/decisions.md).
"""

from __future__ import annotations

import torch

FP8_E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
CALIBRATION_HEADROOM = 4.0  # the calibrated amax maps to FP8_MAX / this
MIN_AMAX = 1e-4  # a head that saw (almost) only zeros: keep the scale away from 0

KV_STORAGE = {"auto": None, "fp8": FP8_E4M3, "fp8_e4m3": FP8_E4M3}


def kv_storage_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache stores (``EngineConfig.kv_cache_dtype``): auto is the model's."""
    return KV_STORAGE[kv_cache_dtype] or compute_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_E4M3


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [T, H, D] (any float dtype), ``scale`` [H] fp32 -> [T, H, D] e4m3, saturated."""
    return (x.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_E4M3)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` [..., H, D] e4m3, ``scale`` [H] fp32 -> ``dtype`` (the product taken in fp32)."""
    return (x.float() * scale[:, None]).to(dtype)


def scales_from_amax(amax: torch.Tensor, headroom: float = CALIBRATION_HEADROOM
                     ) -> torch.Tensor:
    """Per-head scales (fp32) that map ``amax * headroom`` to the largest e4m3 value."""
    return amax.float().clamp(min=MIN_AMAX) * (headroom / FP8_MAX)


def checkpoint_scales(model, num_layers: int, num_kv_heads: int) -> torch.Tensor | None:
    """``model.kv_cache_scales`` (per-tensor, from the checkpoint) as [L, 2, Hkv] fp32 on
    the host, or None when the checkpoint carries none. Raises ValueError naming a layer
    that is missing or a scale that is not a positive finite number."""
    given = getattr(model, "kv_cache_scales", None)
    if not given:
        return None
    out = torch.empty(num_layers, 2, num_kv_heads, dtype=torch.float32)
    for layer in range(num_layers):  # once, at start
        if layer not in given:
            raise ValueError(f"the checkpoint's KV cache scales name layers "
                             f"{sorted(given)[:4]}..., not layer {layer}")
        pair = [float(s) for s in given[layer]]
        if len(pair) != 2 or not all(s > 0 and s != float("inf") for s in pair):
            raise ValueError(f"layer {layer}: KV cache scales must be two positive finite "
                             f"numbers (k_scale, v_scale), got {given[layer]!r}")
        out[layer, 0], out[layer, 1] = pair
    return out
