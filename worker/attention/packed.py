"""Varlen attention backends, registered into transformers' ``AttentionInterface``.

A packed forward runs as batch 1 over ``T`` tokens; the runner's ``PackedSegments``
(``worker.attention.context``, not forward kwargs: not every family passes those on)
gives the attention function its segments::

    query         [1, Hq, T, D]    (transformers' layout after its transpose)
    key, value    [1, Hkv, T, D]   Hq % Hkv == 0 (GQA)
    cu_seq_lens_q [B + 1] int32    segment bounds; cu_seq_lens_k is the same tensor
    max_length_q  int              longest segment
    returns       ([1, T, Hq, D], None)   like transformers' sdpa/flash integrations

No dense mask is ever built: masking_utils returns ``None`` early for an
implementation name it has no mask function for (we register none on purpose: its
packed-sequence detection would sync the GPU), and ``check_no_mask`` turns any mask
that still arrives into an error instead of a silently wrong result.
Causality comes from ``module.is_causal`` (or an ``is_causal`` kwarg), the scale from
``scaling``, a sliding window from ``sliding_window`` (Mistral, Qwen2): a query at ``i``
sees keys ``j`` with ``i - sliding_window < j <= i``; ``softcap`` (Gemma 2) caps scores
as ``softcap * tanh(score / softcap)`` before the softmax. Any other keyword a model
passes is refused (``check_attention_kwargs``), never ignored.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from worker.attention.context import PackedSegments, current
from worker.attention.cpu import grouped_attention, window_mask

BACKEND_NAMES = {
    "flash_attn": "packserve_flash_attn",
    "torch_varlen": "packserve_torch_varlen",
    "reference": "packserve_reference",
}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def select_backend(requested: str, device_type: str, dtype: torch.dtype,
                   softcap: bool = False) -> str:
    """Resolve ``"auto"`` and check that the chosen backend can run here; ``softcap``: the
    model caps attention scores (Gemma 2), which only ``SOFTCAP_BACKENDS`` compute."""
    half = dtype in (torch.float16, torch.bfloat16)
    from worker.core.config import ConfigError

    if requested == "auto":
        if device_type == "cuda" and half and flash_attn_available():
            return "flash_attn"
        if device_type == "cuda" and half and torch_varlen_available() and not softcap:
            return "torch_varlen"
        return "reference"
    if softcap and requested not in SOFTCAP_BACKENDS:
        raise ConfigError("attention_backend", f"{requested!r} cannot cap attention scores, "
                          "which this model does (attn_logit_softcapping); use "
                          f"{' or '.join(sorted(SOFTCAP_BACKENDS))}, or 'auto'")

    if requested != "reference" and (device_type != "cuda" or not half):
        raise ConfigError("attention_backend", f"{requested!r} needs CUDA and dtype bfloat16 "
                          f"or float16; got device {device_type}, dtype {dtype}")
    if requested == "flash_attn" and not flash_attn_available():
        raise ConfigError("attention_backend", "'flash_attn' needs the flash-attn package "
                          "(pip install packserve[gpu]); or use 'torch_varlen'")
    if requested == "torch_varlen" and not torch_varlen_available():
        raise ConfigError("attention_backend", "'torch_varlen' needs torch >= 2.10 "
                          f"(this is {torch.__version__}); or use 'reference'")
    return requested


def register(backend: str) -> str:
    """Register ``backend`` with transformers; returns the ``attn_implementation`` name.

    The registered function serves both paths of one model: a forward run inside a
    ``PagedContext`` (generation over the KV cache, ``worker.attention.context``) goes to
    that context; any other forward runs the packed, cache-free ``backend``.
    """
    name = BACKEND_NAMES[backend]
    AttentionInterface.register(name, functools.partial(_dispatch, _FUNCTIONS[backend]))
    return name


def _dispatch(packed, module, query, key, value, attention_mask, *args, **kwargs):
    """Every attention layer of a model loaded with our backend comes here; the runner's
    context (``worker.attention.context``) says which path this forward takes."""
    check_attention_kwargs(kwargs)
    active = current()
    if active is None:  # a direct call (tests, tools): the kwargs carry the segments
        return packed(module, query, key, value, attention_mask, *args, **kwargs)
    active.num_calls += 1
    context = active.context
    if isinstance(context, PackedSegments):
        return packed(module, query, key, value, attention_mask, *args,
                      **{**kwargs, **context.kwargs()})
    return context.attend(module, query, key, value, attention_mask, *args, **kwargs)


# What a model may pass to its attention function. Keywords our backends implement;
# keywords that carry nothing for a packed, cache-free forward; and the varlen keywords
# of a direct call. Any other keyword that is not None (attention sinks, a relative
# bias, cross-attention states, ...) changes what attention computes: it is refused
# here, and the load-time proof (``worker.models.proof``) turns that into a refusal of
# the model by name.
HANDLED_KWARGS = frozenset({"scaling", "sliding_window", "softcap", "is_causal", "dropout"})
INERT_KWARGS = frozenset({"position_ids", "use_cache", "output_attentions", "cache_position",
                          "deterministic",  # a flash-attn knob (ModernBERT)
                          "output_router_logits"})  # MoE: an output flag (Mixtral)
DIRECT_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                           "packserve_groups"})
KNOWN_KWARGS = HANDLED_KWARGS | INERT_KWARGS | DIRECT_KWARGS


class UnsupportedAttention(ValueError):
    """The model asks its attention for something packserve's backends do not compute."""


