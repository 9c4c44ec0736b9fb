"""Paged attention in Triton: one launch per layer for a whole step of prefill chunks and
decodes, K/V read in place through the block tables, GQA native, split-KV for few long
decodes. Its definition is ``worker.attention.paged.reference_paged`` (same call, same
result); tests/worker/attention/test_triton_paged.py holds it to that twin under TRITON_INTERPRET=1.

``_attn_kernel`` (S = num_splits, QPK = Hq // Hkv, BLOCK_Q = BLOCK_M // QPK):

| what          | layout / meaning                                                          |
|---------------|---------------------------------------------------------------------------|
| grid          | (T // BLOCK_Q + B, Hkv, S); decode-only steps (B, Hkv, S)                 |
| one program   | BLOCK_Q query tokens of one sequence x the QPK query heads of one KV      |
|               | head, over split pid(2)'s contiguous share of the key tiles they need     |
| q block g     | sequence s = max{s : cu_q[s] // BLOCK_Q + s <= g} (binary search), its    |
|               | tokens from (g - cu_q[s] // BLOCK_Q - s) * BLOCK_Q; none left: return     |
|               | (decode-only: s = g, since no sequence has more than one new token)       |
| Q tile        | [BLOCK_M, D_PAD]: row m = token m // QPK, head kv * QPK + m % QPK;        |
|               | rows m >= BLOCK_Q * QPK masked (they would be the next block's token)     |
| K^T, V tiles  | [D_PAD, TILE], [TILE, D_PAD]: keys j * TILE .. of the sequence; key k in  |
|               | block block_tables[s, k // block_size], row k % block_size                |
| tile range    | causal: to the block's last query; with a window from its first - w + 1   |
| scores        | q.k * scale, in log2 units; SOFTCAP: c * tanh(q.k * scale / c) (Gemma 2)  |
| FP8 K/V       | tiles converted to q's dtype (exact: e4m3 fits in fp16 and bf16); the K   |
|               | scale folds into the score scale, the V scale into the output (per head)  |
| q             | [T, Hq, D], any strides                                                   |
| out           | [T, Hq, D] contiguous, q's dtype                                          |
| k/v cache     | [num_blocks, block_size, Hkv, D], any strides (a layer view of KVCache);  |
|               | q's dtype, or e4m3 (KV_FP8) read as float(x) * scale of its KV head       |
| k/v scale     | [Hkv] fp32 (KV_FP8 only; else q, unread): the layer's KVCache.scales      |
| block_tables  | [B, W] int32, row stride stride_bt                                        |
| cu_q          | [B + 1] int32 (meta.cu_seqlens_q)                                         |
| seqlens_k     | [B] int32: cached + new tokens                                            |
| part_acc      | [T, Hq, S, D_PAD] fp32: unnormalised output per split (S > 1 only)        |
| part_ml       | [T, Hq, S, 2] fp32: running max (log2 units) and sum per split            |

``_combine_kernel``: grid (T, Hq), one program merges the S partials of one row.

Launch decisions read only shapes, head counts, ``meta.max_seqlen_q`` (host int), the
window and the device, never a device value: the launcher can be captured in a CUDA graph.
"""

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without triton: triton_available() says False
    class triton:  # noqa: N801 - a stand-in so the kernels below still define
        jit = staticmethod(lambda fn: fn)

    class tl:  # noqa: N801
        constexpr = None

MAX_SPLITS = 64
LOG2E = 1.4426950408889634  # the kernel works in exp2: scores scaled by scale * log2(e)


