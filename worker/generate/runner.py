"""Run one generation step: stage the step's inputs, forward over the paged cache (a
CUDA graph for decode-only steps, eager otherwise), sample the next tokens.

Keep this file minimal. What a step's buffer holds, and how rows of persistent state
make staging O(what changed), is in ``worker.generate.inputs``; graph capture and replay in
``worker.generate.cuda_graphs``.

The host waits for every step's sampled tokens (the next step's inputs depend on
them), so one staging buffer is enough: it is never refilled while its copy is in
flight.

Out of memory in the forward: ``run`` returns None and the engine recovers (see
``Generation.recover_from_oom``); sampling never ran, so no generator advanced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from worker.attention.context import attention_context
from worker.attention.paged import PagedContext, PagedMetadata, context_slots
from worker.core.memory import is_out_of_memory
from worker.generate import logits_process
from worker.generate.inputs import BatchState, HostMeta, StepLayout, apply_updates, stage_step
from worker.generate.rejection import Verified, verify
from worker.generate.sampling import SampledTokens, Sampler, SamplingRows
from worker.generate.scheduler import GenSchedulerOutput
from worker.generate.sequence import Sequence
from worker.generate.spec_step import prepare
from worker.kv.block_manager import BlockManager
from worker.kv.cache import KVCache
from worker.lora.layers import LoRABatch, LoRARows, lora_context
from worker.models.lm_head import lm_head


class GenRunner:
    """Owns the step buffers, the persistent rows and the sampler; borrows the model, the
    cache (whose block ``cache.num_blocks - 1`` is the padding rows' scratch block) and
    the block manager."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, blocks: BlockManager, device, *,
                 backend: str, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, eos_token_ids: frozenset[int] = frozenset(),
                 grammars=None, loras=None, speculative_tokens: int = 0, draft=None):
        """``speculative_tokens``: the most proposals a decode carries (0: no speculation);
        ``draft``: the draft model proposing them (``worker.generate.draft.Draft``; None:
        n-gram proposals, ``Sequence.spec_tokens``)."""
        self.model, self.cache, self.blocks, self.device = model, cache, blocks, device
        self.base, self.head = model.base_model, lm_head(model)
        self.vocab_size = self.head.vocab_size
        self.backend, self.max_model_len = backend, max_model_len
        self.sampler = Sampler(device.device, max_num_seqs)
        self.state = BatchState(max_num_seqs, max_model_len, blocks.block_size,
                                cache.num_blocks - 1, SamplingRows(max_num_seqs))
        self.state.sampling.eos_token_ids = np.array(sorted(eos_token_ids), np.int64)
        self.grammars = grammars  # worker.generate.grammar.Grammars: structured rows' masks
        self.loras = loras  # worker.lora.manager.LoRAManager (None: no adapters)
        self.num_lora_steps = 0  # steps that ran adapter rows
        self.table = torch.from_numpy(self.state.tables).to(device.device, copy=True)
        # A step adds at most a block per sequence plus one per block_size tokens.
        self.max_updates = max_num_batched_tokens // blocks.block_size + max_num_seqs + 1
        self.speculating, self.draft = speculative_tokens > 0, draft
        samples = min(max_num_batched_tokens, max_num_seqs * (1 + speculative_tokens))
        words = StepLayout.capacity(max_num_batched_tokens, max_num_seqs, self.max_updates,
                                    samples)
        self.host = torch.zeros(words, dtype=torch.int64, pin_memory=device.pin_memory)
        self.dev = (torch.empty(words, dtype=torch.int64, device=device.device)
                    if device.needs_copy else self.host)
        self.graphs = None  # a DecodeGraphs once installed (worker.generate.cuda_graphs)
        self.num_graph_steps = 0  # steps that replayed a graph (or ran padded on CPU)
        # Test-only fault injection: called as fault_hook(num_tokens, num_seqs) before
        # every forward; raise torch.OutOfMemoryError from it to exercise OOM recovery.
        self.fault_hook: Callable[[int, int], None] | None = None
        # Rank 0 of a tensor-parallel replica: a worker.parallel.steps.StepSender that
        # broadcasts each staged step before its forward (None on one device).
        self.step_sender = None

    def release(self, seq: Sequence) -> None:
        """Forget ``seq``'s row (it finished or was preempted)."""
        self.state.release(seq.seq_id)

    def resync(self, seq: Sequence) -> None:
        """``seq``'s blocks past a kept prefix were returned (a step undone)."""
        self.state.resync_blocks(seq.seq_id)

    @torch.inference_mode()
    def run(self, out: GenSchedulerOutput) -> tuple[list[Sequence], SampledTokens | Verified
                                                    ] | None:
        """Run the step; returns the sequences that sampled and their new tokens (a
        ``Verified`` when decodes carried proposals: ``worker.generate.rejection``), or
        None when the forward ran out of device memory. The K/V it wrote then sit in slots
        not counted as computed, and are written again when the tokens are rescheduled.
        Out of memory while sampling is not caught: generators may have advanced."""
        rows, picked = self._rows(out)
        try:
            spec = prepare(self, out, rows, picked) if self.speculating else None
        except RuntimeError as exc:  # the draft's forwards ran out of memory
            if not is_out_of_memory(exc):
                raise
            return None
        lora = self._lora_batch(out, rows, picked, spec) if self.loras is not None else None
        # Steps with adapter rows run eager: the graphs hold no LoRA (docs/decisions.md).
        bucket = (self.graphs.bucket(out) if self.graphs is not None and lora is None
                  and spec is None else 0)
        meta = stage_step(self.host.numpy(), self.state, out.seqs, out.num_new_tokens, rows,
                          picked, pad_to=bucket, max_updates=self.max_updates,
                          sample_rows=None if spec is None else spec.sample_rows)
        sampling, own = self.state.sampling, rows[picked]
        if spec is None:
            masks = logits_process.start_masks(sampling, own, self.grammars)  # in the forward
        else:
            masks, own = spec.masks, np.repeat(own, spec.num_samples)
        try:
            if self.fault_hook is not None:
                self.fault_hook(out.num_tokens, len(out.seqs))
            if self.step_sender is not None:  # tensor parallel: the other ranks follow
                self.step_sender.send(meta, self.host, self.state.tables)
            dev = self._copy(meta.layout.words)
            apply_updates(self.table, dev, meta, self.state)
            if bucket:
                self.num_graph_steps += 1
                logits = self.graphs.run(bucket, meta)[: len(picked)]
            else:
                logits = self.forward(dev, meta, lora=lora)
            if self.draft is not None:  # its cache follows every token the target computes
                self.draft.forward_kv(self, dev, meta, all_rows=bool(bucket))
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            # Tensor parallel: the other ranks are inside this step's collectives; no
            # retry can meet them, so the step fails, and the engine, on every rank.
            if not is_out_of_memory(exc) or self.step_sender is not None:
                raise
            return None  # leaving the except block frees the traceback's tensors
        raw = None
        if logits_process.any_processed(sampling, own):  # grammars, penalties, bias, ...
            raw, logits = logits, logits.clone()
            if spec is None:
                lengths = np.fromiter((out.seqs[i].num_tokens for i in picked), np.int64,
                                      len(picked))
            else:
                lengths = spec.lengths
            logits_process.apply(logits, sampling, own, self.state.tokens, lengths, masks)
        if spec is not None:
            return [out.seqs[i] for i in picked], verify(
                self.sampler, logits, raw, sampling, rows[picked], spec.proposals,
                spec.draft_probs)
        sampled = self.sampler.sample_rows(logits, sampling, own, raw)
        return [out.seqs[i] for i in picked], sampled

    def forward(self, dev: torch.Tensor, meta: HostMeta, *, all_rows: bool = False,
                out: torch.Tensor | None = None, lora: LoRABatch | None = None) -> torch.Tensor:
        """The staged step through the model -> fp32 logits of its sampling rows (every
        row with ``all_rows``), into ``out`` when given (the graphs' static output);
        ``lora``: the step's adapter rows (None: base rows only)."""
        if lora is None:  # base rows only: no context to set (the default is none)
            return self.forward_model(self.base, self.head, self.cache, dev, meta, all_rows,
                                      out)
        with lora_context(lora):
            return self.forward_model(self.base, self.head, self.cache, dev, meta, all_rows,
                                      out)

    def forward_model(self, base, head, cache: KVCache, dev: torch.Tensor, meta: HostMeta,
                      all_rows: bool = False, out: torch.Tensor | None = None
                      ) -> torch.Tensor | None:
        """The staged step through ``base`` over ``cache`` (the target's, or a draft
        model's: ``worker.generate.draft``), then ``head`` (None: no logits)."""
        lay = meta.layout
        t, s, b = lay.t, lay.s, lay.b
        d32 = dev[lay.i32: lay.updates].view(torch.int32)
        table_rows = dev[3 * t + s: lay.i32]
        width = self.state.width if all_rows else meta.width  # graphs read any context
        paged = PagedMetadata(
            slot_mapping=dev[2 * t: 3 * t], cu_seqlens_q=d32[: b + 1],
            cu_seqlens_k=d32[b + 1: 2 * b + 2], seqlens_k=d32[2 * b + 2: 3 * b + 2],
            block_tables=self.table[:, :width].index_select(0, table_rows),
            max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=self.max_model_len if all_rows else int(meta.seqlens_k.max()),
            host_cu_seqlens_q=meta.cu_seqlens_q, host_seqlens_k=meta.seqlens_k,
            block_size=self.blocks.block_size)
        if self.backend == "gather":
            paged = dataclasses.replace(paged, context_slots=context_slots(
                paged.block_tables, paged.seqlens_k, paged.cu_seqlens_k,
                int(meta.seqlens_k.sum()), paged.block_size))
        with attention_context(PagedContext(cache, paged, self.backend)):
            hidden = base(input_ids=dev[:t].view(1, -1),
                          position_ids=dev[t: 2 * t].view(1, -1),
                          use_cache=False).last_hidden_state[0]
        if head is None:
            return None
        if not all_rows:
            hidden = hidden.index_select(0, dev[3 * t: 3 * t + s])
        return head(hidden, out)

    def _rows(self, out: GenSchedulerOutput) -> tuple[np.ndarray, list[int]]:
        """Each scheduled sequence's row (synced), and which sequences sample, in step
        order: every decode, and each chunk that reaches its sequence's end."""
        state, table = self.state, self.blocks.block_table
        seqs, n = out.seqs, len(out.seqs)
        rows = np.fromiter([state.sync(s, table(s.seq_id)) for s in seqs], np.int64, n)
        state.starts[rows] = np.fromiter([s.num_computed for s in seqs], np.int64, n)
        state.counts[rows] = out.num_new_tokens
        picked = list(range(out.num_decodes))
        for i in range(out.num_decodes, n):  # per prefill chunk
            seq = seqs[i]
            if seq.num_computed + out.num_new_tokens[i] == seq.num_tokens:
                picked.append(i)
        return rows, picked

    def _lora_batch(self, out: GenSchedulerOutput, rows: np.ndarray, picked: list[int],
                    spec=None) -> LoRABatch | None:
        """The step's adapter rows: of its tokens, and of its sampling rows (the head's;
        several per speculative decode)."""
        slots = self.state.lora_slots[rows]
        if not (slots >= 0).any():
            return None
        self.num_lora_steps += 1
        m, dev = self.loras, self.device.device
        tokens = LoRARows.of(np.repeat(slots, out.num_new_tokens), m.max_loras, dev, m.grouped)
        sampled = slots[picked] if spec is None else np.repeat(slots[picked], spec.num_samples)
        head = LoRARows.of(sampled, m.max_loras, dev, m.grouped)
        return LoRABatch(tokens, head)

    def _copy(self, words: int) -> torch.Tensor:
        if self.dev is not self.host:
            self.dev[:words].copy_(self.host[:words], non_blocking=True)
        return self.dev
