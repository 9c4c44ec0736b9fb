"""Verify a speculative step: accept a prefix of each sequence's proposals, sample one more.

A sequence that proposed d_1..d_m computed m + 1 positions this step; position j's
logits give the target's distribution p_j of the token after d_1..d_j (processed as
without speculation: each position's penalties, bias and grammar mask see the tokens
before it). The standard rule (Leviathan et al. 2023; Chen et al. 2023), per sequence:

- d_{j+1} is accepted with probability min(1, p_j(d) / q_j(d)), q_j the proposer's
  distribution (a point mass for n-gram proposals, the draft's for a draft model);
  the first rejection ends the proposal;
- after a rejection at j, one token is drawn from (p_j - q_j)+, normalised (n-gram:
  p_j without d); when every proposal was accepted, one from p_m (the bonus token).

Every emitted token then has exactly the target's distribution. Greedy rows accept
while d equals the target's argmax and end with the argmax: the tokens of greedy
decoding without speculation. Rows without proposals (m = 0) sample as usual.

Randomness comes from the row's own generator when the request has a seed (uniforms
for the acceptances, then the exponential race for the last token), else from the
device's default generator. Host reads: the argmaxes and acceptances together, then
the emitted tokens with their logprobs (``read_step``), as one step's sampling reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from worker.generate.logprobs import SampledTokens, read_step
from worker.generate.sampling import Sampler, SamplingRows, _race


@dataclass(frozen=True)
class Verified:
    """A verified step, on the host. ``sampled`` holds every emitted token in order: the
    sampling sequence i's ``counts[i]`` tokens (its accepted proposals, then one more)."""

    sampled: SampledTokens
    counts: list[int]  # [n] tokens emitted per sampling sequence (accepted + 1)
    num_verified: list[int]  # [n] proposals verified
    num_accepted: list[int]  # [n] of those, accepted


def verify(sampler: Sampler, logits: torch.Tensor, raw: torch.Tensor | None,
           state: SamplingRows, own: np.ndarray, proposals: list[np.ndarray],
           draft_probs: torch.Tensor | None = None) -> Verified:
    """``logits`` [S, vocab] (processed; ``raw`` before processing, for logprobs, None:
    the same), ``own`` [n] the sampling sequences' state rows; sequence i's
    ``len(proposals[i]) + 1`` positions are consecutive rows of ``logits``, in order.
    ``draft_probs`` [sum of the proposals, vocab]: q of each proposal, in order (None:
    point masses, n-gram)."""
    device = logits.device
    m = np.fromiter((len(p) for p in proposals), np.int64, len(proposals))
    group = m + 1
    starts = np.cumsum(group) - group  # [n] first position of each sequence
    pos_own = np.repeat(own, group)  # [S] state row of each position
    drawing_pos = np.flatnonzero(state.temperature[pos_own] > 0)  # [D] positions that draw
    prop_pos = np.repeat(starts, m) + _ranks(m)  # [M] position verifying each proposal
    prop_tok = (np.concatenate(proposals).astype(np.int64) if m.sum()
                else np.zeros(0, np.int64))  # [M]
    argmax = logits.argmax(dim=-1)  # [S]
    probs = None  # [D, vocab]: p of the drawing positions, row row_of[position]
    row_of = np.full(logits.shape[0], -1, np.int64)
    row_of[drawing_pos] = np.arange(drawing_pos.size)
    if drawing_pos.size:
        at = torch.from_numpy(drawing_pos).to(device)
        probs = sampler.probs(logits.index_select(0, at), state, pos_own[drawing_pos])
    accept = _accept(argmax, probs, row_of, state, pos_own, prop_pos, prop_tok, draft_probs,
                     device)
    host = torch.cat([argmax.double(), accept.double()]).cpu().numpy()  # one read
    argmax_h, accept_h = host[: logits.shape[0]].astype(np.int64), host[logits.shape[0]:] > 0
    accepted = _leading(accept_h, m)  # [n]
    final_pos = starts + accepted
    tokens = argmax_h[final_pos].copy()  # greedy rows: the argmax
    drawing_seq = np.flatnonzero(state.temperature[own] > 0)
    if drawing_seq.size:
        tokens[drawing_seq] = _draw_last(probs, row_of, state, own, drawing_seq, final_pos,
                                         accepted, m, prop_tok, draft_probs)
    emitted_pos, emitted_tok = [], []
    off = np.cumsum(m) - m  # [n] first proposal of each sequence among the M
    for i in range(len(proposals)):  # per sampling sequence
        a = int(accepted[i])
        emitted_pos.append(np.arange(starts[i], starts[i] + a + 1))
        emitted_tok.append(np.append(prop_tok[off[i]: off[i] + a], tokens[i]))
    pos = np.concatenate(emitted_pos)
    tok = np.concatenate(emitted_tok)
    source = logits if raw is None else raw
    ks = state.logprobs[pos_own[pos]]
    asking = np.flatnonzero(ks >= 0)
    if asking.size:
        rows = source.index_select(0, torch.from_numpy(pos).to(device))
        at = (torch.from_numpy(asking).to(device) if asking.size < pos.size else None)
        sampled = read_step(rows, torch.from_numpy(tok).to(device), ks, asking, at)
    else:
        sampled = SampledTokens(tok.tolist())
    return Verified(sampled, (accepted + 1).tolist(), m.tolist(), accepted.tolist())


