"""A speculative step's host side: the proposals in the token rows, the rows to sample.

The scheduler gave each speculating decode ``1 + k_i`` slots (``GenScheduler._speculate``).
Before the target's forward, ``prepare``:

1. has the proposals written into the decode's token row after its last token (the
   n-gram proposer's ``Sequence.spec_tokens``, or the draft model's k steps:
   ``worker.generate.draft``), where ``packing_cy.fill`` reads the step's tokens and the
   penalties read each position's history;
2. cuts a structured row's proposals at the first token its grammar refuses
   (``LLMatcher.validate_tokens``) and computes its mask at every verified position
   (the matcher is advanced over the proposals, then rolled back);
3. lists the positions to sample: a speculating decode's first ``m_i + 1`` tokens
   (its last token and its m_i verified proposals; the rest of its k_i, if a grammar
   cut them, are computed and discarded), every other sampling sequence's last.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from worker.generate.scheduler import GenSchedulerOutput

_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class SpecStep:
    """What ``prepare`` decided; per sampling sequence j (in ``picked`` order)."""

    proposals: list[np.ndarray]  # [n] the proposals verified (empty: a plain row)
    num_samples: np.ndarray  # [n] positions sampled: len(proposals[j]) + 1
    sample_rows: np.ndarray  # [S] their token positions in the step
    lengths: np.ndarray  # [S] tokens before each sampled position's next token
    draft_probs: torch.Tensor | None  # [sum of proposals, vocab] the draft's q; None: n-gram
    masks: tuple[list[int], Future] | None  # structured positions and their masks


def prepare(runner, out: GenSchedulerOutput, rows: np.ndarray, picked: list[int]
            ) -> SpecStep | None:
    """The step's speculation (see the module docstring); None when no decode proposes."""
    nd = out.num_decodes
    k = np.asarray(out.num_new_tokens[:nd], np.int64) - 1  # [nd] slots for proposals
    if not nd or not k.any():
        return None
    state, seqs = runner.state, out.seqs
    draft_probs = None
    if runner.draft is not None:
        draft_probs = runner.draft.propose(runner, out, rows, k)  # writes the token rows
    else:
        for i in np.flatnonzero(k).tolist():  # per speculating decode
            seq = seqs[i]
            state.tokens[rows[i], seq.num_tokens: seq.num_tokens + k[i]] = seq.spec_tokens[:k[i]]
    proposals = [_EMPTY] * len(picked)
    for i in np.flatnonzero(k).tolist():  # per speculating decode (picked[i] == i)
        seq = seqs[i]
        proposals[i] = state.tokens[rows[i], seq.num_tokens: seq.num_tokens + k[i]].copy()
    masks = None
    if runner.grammars is not None and any(seqs[i].matcher is not None for i in picked):
        proposals, masks, keep = _grammar(runner.grammars, seqs, picked, proposals)
        if draft_probs is not None:
            draft_probs = draft_probs.index_select(0, torch.from_numpy(keep).to(
                draft_probs.device))
    m = np.fromiter((len(p) for p in proposals), np.int64, len(proposals))
    num_samples = m + 1
    counts = np.asarray(out.num_new_tokens, np.int64)
    first = np.cumsum(counts) - counts  # [B] each sequence's first position in the step
    sample_rows = np.empty(int(num_samples.sum()), np.int64)
    lengths = np.empty_like(sample_rows)
    at = 0
    for j, i in enumerate(picked):  # per sampling sequence
        n, total = int(num_samples[j]), seqs[i].num_tokens
        if i < nd:  # a decode: its last token, then its proposals
            sample_rows[at: at + n] = first[i] + np.arange(n)
        else:  # a prefill chunk reaching its sequence's end: its last token
            sample_rows[at] = first[i] + counts[i] - 1
        lengths[at: at + n] = total + np.arange(n)
        at += n
    if masks is not None:
        masks = _at_positions(masks, num_samples)
    return SpecStep(proposals, num_samples, sample_rows, lengths, draft_probs, masks)


def _grammar(grammars, seqs, picked: list[int], proposals: list[np.ndarray]):
    """Cut structured rows' proposals at the grammar's first refusal; each structured
    position's mask. Returns (proposals, [(j, t, mask row)], kept proposal indices)."""
    out, masks, keep, off = list(proposals), [], [], 0
    for j, i in enumerate(picked):  # per sampling sequence
        props, matcher = proposals[j], seqs[i].matcher
        n = len(props)
        if matcher is not None:
            valid = matcher.validate_tokens(props.tolist()) if n and not matcher.is_error() else 0
            out[j] = props = props[:valid]
            for t in range(valid + 1):  # per verified position of a structured row
                masks.append((j, t, grammars.fill([matcher])[0].clone()))
                if t < valid:
                    matcher.consume_token(int(props[t]))
            if valid:
                matcher.rollback(valid)
        keep.extend(range(off, off + len(props)))
        off += n
    return out, masks, np.asarray(keep, np.int64)


def _at_positions(masks, num_samples: np.ndarray) -> tuple[list[int], Future]:
    """``(positions among the step's sampled rows, a done future of their masks)``: what
    ``logits_process.apply`` takes."""
    first = np.cumsum(num_samples) - num_samples
    positions = [int(first[j]) + t for j, t, _ in masks]
    done: Future = Future()
    done.set_result(torch.stack([row for _, _, row in masks]))
    return positions, done
