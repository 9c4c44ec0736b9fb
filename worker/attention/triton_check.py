"""The Triton kernel's start-up self-check: one small random step against the reference.

Kept apart from ``worker.attention.triton_paged`` (the kernel alone) and from
``worker.attention.paged`` (which picks the backend and imports the kernel) because it
needs both: the kernel to run and ``reference_paged`` to compare with.
"""

from __future__ import annotations

import torch

from worker.attention.paged import build_metadata, reference_paged
from worker.attention.triton_paged import triton_paged
from worker.quant.kv import FP8_E4M3, dequantize, quantize

_TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def self_check(device, dtype, *, num_heads, num_kv_heads, head_dim, block_size,
               window=None, softcap=None, kv_dtype=None) -> str | None:
    """Run the kernel once on a small random mixed step (decodes, a chunk after a prefix,
    a forced split-KV run, a decode-only step) and compare with ``reference_paged``;
    ``kv_dtype`` e4m3: over an FP8 cache with per-head scales (the reference then reads
    the same dequantized values).

    Returns None when it agrees, else what went wrong; never raises (the engine falls
    back to another backend on a string).
    """
    try:
        return _self_check(torch.device(device), dtype, num_heads, num_kv_heads, head_dim,
                           block_size, window, softcap, kv_dtype == FP8_E4M3)
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this backend"
        return repr(exc)


def _self_check(device, dtype, hq, hkv, d, bs, window, softcap, fp8=False) -> str | None:
    gen = torch.Generator().manual_seed(0)
    cached, new = [0, bs - 1, bs, 2 * bs + 3, 37], [1, 1, 1, 1, 40]
    sizes = [-(-(c + n) // bs) for c, n in zip(cached, new)]
    order = torch.randperm(sum(sizes) + 2, generator=gen).tolist()
    tables = [order[sum(sizes[:i]): sum(sizes[: i + 1])] for i in range(len(sizes))]
    k, v = (torch.randn(len(order), bs, hkv, d, generator=gen).to(device, dtype)
            for _ in range(2))
    scales = fp8_kv = None
    if fp8:  # per-head scales that differ, values stored as the cache stores them
        scales = [(0.5 + torch.rand(hkv, generator=gen)).to(device) / 32 for _ in range(2)]
        fp8_kv = [quantize(x.flatten(0, 1), sc).view(x.shape) for x, sc in zip((k, v), scales)]
        k, v = (dequantize(x, sc, torch.float32) for x, sc in zip(fp8_kv, scales))
    scale = d ** -0.5
    runs = [(slice(None), None), (slice(0, 4), None), (slice(0, 4), 3)]
    for pick, splits in runs:
        meta = build_metadata(tables[pick], cached[pick], new[pick], bs, device)
        q = torch.randn(sum(new[pick]), hq, d, generator=gen).to(device, dtype)
        if fp8:
            got = triton_paged(q, *fp8_kv, meta, scale, window, num_splits=splits,
                               softcap=softcap, k_scale=scales[0], v_scale=scales[1]).float()
        else:
            got = triton_paged(q, k, v, meta, scale, window, num_splits=splits,
                               softcap=softcap).float()
        want = reference_paged(q.float(), k.float(), v.float(), meta, scale, window, softcap)
        tol = _TOLERANCE.get(dtype, 2e-2)
        excess = ((got - want).abs() - tol * (1 + want.abs())).max().item()
        if not excess <= 0:  # also catches NaN
            diff = (got - want).abs().max().item()
            return (f"triton_paged differs from reference_paged by {diff:.3g} (tolerance "
                    f"{tol} abs+rel; {dtype}, Hq={hq}, Hkv={hkv}, D={d}, block_size={bs}, "
                    f"window={window}, softcap={softcap}, num_splits={splits}, fp8 KV={fp8}, "
                    f"seqs={len(new[pick])})")
    return None
