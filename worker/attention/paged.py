"""Attention over the paged KV cache for one packed step of prefill chunks and decodes.

Sequence ``i`` of a step brings ``q_len`` new tokens (a prefill chunk, or 1 for a
decode) on top of ``k_len - q_len`` tokens already cached; its new K/V are written to
the cache first, then its queries attend to all ``k_len`` cached tokens, causal and
aligned bottom-right::

    query j of the chunk (0 <= j < q_len) sees keys 0 .. k_len - q_len + j
    with a sliding window w also only keys > k_len - q_len + j - w

Backends (``select_paged_backend``; why, measured, in docs/decisions.md):

| name            | where                                    | how                             |
|-----------------|------------------------------------------|---------------------------------|
| ``triton``      | CUDA, half, triton; passes its self-check | ours: one launch, K/V in place (``triton_paged.py``) |
| ``flash_attn``  | CUDA, half, flash-attn, block % 256 == 0 | flash_attn_varlen_func(block_table) |
| ``torch_paged`` | CUDA, half, varlen_attn(block_table)     | torch >= 2.12; block % 256 == 0 |
| ``gather``      | CUDA, half, torch >= 2.10                | context to a scratch, varlen_attn |
| ``reference``   | anywhere (CPU)                           | gather blocks, then SDPA        |

``triton`` also runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``),
for tests only, when asked for by name.

The function ``worker.attention.packed.register`` puts into transformers dispatches on the
forward's attention context (``worker.attention.context``): a ``PagedContext`` ->
``PagedContext.attend`` (this module); otherwise the packed (cache-free) backend the model
was loaded with, so one model serves both paths.

An FP8 cache (``KVCacheSpec.quantized``, ``kv_cache_dtype="fp8"``) stores e4m3 and a
per-layer, per-KV-head scale (``KVCache.scales``); ``triton`` dequantizes in the kernel,
``gather`` and ``reference`` as they gather. ``flash_attn`` and ``torch_paged`` read the
page pool in place in q's dtype and are not candidates then (``FP8_BACKENDS``).

Gemma 2's ``softcap`` (scores capped as ``softcap * tanh(s / softcap)``) is computed by
``triton``, ``flash_attn`` and ``reference``; the others are not candidates for such a
model (``SOFTCAP_BACKENDS``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F

from worker.attention.packed import (
    UnsupportedAttention,
    flash_attn_available,
    refuse_softcap,
    softcapped_attention,
    torch_varlen_available,
    varlen_kwargs,
    varlen_params,
    varlen_window,
)
from worker.kv.cache import KVCache
from worker.quant.kv import dequantize

logger = logging.getLogger(__name__)

PAGED_BACKENDS = ("triton", "flash_attn", "torch_paged", "gather", "reference")
PAGED_KERNEL_BLOCK_MULTIPLE = 256  # FA2's paged kernels refuse other page sizes
SOFTCAP_BACKENDS = frozenset({"triton", "flash_attn", "reference"})
FP8_BACKENDS = frozenset({"triton", "gather", "reference"})  # read an e4m3 cache


@dataclasses.dataclass(frozen=True)
class PagedMetadata:
    """Where a step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: new tokens per sequence, prefix sums
    cu_seqlens_k: torch.Tensor  # [B + 1] int32: cached + new tokens, prefix sums
    seqlens_k: torch.Tensor  # [B] int32: cached + new tokens
    block_tables: torch.Tensor  # [B, W] int32: W >= the longest table; unused entries 0
    max_seqlen_q: int
    max_seqlen_k: int
    host_cu_seqlens_q: np.ndarray  # [B + 1] int64 (the reference loop reads no device)
    host_seqlens_k: np.ndarray  # [B] int64
    block_size: int
    context_slots: torch.Tensor | None = None  # [sum k_len] int64: ``gather`` backend only

    @property
    def num_seqs(self) -> int:
        return int(self.host_seqlens_k.shape[0])


@dataclasses.dataclass(frozen=True)
class PagedContext:
    """What every attention layer of a generation step reads (``attention_context``)."""

    cache: KVCache
    meta: PagedMetadata
    backend: str  # one of PAGED_BACKENDS

    def attend(self, module, query, key, value, attention_mask, scaling=None,
               sliding_window=None, softcap=None, **_):
        """One layer: transformers layout in ([1, H, T, D]), ([1, T, Hq, D], None) out."""
        if attention_mask is not None:
            raise ValueError("paged attention received a dense attention_mask; the model "
                             "built its own mask and is not supported by packserve's paged "
                             "backends")
        layer = module.layer_idx
        q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
        self.cache.write(layer, k, v, self.meta.slot_mapping)
        if self.cache.scales is None:
            out = _BACKENDS[self.backend](q, self.cache.key(layer), self.cache.value(layer),
                                          self.meta, scaling, sliding_window, softcap)
        else:
            k_scale, v_scale = self.cache.layer_scales(layer)
            out = _BACKENDS[self.backend](q, self.cache.key(layer), self.cache.value(layer),
                                          self.meta, scaling, sliding_window, softcap,
                                          k_scale=k_scale, v_scale=v_scale)
        return out.unsqueeze(0), None