@triton.jit
def _find_seq(cu_q_ptr, g, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence whose first q block is at or before global q block ``g``."""
    lo = tl.program_id(0) * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= g:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attn_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, seqlens_k_ptr,
    k_scale_ptr, v_scale_ptr, scale_log2, softcap_in, softcap_out, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    HQ: tl.constexpr, QPK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE: tl.constexpr, PAGE: tl.constexpr,
    WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr, DECODE_ONLY: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE_ONLY:  # one program per sequence: at most one token each
        seq = tl.program_id(0)
        first = 0
    else:
        seq = _find_seq(cu_q_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        first = (tl.program_id(0) - tl.load(cu_q_ptr + seq) // BLOCK_Q - seq) * BLOCK_Q
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if first >= q_len:
        return
    k_len = tl.load(seqlens_k_ptr + seq)
    context = k_len - q_len  # absolute position of the sequence's first new token

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // QPK
    head = kvh * QPK + rows % QPK
    row_ok = (rows < BLOCK_Q * QPK) & (tok < q_len)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q_row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh
                + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = context + tok
    if KV_FP8:  # per-head scales: one scalar each for this program's KV head
        k_scale = tl.load(k_scale_ptr + kvh)
        scale_log2 = scale_log2 * k_scale
        softcap_in = softcap_in * k_scale

    key_end = tl.minimum(context + first + BLOCK_Q, k_len)  # past the block's last query
    tile_lo = 0
    if WINDOW > 0:
        tile_lo = tl.maximum(context + first - WINDOW + 1, 0) // TILE
    tile_hi = (key_end + TILE - 1) // TILE
    if NUM_SPLITS > 1:
        per_split = (tile_hi - tile_lo + NUM_SPLITS - 1) // NUM_SPLITS
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + per_split)  # empty: writes max -inf, sum 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    offs = tl.arange(0, TILE)
    table = bt_ptr + seq.to(tl.int64) * stride_bt
    for j in range(tile_lo, tile_hi):
        key = j * TILE + offs
        key_ok = key < key_end
        block = tl.load(table + key // PAGE, mask=key_ok, other=0).to(tl.int64)
        row_in = key % PAGE
        k = tl.load(k_ptr + block[None, :] * stride_kb + row_in[None, :] * stride_ks
                    + kvh * stride_kh + dims[:, None] * stride_kd,
                    mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        v = tl.load(v_ptr + block[:, None] * stride_vb + row_in[:, None] * stride_vs
                    + kvh * stride_vh + dims[None, :] * stride_vd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        elif KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if SOFTCAP:  # c * tanh(s * scale / c) in log2 units; tanh(x) = 1 - 2 / (e^2x + 1)
            s = softcap_out * (1.0 - 2.0 / (tl.exp(s * softcap_in) + 1.0))
        else:
            s = s * scale_log2
        see = (key[None, :] <= qpos[:, None]) & row_ok[:, None]
        if WINDOW > 0:
            see = see & (key[None, :] > qpos[:, None] - WINDOW)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr + kvh)
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_row * HQ + head)[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        part = (q_row * HQ + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * D_PAD + dims[None, :], acc,
                 mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(out_ptr, part_acc_ptr, part_ml_ptr, HQ: tl.constexpr,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * HQ + tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    part = row * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + part * 2, mask=split_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(w * l_s, 0)
    dims = tl.arange(0, D_PAD)
    acc = tl.load(part_acc_ptr + part[:, None] * D_PAD + dims[None, :],
                  mask=split_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


# ---- launcher ---------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: splitting only adds work
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_programs: int, decode_only: bool, num_sms: int,
                      window=None, tile: int = 64) -> int:
    """Split the keys only for a decode-only step whose grid leaves SMs idle: the smallest
    power of two (<= 64) that fills them, and no more than a window's tiles."""
    if not decode_only or num_programs >= num_sms:
        return 1
    splits = min(MAX_SPLITS, _next_pow2(-(-num_sms // max(1, num_programs))))
    if window:
        splits = min(splits, max(1, _next_pow2(window // tile + 2) // 2))
    return splits


def kernel_config(num_heads: int, num_kv_heads: int, head_dim: int, decode_only: bool,
                  itemsize: int = 2):
    """(BLOCK_M, BLOCK_Q, TILE, D_PAD) for a step: 16 query rows for decodes, 64 otherwise
    (more when one KV head has more query heads); 64 keys per tile while a key row is at
    most 256 bytes (half D <= 128), fewer above, so that the pipelined K/V tiles fit an
    H100/H200's shared memory (3 stages x 2 x TILE x D_PAD x itemsize + the Q tile)."""
    qpk = num_heads // num_kv_heads
    block_m = max(16 if decode_only else 64, _next_pow2(qpk))
    d_pad = max(16, _next_pow2(head_dim))
    row_bytes = d_pad * itemsize
    tile = 64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16
    return block_m, block_m // qpk, tile, d_pad


def triton_paged(q, k_cache, v_cache, meta, scale, window, *, num_splits=None,
                 softcap=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """``reference_paged``'s call and result: q [T, Hq, D], caches [N, bs, Hkv, D] -> [T, Hq, D].

    Reads no device value on the host (CUDA-graph safe); ``num_splits`` forces split-KV;
    ``softcap`` caps scores as ``softcap * tanh(s / softcap)`` (Gemma 2); ``k_scale``,
    ``v_scale`` ([Hkv] fp32, read on the device): the caches are e4m3 (an FP8 KV cache).
    """
    num_tokens, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    num_seqs = meta.block_tables.shape[0]
    out = torch.empty(num_tokens, hq, d, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    fp8 = k_scale is not None
    kv_dtype = torch.float8_e4m3fn if fp8 else q.dtype
    if hq % hkv or k_cache.dtype != kv_dtype or v_cache.dtype != kv_dtype or (
            fp8 and (v_scale is None or k_scale.numel() != hkv or v_scale.numel() != hkv)):
        raise ValueError(f"triton_paged needs Hq % Hkv == 0, K/V of q's dtype or e4m3 with "
                         f"[Hkv] scales; got Hq={hq}, Hkv={hkv}, q {q.dtype}, k "
                         f"{k_cache.dtype}, v {v_cache.dtype}, fp8 scales {fp8}")
    decode_only = meta.max_seqlen_q <= 1
    block_m, block_q, tile, d_pad = kernel_config(hq, hkv, d, decode_only, q.element_size())
    grid0 = num_seqs if decode_only else num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs * hkv, decode_only, _num_sms(q.device),
                                       window, tile)
    scale = d ** -0.5 if scale is None else float(scale)
    cap = float(softcap or 1.0)  # 1.0: unused without SOFTCAP
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, hq, num_splits, d_pad, dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty(num_tokens, hq, num_splits, 2, dtype=torch.float32,
                              device=q.device)
    else:
        part_acc = part_ml = out  # unused
    upcast = q.device.type == "cpu" or _interpreting()  # interpreter bf16 dot is wrong
    _attn_kernel[(grid0, hkv, num_splits)](
        out, part_acc, part_ml, q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
        meta.seqlens_k, k_scale if fp8 else q, v_scale if fp8 else q,  # unread unless FP8
        scale * LOG2E, 2.0 * scale / cap, cap * LOG2E, num_seqs,
        *q.stride(), *k_cache.stride(),
        *v_cache.stride(), meta.block_tables.stride(0),
        HQ=hq, QPK=hq // hkv, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE=tile, PAGE=page, WINDOW=int(window or 0), NUM_SPLITS=num_splits,
        DECODE_ONLY=decode_only, SOFTCAP=bool(softcap), UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast or q.dtype == torch.float32 else None, KV_FP8=fp8,
        num_warps=4)
    if num_splits > 1:
        _combine_kernel[(num_tokens, hq)](out, part_acc, part_ml, HQ=hq, HEAD_DIM=d,
                                          D_PAD=d_pad, NUM_SPLITS=num_splits,
                                          SPLITS_PAD=_next_pow2(num_splits), num_warps=4)
    return out


# ---- availability --------------------------------------------

def triton_available() -> bool:
    """Triton imports, and there is a GPU or the interpreter is on (TRITON_INTERPRET=1)."""
    if getattr(triton, "__version__", None) is None:
        return False
    return torch.cuda.is_available() or _interpreting()
