"""Random packed q/k/v and a dense-mask ground truth for the attention backends."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def packed_qkv(lengths, heads=8, kv_heads=2, head_dim=32, dtype=torch.float32,
               device="cpu", seed=0):
    """q [1, H, T, D], k/v [1, Hkv, T, D] (transformers' layout) and cu_seqlens int32."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, heads, total, head_dim, generator=g)
    k = torch.randn(1, kv_heads, total, head_dim, generator=g)
    v = torch.randn(1, kv_heads, total, head_dim, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), cu.to(device)


def module(is_causal: bool):
    return SimpleNamespace(is_causal=is_causal)


def dense_truth(q, k, v, cu, causal, scaling, sliding_window=None):
    """Float64, one masked softmax over the whole bin: [1, T, H, D]."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    total = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).cpu().long())
    i = torch.arange(total)
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= i[None, :] <= i[:, None]
    if sliding_window:
        allowed &= (i[:, None] - i[None, :]).abs() < sliding_window
    scores = (q @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)