def _ranks(m: np.ndarray) -> np.ndarray:
    """0..m_i - 1 for each i, concatenated."""
    total = int(m.sum())
    return np.arange(total) - np.repeat(np.cumsum(m) - m, m)


def _accept(argmax: torch.Tensor, probs: torch.Tensor | None, row_of: np.ndarray,
            state: SamplingRows, pos_own: np.ndarray, prop_pos: np.ndarray, prop_tok: np.ndarray,
            draft_probs: torch.Tensor | None, device) -> torch.Tensor:
    """[M] bool: each proposal accepted on its own (the leading run is taken later)."""
    if not prop_pos.size:
        return torch.zeros(0, dtype=torch.bool, device=device)
    pos_t = torch.from_numpy(prop_pos).to(device)
    tok_t = torch.from_numpy(prop_tok).to(device)
    accept = argmax.index_select(0, pos_t) == tok_t  # greedy rows' rule
    own = pos_own[prop_pos]
    drawing = np.flatnonzero(state.temperature[own] > 0)  # [r] among the M
    if drawing.size:
        at = torch.from_numpy(drawing).to(device)
        rows = torch.from_numpy(row_of[prop_pos[drawing]]).to(device)
        p = probs[rows, tok_t.index_select(0, at)]
        q = (draft_probs[at, tok_t.index_select(0, at)] if draft_probs is not None
             else torch.ones_like(p))
        u = _uniforms(state, own[drawing], device)
        accept.index_copy_(0, at, u * q < p)  # u < p / q, without dividing by q
    return accept


def _uniforms(state: SamplingRows, own: np.ndarray, device) -> torch.Tensor:
    """One U[0, 1) per row ``own`` [r]: from a seeded row's generator, else the default."""
    u = torch.rand(own.size, device=device)
    for j in np.flatnonzero(state.seeded[own]).tolist():  # per seeded proposal
        u[j] = torch.rand(1, device=device, generator=state.generators[own[j]])[0]
    return u


def _leading(accept: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[n] the length of each sequence's leading run of accepted proposals."""
    out = np.zeros(m.size, np.int64)
    off = 0
    for i, n in enumerate(m.tolist()):  # per sampling sequence, on the host
        run = accept[off: off + n]
        rejected = np.flatnonzero(~run)
        out[i] = rejected[0] if rejected.size else n
        off += n
    return out


def _draw_last(probs: torch.Tensor, row_of: np.ndarray, state: SamplingRows, own: np.ndarray,
               drawing_seq: np.ndarray, final_pos: np.ndarray, accepted: np.ndarray,
               m: np.ndarray, prop_tok: np.ndarray, draft_probs: torch.Tensor | None
               ) -> np.ndarray:
    """The last token of each drawing sequence: from p at its final position, less q of
    the rejected proposal (its residual), by the exponential race."""
    device = probs.device
    dist = probs.index_select(0, torch.from_numpy(row_of[final_pos[drawing_seq]]).to(device))
    off = np.cumsum(m) - m
    rejected = np.flatnonzero(accepted[drawing_seq] < m[drawing_seq])  # [r] among drawing
    if rejected.size:
        seqs = drawing_seq[rejected]
        which = off[seqs] + accepted[seqs]  # the rejected proposal of each, among the M
        at = torch.from_numpy(rejected).to(device)
        rows = dist.index_select(0, at)
        if draft_probs is None:  # q is a point mass on the rejected token
            tok = torch.from_numpy(prop_tok[which]).to(device)
            residual = rows.scatter(1, tok[:, None], 0.0)
        else:
            residual = (rows - draft_probs.index_select(
                0, torch.from_numpy(which).to(device))).clamp_(min=0)
        empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q: no rejection was possible
        dist.index_copy_(0, at, torch.where(empty, rows, residual))
    return _race(dist, state, own[drawing_seq]).cpu().numpy()
