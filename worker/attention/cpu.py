"""Grouped attention for the CPU reference backend: few SDPA calls per bin, not one per
sequence.

Profiling the packed CPU path (MiniLM, Azure-like lengths, 2 cores) showed the per-
sequence SDPA loop of ``reference_attention`` as its largest cost after the GEMMs: one
call per sequence per layer (tens of thousands per job), each a parallel region whose
fixed cost (thread wake-up, scratch buffers) dwarfs the work for sequences of ~100
tokens, and one strided copy per sequence to write its output. Here the runner plans,
once per bin, groups of consecutive sequences of similar lengths; each group runs as one
SDPA call over a ``[group, heads, longest, dim]`` batch, and its output is written back
in one copy. Encoders mask the padded keys (``key_pad``). Causal groups need no mask:
pads sit after each sequence's real tokens, where no real query looks, so the group runs
SDPA's ``is_causal`` kernel like a lone sequence; a sliding window that binds inside the
group still gets an explicit ``[g, 1, L, L]`` mask.

The padding is attention-only and bounded: a group grows while its padded size stays
within ``MAX_WASTE`` of its real tokens (FFD lays a bin's sequences out longest first,
so neighbours are close in length). Linear layers, norms and MLPs, most of the compute,
still run on real tokens only. Padded query rows see valid keys (never an all-masked
row) and are dropped.

Grouping pays only where a call's fixed cost outweighs the padded work. For causal
attention a sequence longer than ``MAX_CAUSAL_LEN`` runs alone, the per-sequence
definition's own call: on the 2-vCPU VM with little else running (docs/decisions.md),
grouping longer causal sequences cost 13-27% more attention time than one call each
(18% on Azure-length decoder bins), and groups of at most 128 tokens cost no more.
Only a loaded machine, where every call waits for a time slice, would win it back; the
rule is chosen never to lose to the definition. Encoders group at every length, as
before.

| ``SegmentGroup``  | shape          | what                                                   |
|-------------------|----------------|--------------------------------------------------------|
| ``rows``          | ``[g * L]``    | token row of (sequence, position); pads: the group's first row |
| ``valid_rows``    | ``[real]``     | where the real tokens sit in ``[g * L]``, in token order |
| ``key_pad``       | ``[g,1,1,L]``  | additive: 0 for real keys, -inf for padded ones          |
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MAX_WASTE = 0.25  # a group's padded tokens <= (1 + MAX_WASTE) x its real tokens
MAX_GROUP = 64  # sequences per group (bounds the [g, longest, longest] score tiles)
MAX_CAUSAL_LEN = 128  # causal sequences longer than this run alone with is_causal


@dataclass(frozen=True)
class GroupingRule:
    """Which sequences a causal plan groups and how its groups are masked. ``RULE`` is
    what runs; ``LEGACY_RULE`` (no length limit, explicit causal masks: the rule before
    issue 24) is kept so benchmarks/pooled.py can time both in one process."""

    max_causal_len: int | None = MAX_CAUSAL_LEN  # None: causal sequences group at any length
    causal_mask: bool = False  # True: causal groups get an explicit [g, 1, L, L] mask


RULE = GroupingRule()
LEGACY_RULE = GroupingRule(max_causal_len=None, causal_mask=True)


@dataclass
class SegmentGroup:
    start: int  # first token row of the group
    end: int  # one past its last token row
    num_seqs: int  # g
    longest: int  # L
    rows: torch.Tensor | None  # [g * L] int64; None for a group of one sequence
    valid_rows: torch.Tensor | None  # [end - start] int64: rows of the real tokens in [g * L]
    key_pad: torch.Tensor | None  # [g, 1, 1, L] float: 0 for real keys, -inf for pads
    _masks: dict = field(default_factory=dict)  # (causal, window) -> additive mask

    def mask(self, causal: bool, window, causal_mask: bool = False) -> torch.Tensor | None:
        """Additive float mask (SDPA on CPU turns a bool mask into one on every call):
        ``None`` for causal attention (run with ``is_causal``; pads come after every real
        key) unless ``causal_mask``, ``[g, 1, 1, L]`` for plain encoders, ``[g, 1, L, L]``
        with a window that binds (or ``causal_mask``)."""
        if window and self.longest <= window:
            window = None  # no query of the group reaches past the window
        if causal and not window and not causal_mask:
            return None
        if not causal and not window:
            return self.key_pad
        key = (causal, window or 0)
        if key not in self._masks:  # built at the first layer, reused by the others
            i = torch.arange(self.longest, device=self.key_pad.device)
            dist = i[:, None] - i[None, :]
            blocked = torch.zeros_like(dist, dtype=torch.bool)
            if causal:
                blocked |= dist < 0
            if window:
                blocked |= dist.abs() >= window
            inf = torch.zeros(dist.shape, dtype=self.key_pad.dtype, device=dist.device)
            self._masks[key] = self.key_pad + inf.masked_fill_(blocked, float("-inf"))
        return self._masks[key]


class SegmentGroups:
    """The groups of one packed bin, planned on the host from its ``cu_seqlens``.
    ``causal``: whether the model's attention is causal (a planning choice only: the
    groups give the right answer either way)."""

    def __init__(self, host_cu_seqlens: np.ndarray, device: torch.device,
                 dtype: torch.dtype = torch.float32, *, causal: bool = False,
                 rule: GroupingRule | None = None):
        rule = rule or RULE  # read at call time: the benchmark swaps ``RULE``
        cu = np.asarray(host_cu_seqlens, np.int64)
        max_len = rule.max_causal_len if causal else None
        self.causal_mask = rule.causal_mask
        self.groups = [self._group(cu, i, j, device, dtype)
                       for i, j in _cuts(np.diff(cu), max_len)]

    @staticmethod
    def _group(cu: np.ndarray, i: int, j: int, device, dtype) -> SegmentGroup:
        lengths = np.diff(cu[i:j + 1])
        g, longest = j - i, int(lengths.max())
        if g == 1:
            return SegmentGroup(int(cu[i]), int(cu[j]), 1, longest, None, None, None)
        pos = np.arange(longest)
        valid = pos[None, :] < lengths[:, None]  # [g, L]
        rows = np.where(valid, cu[i:j, None] + pos[None, :], cu[i]).reshape(-1)
        key_pad = np.where(valid, 0.0, -np.inf)[:, None, None, :]
        return SegmentGroup(int(cu[i]), int(cu[j]), g, longest,
                            torch.from_numpy(rows).to(device),
                            torch.from_numpy(np.flatnonzero(valid)).to(device),
                            torch.from_numpy(key_pad).to(device=device, dtype=dtype))


def _cuts(lengths: np.ndarray, max_len: int | None = None) -> list[tuple[int, int]]:
    """[(first, one past last)] sequence ranges; greedy over consecutive sequences. A
    sequence longer than ``max_len`` (None: no limit) is a range of its own."""
    out, i, n = [], 0, len(lengths)
    limit = max_len if max_len is not None else np.inf
    while i < n:  # per sequence of the bin, once per bin
        j, longest, real = i + 1, int(lengths[i]), int(lengths[i])
        while j < n and j - i < MAX_GROUP:
            grown = max(longest, int(lengths[j]))
            if grown > limit or grown * (j + 1 - i) > (1 + MAX_WASTE) * (real + int(lengths[j])):
                break
            longest, real, j = grown, real + int(lengths[j]), j + 1
        out.append((i, j))
        i = j
    return out


def grouped_attention(groups: SegmentGroups, query, key, value, *, scaling, causal: bool,
                      sliding_window) -> torch.Tensor:
    """Attention of every sequence of the bin -> ``[1, T, Hq, D]``. ``query`` is
    ``[1, Hq, T, D]``, ``key``/``value`` ``[1, H, T, D]`` with K/V already repeated to Hq."""
    num_heads, dim = query.shape[1], value.shape[-1]
    out = query.new_empty(1, query.shape[2], num_heads, dim)
    flat = [t[0].transpose(0, 1) for t in (query, key, value)]  # [T, H, D]
    for g in groups.groups:  # one SDPA call per group, per layer
        s, e = g.start, g.end
        if g.rows is None:
            o = F.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                attn_mask=window_mask(e - s, sliding_window, causal, query.device),
                is_causal=causal and not (sliding_window and e - s > sliding_window),
                scale=scaling)
            out[:, s:e] = o.transpose(1, 2)
            continue
        q, k, v = (torch.index_select(t, 0, g.rows).view(g.num_seqs, g.longest, -1, dim)
                   .transpose(1, 2) for t in flat)  # [g, H, L, D]
        mask = g.mask(causal, sliding_window, groups.causal_mask)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=causal and mask is None, scale=scaling)
        o = o.transpose(1, 2).reshape(g.num_seqs * g.longest, num_heads, dim)
        torch.index_select(o, 0, g.valid_rows, out=out[0, s:e])
    return out


def window_mask(length: int, sliding_window, causal: bool, device):
    """The boolean SDPA mask of one sequence under a sliding window (``None`` when the
    window covers it): a query at ``i`` sees keys ``j`` with ``|i - j| < window``, and
    ``j <= i`` when ``causal``."""
    if not sliding_window or length <= sliding_window:
        return None
    i = torch.arange(length, device=device)
    dist = i[:, None] - i[None, :]
    inside = dist.abs() < sliding_window
    return inside & (dist >= 0) if causal else inside
