"""The draft model of speculative decoding (``speculative.method = "draft"``).

A small causal LM of the target's vocabulary, loaded like the target (its attention
patched to read a paged cache), with a KV cache of its own laid out like the target's:
the same number of blocks of the same size, indexed by the *target's* block tables. So
the draft needs no block manager: every slot the target's scheduler hands out is a slot
in both caches, freed, shared through the prefix cache and preempted together.

Two kinds of forward, both over the runner's staging buffer and block table:

- ``forward_kv``, after every target forward, on the same staged step: the draft's K/V
  of every token the target computed (prefill chunks, decodes, verified proposals), so
  its cache always covers a sequence's computed tokens, prefix-cache hits included
  (a cached block's draft K/V was written with the target's, in the step that computed
  it);
- ``propose``, before the target's forward: k one-token steps for the speculating
  decodes (token j + 1 proposed from token j, at the positions the target then
  verifies), each drawn from the draft's distribution q under the row's sampling
  parameters (greedy rows: its argmax) and read back to go into the token rows.

The K/V ``propose`` writes at the verified positions is written again by ``forward_kv``
with the same tokens; a rejected proposal's slots are trimmed with the target's.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from worker.generate.inputs import apply_updates, stage_step
from worker.generate.sampling import _race
from worker.kv.cache import KVCache, KVCacheSpec
from worker.models.lm_head import lm_head


class Draft:
    """The draft model and its cache, on the target's device."""

    def __init__(self, model: torch.nn.Module, spec: KVCacheSpec, num_blocks: int, device,
                 vocab_size: int):
        """``num_blocks``: the target cache's (its scratch block included);
        ``vocab_size``: the target's (the draft's may be smaller: its q is 0 past it)."""
        self.model, self.spec = model, spec
        self.base, self.head = model.base_model, lm_head(model)
        self.cache = KVCache(spec, num_blocks, device)
        self.vocab_size = vocab_size
        self.num_params = sum(p.numel() for p in model.parameters())
        self.last_steps, self.last_seconds = 0, 0.0  # the last propose's steps and time

    @torch.inference_mode()
    def forward_kv(self, runner, dev: torch.Tensor, meta, *, all_rows: bool = False) -> None:
        runner.forward_model(self.base, None, self.cache, dev, meta, all_rows)

    @torch.inference_mode()
    def propose(self, runner, out, rows: np.ndarray, k: np.ndarray) -> torch.Tensor | None:
        """Write each speculating decode i's ``k[i]`` proposals into its token row (after
        its last token); returns q of every proposal [sum k, vocab] (decode-major), or
        None when every speculating row is greedy (q is then never read)."""
        start = time.perf_counter()
        state, seqs = runner.state, out.seqs
        sampling = state.sampling
        active = np.flatnonzero(k)
        drawing = bool((sampling.temperature[rows[active]] > 0).any())
        probs: list[list[torch.Tensor]] = [[] for _ in range(len(k))]
        computed = np.fromiter((seqs[i].num_computed for i in range(len(seqs))), np.int64,
                               len(seqs))
        for j in range(int(k.max())):  # per proposal position
            act = active[k[active] > j]
            r = rows[act]
            state.starts[r] = computed[act] + j
            state.counts[r] = 1
            meta = stage_step(runner.host.numpy(), state, [seqs[i] for i in act.tolist()],
                              [1] * act.size, r, list(range(act.size)),
                              max_updates=runner.max_updates)
            dev = runner._copy(meta.layout.words)
            apply_updates(runner.table, dev, meta, state)
            logits = runner.forward_model(self.base, self.head, self.cache, dev, meta)
            tokens, q = self._sample(runner, logits, sampling, r, drawing)
            state.tokens[r, computed[act] + j + 1] = tokens
            if q is not None:
                for row, i in enumerate(act.tolist()):  # per speculating decode
                    probs[i].append(q[row])
        # The target's step reads the token rows from its own starts and counts.
        state.starts[rows] = computed
        state.counts[rows] = out.num_new_tokens
        self.last_steps, self.last_seconds = int(k.max()), time.perf_counter() - start
        if not drawing:
            return None
        return torch.stack([p for per in probs for p in per])

    def _sample(self, runner, logits: torch.Tensor, sampling, rows: np.ndarray,
                drawing: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        """Tokens [n] and, when some rows draw, q [n, vocab] (greedy rows: one-hot)."""
        pad = self.vocab_size - logits.shape[1]
        if pad:
            logits = torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
        if not drawing:
            return logits.argmax(dim=-1).cpu().numpy(), None
        temps = sampling.temperature[rows]
        q = torch.zeros_like(logits)
        greedy = np.flatnonzero(temps == 0)
        draw = np.flatnonzero(temps > 0)
        if greedy.size:
            g = torch.from_numpy(greedy).to(logits.device)
            q.index_put_((g, logits.index_select(0, g).argmax(dim=-1)),
                         torch.ones(greedy.size, device=logits.device))
        if draw.size:
            d = torch.from_numpy(draw).to(logits.device)
            q.index_copy_(0, d, runner.sampler.probs(logits.index_select(0, d), sampling,
                                                     rows[draw]))
        tokens = _race(q.clone(), sampling, rows)
        return tokens.cpu().numpy(), q


def draft_kv_spec(model, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
    """The draft's cache layout: the target's block size, the draft's own shapes, its
    compute dtype (an FP8 target cache does not make the draft's FP8)."""
    return KVCacheSpec.for_model(model, dtype, block_size)