def check_attention_kwargs(kwargs: dict) -> None:
    if kwargs.keys() <= KNOWN_KWARGS and not kwargs.get("dropout"):
        return  # every layer of every forward: one set comparison
    unknown = sorted(k for k, v in kwargs.items() if k not in KNOWN_KWARGS and v is not None)
    if unknown:
        raise UnsupportedAttention(
            f"the model passes {', '.join(map(repr, unknown))} to its attention function, "
            "which packserve's attention backends do not implement")
    if kwargs.get("dropout"):
        raise UnsupportedAttention(f"attention dropout {kwargs['dropout']} in inference "
                                   "(the model is in training mode)")


def check_no_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError(
            "packed attention received a dense attention_mask; this model builds its own "
            "mask and is not supported by packserve's varlen backends"
        )


def _is_causal(module, is_causal) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def varlen_window(sliding_window, causal: bool) -> tuple[int, int]:
    """flash-attn style (left, right) window; -1 = unbounded."""
    left = sliding_window - 1 if sliding_window else -1
    return left, 0 if causal else left


def _segment_bounds(query: torch.Tensor, cu_seq_lens_q) -> list[int]:
    if cu_seq_lens_q is not None:
        return cu_seq_lens_q.tolist()  # a device sync: fine for the reference path
    if query.shape[0] != 1:
        raise ValueError("packed attention without cu_seq_lens_q needs batch 1")
    return [0, query.shape[2]]


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        is_causal=None, sliding_window=None, cu_seq_lens_q=None,
                        packserve_groups=None, softcap=None, **kwargs):
    """Per-segment SDPA over ``cu_seq_lens_q``: the slow, obviously right baseline. With
    ``packserve_groups`` (a ``worker.attention.cpu.SegmentGroups`` the packed runner
    plans once per bin on CPU) similar-length segments run as one padded call each.
    With ``softcap`` (which SDPA cannot apply) each segment runs ``softcapped_attention``."""
    check_no_mask(attention_mask)
    causal = _is_causal(module, is_causal)
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if softcap:
        packserve_groups = None
    if packserve_groups is not None:
        out = grouped_attention(packserve_groups, query, key, value, scaling=scaling,
                                causal=causal, sliding_window=sliding_window)
        return out, None
    out = query.new_empty(1, query.shape[2], query.shape[1], value.shape[-1])
    bounds = _segment_bounds(query, cu_seq_lens_q)
    for start, end in itertools.pairwise(bounds):  # one SDPA per sequence in the bin
        mask = window_mask(end - start, sliding_window, causal, query.device)
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if softcap:
            if mask is None and causal:
                mask = torch.ones(end - start, end - start, dtype=torch.bool,
                                  device=query.device).tril_()
            o = softcapped_attention(q, k, v, mask, scaling, softcap)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=causal and mask is None, scale=scaling)
        out[:, start:end] = o.transpose(1, 2)
    return out, None


