"""Logit processors: what a request asks to change in its row of logits before sampling.

Applied by the generation runner to the rows of a step that have any (``SamplingRows.
processed``); a step without them pays one numpy ``any``. Every processor is a few tensor
ops over the rows that use it, never a loop over rows on the device:

=====================  ====================================================================
processor              rule (per row, in this order)
=====================  ====================================================================
structured             every token its grammar does not allow at -inf (grammar.py)
repetition_penalty p   every token seen in the prompt or the output: logit / p if it is
                       > 0, else logit x p (HF's ``RepetitionPenaltyLogitsProcessor``, vLLM)
frequency_penalty f,   each token the output holds c times: logit - f x c - pr x [c > 0]
presence_penalty pr    (OpenAI's definition; the prompt does not count)
logit_bias             logit + bias, for each (token id, bias) given
min_tokens m           EOS and ``stop_token_ids`` at -inf while fewer than m are generated
=====================  ====================================================================

A -inf stays -inf through every later rule, so the order only matters among the finite
rules. Structured rows' masks are computed by llguidance on a thread of their own,
started before the forward and awaited after it, so the host computes them while the
device (or, on CPU, torch's threads) runs the forward. Counts come from the rows' token
ids, which the runner keeps on the host (``BatchState.tokens``): the penalized rows'
tokens go to the device in one copy and one ``scatter_add_`` counts them. Logprobs still
report the model's raw distribution: the runner samples from a processed copy.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import torch

from worker.generate.grammar import Grammars, apply_bitmask
from worker.generate.sampling import SamplingRows


def any_processed(state: SamplingRows, rows: np.ndarray) -> bool:
    return bool(state.processed[rows].any())


def start_masks(state: SamplingRows, rows: np.ndarray,
                grammars: Grammars | None) -> tuple[list[int], Future] | None:
    """Start computing the structured rows' masks on the grammar thread, before the
    forward (their grammars' states are known once the last step's tokens were
    consumed): (positions among ``rows``, the mask's future), or None without any."""
    if grammars is None or not state.processed[rows].any():
        return None
    structured = [i for i in np.flatnonzero(state.processed[rows]).tolist()
                  if state.matchers[rows[i]] is not None]
    if not structured:
        return None
    return structured, grammars.fill_async([state.matchers[rows[i]] for i in structured])


def apply(logits: torch.Tensor, state: SamplingRows, rows: np.ndarray, tokens: np.ndarray,
          lengths: np.ndarray, masks: tuple[list[int], Future] | None = None) -> None:
    """Process ``logits`` [n, vocab] in place; logits row i is ``state`` row ``rows[i]``,
    whose tokens so far (prompt and output) are ``tokens[rows[i], :lengths[i]]``.
    ``masks``: what ``start_masks`` returned for these rows."""
    device = logits.device
    if masks is not None:
        structured, future = masks
        apply_bitmask(logits, torch.tensor(structured, device=device), future.result())
    at = np.flatnonzero(state.penalized[rows])  # [r] positions among the n
    if at.size:
        _penalize(logits, state, rows[at], at, tokens, lengths[at])
    biased = [i for i in np.flatnonzero(state.processed[rows]).tolist()
              if state.bias[rows[i]] is not None]
    if biased:  # per biased row, on the host: its (ids, biases) arrays
        ids = [state.bias[rows[i]][0] for i in biased]
        where = np.repeat(np.array(biased, np.int64), [len(x) for x in ids])
        index = (torch.from_numpy(where).to(device),
                 torch.from_numpy(np.concatenate(ids)).to(device))
        bias = torch.from_numpy(np.concatenate([state.bias[rows[i]][1] for i in biased]))
        logits.index_put_(index, bias.to(device), accumulate=True)
    short = np.flatnonzero((state.min_tokens[rows] > 0)
                           & (lengths - state.prompt_len[rows] < state.min_tokens[rows]))
    if short.size:  # per row still short of min_tokens: its EOS and stop ids
        vocab = logits.shape[1]  # a stop id past the vocabulary can never be sampled
        ids = [x[x < vocab] for x in (state.suppress[rows[i]] for i in short.tolist())]
        where = np.repeat(short, [len(x) for x in ids])
        logits[torch.from_numpy(where).to(device),
               torch.from_numpy(np.concatenate(ids)).to(device)] = float("-inf")


def _penalize(logits: torch.Tensor, state: SamplingRows, own: np.ndarray, at: np.ndarray,
              tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Repetition, frequency and presence penalties for the rows ``at`` (state rows
    ``own``), from one padded [r, longest] copy of their tokens."""
    device, vocab = logits.device, logits.shape[1]
    longest = int(lengths.max())
    ids = torch.from_numpy(np.ascontiguousarray(tokens[own, :longest])).to(device)
    pos = torch.arange(longest, device=device)[None, :]
    length = torch.from_numpy(lengths).to(device)[:, None]
    prompt_len = torch.from_numpy(state.prompt_len[own]).to(device)[:, None]
    output = ((pos >= prompt_len) & (pos < length)).float()  # [r, longest]
    counts = torch.zeros(len(own), vocab, device=device).scatter_add_(1, ids, output)
    x = logits[torch.from_numpy(at).to(device)]  # [r, vocab] copy
    repetition = torch.from_numpy(state.repetition[own]).to(device)[:, None]
    seen = torch.zeros_like(counts).scatter_add_(1, ids, (pos < length).float()) > 0
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    frequency = torch.from_numpy(state.frequency[own]).to(device)[:, None]
    presence = torch.from_numpy(state.presence[own]).to(device)[:, None]
    x -= frequency * counts + presence * (counts > 0).float()
    logits[torch.from_numpy(at).to(device)] = x
