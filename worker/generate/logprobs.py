"""A step's sampled tokens and logprobs, back on the host in one device-to-host read.

Logprobs are computed for the rows that asked only (``logprobs`` set), all of them at
once: one ``log_softmax`` over their [m, vocab] logits, one ``gather`` for the sampled
tokens, one ``topk`` with the largest k asked this step. A row's values do not depend
on its batch mates (each op reduces along the vocabulary alone), so they are what the
per-sequence computation gives, bit for bit (``tests/worker/generate/test_logprobs.py``
holds them to it). A request that asks for ``logprobs=20`` thus costs a step one row of
work, not one row per running sequence.

Every result of the step (tokens, the m chosen logprobs, the m x k top ids and values)
is packed into one float64 vector on the device and read back once (float64 holds
float32 values and token ids below 2**53 exactly):

==================  =====================================
``[0, n)``          sampled token ids, one per row
``[n, n + m)``      log p(sampled token), rows that asked
``[.., + m k)``     top-k token ids, row-major
``[.., + m k)``     top-k logprobs, row-major
==================  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SampledTokens:
    """One step's sampling result, on the host (one device-to-host read). Rows that did
    not ask for logprobs hold None and [] in the logprob fields."""

    token_ids: list[int]  # [n]
    logprobs: list[float | None] | None = None  # [n]: log p(sampled token); None when no
    #   row asked
    top_ids: list[list[int]] = field(default_factory=list)  # [n][k_max] ([] when no logprobs)
    top_logprobs: list[list[float]] = field(default_factory=list)  # [n][k_max]


def read_step(logits: torch.Tensor, tokens: torch.Tensor, ks: np.ndarray,
              asking: np.ndarray, at: torch.Tensor | None) -> SampledTokens:
    """``logits`` [n, vocab] (the raw distribution), ``tokens`` [n] sampled, ``ks`` [n]
    int64 each row's top k (-1: no logprobs), ``asking`` [m] = ``flatnonzero(ks >= 0)``,
    ``at``: ``asking`` on the device when 0 < m < n (else None)."""
    n, m = tokens.shape[0], asking.size
    if m == 0:
        return SampledTokens(tokens.tolist())
    k_max = int(ks[asking].max())
    if at is not None:
        logits, asked = logits.index_select(0, at), tokens.index_select(0, at)
    else:
        asked = tokens
    logprobs = torch.log_softmax(logits, dim=-1)
    parts = [tokens.double(), logprobs.gather(1, asked[:, None])[:, 0].double()]
    if k_max > 0:
        top = logprobs.topk(k_max, dim=-1)
        parts += [top.indices.double().flatten(), top.values.double().flatten()]
    host = torch.cat(parts).cpu().numpy()  # the step's one device-to-host read
    mk = m * k_max
    token_ids = host[:n].astype(np.int64).tolist()
    chosen = host[n: n + m].tolist()
    top_ids = host[n + m: n + m + mk].astype(np.int64).reshape(m, k_max).tolist()
    top_values = host[n + m + mk:].reshape(m, k_max).tolist()
    if m == n:
        return SampledTokens(token_ids, chosen, top_ids if k_max else [],
                             top_values if k_max else [])
    out = SampledTokens(token_ids, [None] * n)
    if k_max:
        out.top_ids, out.top_logprobs = [[]] * n, [[]] * n
    for j, i in enumerate(asking.tolist()):  # per row that asked for logprobs
        out.logprobs[i] = chosen[j]
        if k_max:
            out.top_ids[i], out.top_logprobs[i] = top_ids[j], top_values[j]
    return out