def softcapped_attention(q, k, v, mask, scale, softcap: float) -> torch.Tensor:
    """Attention with capped scores, in plain ops (SDPA has no cap): ``q`` [..., Lq, D],
    ``k``/``v`` [..., Lk, D] with as many heads, ``mask`` bool [Lq, Lk] or broadcastable
    (True = attend) or None; scores ``softcap * tanh(q.k * scale / softcap)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def _to_varlen(query, key, value):
    """[1, H, T, D] -> [T, H, D] (views when the projections left them contiguous)."""
    return (query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1))


def torch_varlen_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, is_causal=None, sliding_window=None,
                           cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                           max_length_k=None, **kwargs):
    """``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside torch, CUDA)."""
    check_no_mask(attention_mask)
    refuse_softcap("torch_varlen", kwargs.get("softcap"))
    from torch.nn.attention.varlen import varlen_attn

    causal = _is_causal(module, is_causal)
    q, k, v = _to_varlen(query, key, value)
    q, extra, rep = varlen_kwargs(q, k.shape[1], scaling, sliding_window, causal)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    max_k = max_length_k if max_length_k is not None else max_length_q
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_k, max_length_q, max_k, **extra)
    return out.unsqueeze(0), None


@functools.cache
def varlen_params() -> frozenset[str]:
    """Parameter names of the installed ``varlen_attn`` (its signature moved between
    torch 2.10, 2.11 and 2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_kwargs(q: torch.Tensor, num_kv_heads: int, scaling, sliding_window, causal: bool):
    """(q, keywords, kv_repeat) for the installed ``varlen_attn``, q as [T, Hq, D].

    ==========  ================================  ===================================
    torch       causal / window                   GQA
    ==========  ================================  ===================================
    2.10        ``is_causal`` (no window)          caller repeats K/V ``kv_repeat`` x
    2.11        ``window_size=(left, 0)``          caller repeats K/V ``kv_repeat`` x
    2.12+       ``window_size=(left, 0)``          ``enable_gqa=True`` (kv_repeat 1)
    ==========  ================================  ===================================

    Without a ``scale`` parameter the scale is folded into q.
    """
    params, extra = varlen_params(), {}
    if "window_size" in params:
        extra["window_size"] = varlen_window(sliding_window, causal)
    else:
        if sliding_window:
            raise NotImplementedError("sliding-window attention needs torch >= 2.11 varlen_attn")
        extra["is_causal"] = causal
    if "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * q.shape[-1] ** 0.5)
    rep = q.shape[1] // num_kv_heads
    if rep > 1 and "enable_gqa" in params:
        extra["enable_gqa"], rep = True, 1
    return q, extra, rep


def flash_attn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         is_causal=None, sliding_window=None, cu_seq_lens_q=None,
                         cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                         softcap=None, **kwargs):
    """``flash_attn.flash_attn_varlen_func`` (the flash-attn package; GQA native)."""
    check_no_mask(attention_mask)
    from flash_attn import flash_attn_varlen_func

    causal = _is_causal(module, is_causal)
    q, k, v = _to_varlen(query, key, value)
    out = flash_attn_varlen_func(
        q, k, v,
        cu_seq_lens_q,
        cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
        max_length_q,
        max_length_k if max_length_k is not None else max_length_q,
        dropout_p=0.0, softmax_scale=scaling, causal=causal,
        window_size=varlen_window(sliding_window, causal), softcap=softcap or 0.0,
    )
    return out.unsqueeze(0), None


SOFTCAP_BACKENDS = frozenset({"flash_attn", "reference"})  # packed backends with softcap


def attention_softcap(hf_config) -> float | None:
    """The cap a model puts on its attention scores (Gemma 2), or None."""
    return getattr(hf_config, "attn_logit_softcapping", None) or None


def refuse_softcap(backend: str, softcap) -> None:
    if softcap:
        raise UnsupportedAttention(f"the {backend!r} attention backend cannot cap attention "
                                   "scores (softcap); the engine selects one that can")


_FUNCTIONS = {
    "flash_attn": flash_attn_attention,
    "torch_varlen": torch_varlen_attention,
    "reference": reference_attention,
}