def context_slots(block_tables: torch.Tensor, seqlens_k: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, total_k: int, block_size: int) -> torch.Tensor:
    """Cache slots of every sequence's whole context, back to back -> [total_k] int64."""
    device = block_tables.device
    seq = torch.repeat_interleave(torch.arange(seqlens_k.shape[0], device=device),
                                  seqlens_k.long(), output_size=total_k)
    pos = torch.arange(total_k, device=device) - cu_seqlens_k[:-1].long()[seq]
    return block_tables.long()[seq, pos // block_size] * block_size + pos % block_size


def build_metadata(tables: list[list[int]], num_cached, num_new, block_size: int,
                   device, *, with_context_slots: bool = False) -> PagedMetadata:
    """Metadata from host lists (tests, tools); the runner stages the same fields in place."""
    num_cached = np.asarray(num_cached, np.int64)
    num_new = np.asarray(num_new, np.int64)
    seqlens_k = num_cached + num_new
    cu_q = np.concatenate([[0], np.cumsum(num_new)])
    cu_k = np.concatenate([[0], np.cumsum(seqlens_k)])
    width = max(1, max(len(t) for t in tables))
    bt = np.zeros((len(tables), width), np.int32)
    for i, table in enumerate(tables):
        bt[i, : len(table)] = table
    bt_t = torch.from_numpy(bt)
    slots = [np.asarray(t, np.int64)[p // block_size] * block_size + p % block_size
             for t, p in ((tables[i], np.arange(num_cached[i], seqlens_k[i]))
                          for i in range(len(tables)))]
    to = functools.partial(torch.as_tensor, device=device)
    meta = PagedMetadata(
        to(np.concatenate(slots)), to(cu_q.astype(np.int32)), to(cu_k.astype(np.int32)),
        to(seqlens_k.astype(np.int32)), bt_t.to(device), int(num_new.max()),
        int(seqlens_k.max()), cu_q, seqlens_k, block_size)
    if not with_context_slots:
        return meta
    slots_k = context_slots(meta.block_tables, meta.seqlens_k, meta.cu_seqlens_k,
                            int(cu_k[-1]), block_size)
    return dataclasses.replace(meta, context_slots=slots_k)


# ---- backends: (q [T, Hq, D], k_cache, v_cache [N, bs, Hkv, D], meta, scale, window,
#      softcap, k_scale=None, v_scale=None) -> [T, Hq, D]; the scales [Hkv] fp32 of an
#      FP8 cache (then K/V are read as float(stored) * scale) ----------------------------

def reference_paged(q, k_cache, v_cache, meta: PagedMetadata, scale, window,
                    softcap=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """Decodes in one padded SDPA; each prefill chunk gathers its blocks for its own SDPA
    with a bottom-right causal mask."""
    out = torch.empty_like(q)
    deq = _Dequant(k_scale, v_scale, q.dtype)
    cu, lens, bs = meta.host_cu_seqlens_q, meta.host_seqlens_k, meta.block_size
    q_lens = np.diff(cu)
    decodes = np.flatnonzero(q_lens == 1)
    if decodes.size:
        _reference_decodes(q, k_cache, v_cache, meta, scale, window, softcap, decodes, out,
                           deq)
    for i in np.flatnonzero(q_lens > 1):  # per prefill chunk, every layer: the CPU path
        start, end, k_len = int(cu[i]), int(cu[i + 1]), int(lens[i])
        blocks = meta.block_tables[i, : -(-k_len // bs)].long()
        k = deq.k(k_cache[blocks].flatten(0, 1)[:k_len]).transpose(0, 1)
        v = deq.v(v_cache[blocks].flatten(0, 1)[:k_len]).transpose(0, 1)
        mask = bottom_right_mask(end - start, k_len, window, q.device)
        causal = mask is None and end - start == k_len
        if softcap and causal:
            mask = bottom_right_mask(end - start, k_len, window, q.device, always=True)
        o = _attention(q[start:end].transpose(0, 1), k, v, mask, scale, softcap, causal)
        out[start:end] = o.transpose(0, 1)
    return out


def _attention(q, k, v, mask, scale, softcap, causal=False) -> torch.Tensor:
    """SDPA over ``[..., H, L, D]`` (K/V with fewer heads: GQA), or capped scores."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              is_causal=causal, enable_gqa=True)
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return softcapped_attention(q, k, v, mask, scale, softcap)


class _Dequant:
    """K/V as attention reads them: as stored, or an FP8 cache's values times its scales."""

    def __init__(self, k_scale, v_scale, dtype):
        self.k_scale, self.v_scale, self.dtype = k_scale, v_scale, dtype

    def k(self, x):  # x [..., Hkv, D]
        return x if self.k_scale is None else dequantize(x, self.k_scale, self.dtype)

    def v(self, x):
        return x if self.v_scale is None else dequantize(x, self.v_scale, self.dtype)


def _reference_decodes(q, k_cache, v_cache, meta, scale, window, softcap, decodes,
                       out, deq) -> None:
    """Every one-token query at once: contexts gathered into [n, max_k] padded rows."""
    device, bs = q.device, meta.block_size
    idx = torch.from_numpy(decodes).to(device)
    k_lens = torch.from_numpy(meta.host_seqlens_k[decodes]).to(device)
    max_k = int(meta.host_seqlens_k[decodes].max())
    pos = torch.arange(max_k, device=device)
    slots = meta.block_tables[idx][:, pos // bs].long() * bs + pos % bs  # [n, max_k]
    h, d = k_cache.shape[-2:]
    k = deq.k(k_cache.view(-1, h, d)[slots]).transpose(1, 2)  # [n, Hkv, max_k, D]
    v = deq.v(v_cache.view(-1, h, d)[slots]).transpose(1, 2)
    valid = pos[None, :] < k_lens[:, None]
    if window:
        valid &= pos[None, :] > k_lens[:, None] - 1 - window
    rows = torch.from_numpy(meta.host_cu_seqlens_q[decodes]).to(device)
    o = _attention(q[rows][:, :, None], k, v, valid[:, None, None], scale, softcap)
    out[rows] = o[:, :, 0]


def bottom_right_mask(q_len: int, k_len: int, window, device,
                      always: bool = False) -> torch.Tensor | None:
    """[q_len, k_len] bool (True = attend); None when plain SDPA does the same (unless
    ``always``)."""
    if not always and (q_len == 1 or q_len == k_len) and (not window or k_len <= window):
        return None  # a decode sees everything; a full prefill is top-left == bottom-right
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    return mask


def gather_paged(q, k_cache, v_cache, meta: PagedMetadata, scale, window,
                 softcap=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """Copy every sequence's context into a contiguous scratch, then ``varlen_attn``
    (FlashAttention-2 in torch; causal aligned bottom-right like flash-attn >= 2.1)."""
    from torch.nn.attention.varlen import varlen_attn

    refuse_softcap("gather", softcap)

    if meta.context_slots is None:
        raise ValueError("the gather backend needs PagedMetadata.context_slots")
    h, d = k_cache.shape[-2:]
    k = k_cache.view(-1, h, d).index_select(0, meta.context_slots)
    v = v_cache.view(-1, h, d).index_select(0, meta.context_slots)
    if k_scale is not None:  # FP8: the scratch copy is dequantized
        k, v = dequantize(k, k_scale, q.dtype), dequantize(v, v_scale, q.dtype)
    q, extra, rep = varlen_kwargs(q, h, scale, window, causal=True)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                       meta.max_seqlen_k, **extra)


def torch_paged(q, k_cache, v_cache, meta: PagedMetadata, scale, window,
                softcap=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """``varlen_attn`` reading the page pool through ``block_table`` (torch >= 2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    refuse_softcap("torch_paged", softcap)
    _refuse_fp8("torch_paged", k_scale)

    # torch >= 2.12 (block_table) also has enable_gqa, so no K/V repeat is ever asked for.
    q, extra, _ = varlen_kwargs(q, k_cache.shape[-2], scale, window, causal=True)
    return varlen_attn(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k,
                       meta.max_seqlen_q, meta.max_seqlen_k, seqused_k=meta.seqlens_k,
                       block_table=meta.block_tables, **extra)


def flash_attn_paged(q, k_cache, v_cache, meta: PagedMetadata, scale, window,
                     softcap=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """flash-attn's varlen kernel over the page pool (``block_table``; GQA native)."""
    from flash_attn import flash_attn_varlen_func

    _refuse_fp8("flash_attn", k_scale)

    return flash_attn_varlen_func(
        q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
        meta.max_seqlen_k, softmax_scale=scale, causal=True,
        window_size=varlen_window(window, True), block_table=meta.block_tables,
        softcap=softcap or 0.0)


def triton_paged(q, k_cache, v_cache, meta: PagedMetadata, scale, window,
                 softcap=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """Our Triton kernel (``worker.attention.triton_paged``), imported on first use."""
    from worker.attention.triton_paged import triton_paged as kernel

    return kernel(q, k_cache, v_cache, meta, scale, window, softcap=softcap,
                  k_scale=k_scale, v_scale=v_scale)


def _refuse_fp8(backend: str, k_scale) -> None:
    if k_scale is not None:
        raise UnsupportedAttention(f"the {backend!r} paged attention backend cannot read an "
                                   "FP8 KV cache; the engine selects one that can")


_BACKENDS = {"triton": triton_paged, "flash_attn": flash_attn_paged, "torch_paged": torch_paged,
             "gather": gather_paged, "reference": reference_paged}


# ---- selection and registration --------------------------------------------------------

def torch_paged_available() -> bool:
    return torch_varlen_available() and "block_table" in varlen_params()


def paged_backend_candidates(device_type: str, dtype: torch.dtype, block_size: int,
                             softcap: bool = False, fp8_kv: bool = False) -> list[str]:
    """The backends that can run here, fastest first (see the module table); with
    ``softcap`` only those that cap scores, with ``fp8_kv`` (an e4m3 cache) only those
    that read one."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return ["reference"]
    if softcap or fp8_kv:
        names = paged_backend_candidates(device_type, dtype, block_size)
        return [n for n in names if (not softcap or n in SOFTCAP_BACKENDS)
                and (not fp8_kv or n in FP8_BACKENDS)]
    from worker.attention.triton_paged import triton_available

    names = ["triton"] if triton_available() else []
    if block_size % PAGED_KERNEL_BLOCK_MULTIPLE == 0:
        names += [n for n, ok in (("flash_attn", flash_attn_available),
                                  ("torch_paged", torch_paged_available)) if ok()]
    if torch_varlen_available():
        names.append("gather")
    return names + ["reference"]


def check_paged_backend(requested: str, device_type: str, dtype: torch.dtype,
                        block_size: int, softcap: bool = False, fp8_kv: bool = False) -> None:
    """Raise ``ConfigError`` (naming ``paged_attention_backend``) unless ``requested``
    can run here (and caps scores, for a model with ``softcap``; reads e4m3, with
    ``fp8_kv``)."""
    from worker.core.config import ConfigError

    if fp8_kv and requested not in ("auto", *FP8_BACKENDS):
        raise ConfigError("paged_attention_backend", f"{requested!r} cannot read an FP8 KV "
                          "cache (kv_cache_dtype='fp8'): it reads the page pool in place in "
                          f"the model's dtype; use {', '.join(sorted(FP8_BACKENDS))} or "
                          "'auto', or kv_cache_dtype='auto'")

    if softcap and requested not in ("auto", *SOFTCAP_BACKENDS):
        raise ConfigError("paged_attention_backend", f"{requested!r} cannot cap attention "
                          "scores, which this model does (attn_logit_softcapping); use "
                          f"{', '.join(sorted(SOFTCAP_BACKENDS))} or 'auto'")
    if requested == "auto" or requested in paged_backend_candidates(device_type, dtype,
                                                                    block_size):
        return
    if requested == "triton" and device_type == "cpu":
        from worker.attention.triton_paged import triton_available

        if triton_available():
            return
        raise ConfigError("paged_attention_backend", "'triton' runs on CPU only under "
                          "Triton's interpreter (TRITON_INTERPRET=1, for tests); use 'auto'")
    raise ConfigError("paged_attention_backend", f"{requested!r} cannot run on {device_type} "
                      f"with dtype {dtype} and kv_block_size {block_size} (flash_attn and "
                      "torch_paged need CUDA, half precision and a block size multiple of "
                      f"{PAGED_KERNEL_BLOCK_MULTIPLE}); use 'auto'")


def select_paged_backend(device_type: str, dtype: torch.dtype, block_size: int,
                         requested: str = "auto", self_check=None,
                         softcap: bool = False, fp8_kv: bool = False) -> str:
    """``requested`` (checked) or the fastest backend that runs here. ``self_check(name)``
    returns None when the named kernel works on this device, else why not; a kernel that
    fails it is skipped with a warning, so a kernel that does not compile never stops the
    engine from starting (``triton`` is the one checked)."""
    check_paged_backend(requested, device_type, dtype, block_size, softcap, fp8_kv)
    names = paged_backend_candidates(device_type, dtype, block_size, softcap, fp8_kv)
    if requested != "auto":
        names = [requested] + [n for n in names if n != requested]
    for name in names:
        problem = self_check(name) if self_check is not None and name in CHECKED else None
        if problem is None:
            return name
        logger.warning("paged attention backend %r failed its start-up self-check, falling "
                       "back to the next one: %s", name, problem)
    return "reference"


CHECKED = ("triton",)  # backends of ours that must pass a self-check on the device
