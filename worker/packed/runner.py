"""Run packed bins through the model: stage, forward, then pool, classify or score.

Keep this file minimal: it turns a ``StepBatch`` into outputs and nothing else. Every
bin of a step is launched before any result is read back, so on CUDA the host fills
bin k+1 while the device runs bin k; results come back in ``_gather``.

Out of memory while running a bin: free the cache, split the bin in two by sequences
and run the halves; a single sequence that still does not fit is reported in
``StepResult.oom_failed``. Every bin that failed is listed in ``oom_num_tokens`` so
the engine shrinks the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from worker.attention.context import PackedSegments, attention_context
from worker.attention.cpu import SegmentGroups
from worker.core.memory import is_out_of_memory
from worker.core.request import OutputMode
from worker.core.timing import StepTimer
from worker.models.heads import ClassificationHead, classification_head
from worker.models.lm_head import lm_head
from worker.models.loader import ModelSpec
from worker.packed.scheduler import StepBatch
from worker.packed.staging import StagedBin, Staging

logger = logging.getLogger(__name__)

POOL_CHUNK_TOKENS = 16384  # mean pooling upcasts hidden states to fp32 this many rows at a time


@dataclass
class StepResult:
    """Outputs of one step, keyed by sequence index in the ``StepBatch``."""

    outputs: dict[int, np.ndarray] = field(default_factory=dict)  # fp32: [hidden], [len - 1]
    #   or [num_labels]
    oom_failed: list[int] = field(default_factory=list)  # sequences that alone ran out of memory
    oom_num_tokens: list[int] = field(default_factory=list)  # size of every bin that ran out
    num_bins: int = 0  # bins that ran (after splits)


@dataclass
class _BinOutput:
    seqs: np.ndarray  # [B] int64 sequence indices
    modes: np.ndarray  # [B] int8
    pooled: dict[int, torch.Tensor]  # OutputMode -> [B, hidden] (CLASSIFY: [B, num_labels])
    #   fp32, device
    logprobs: torch.Tensor | None  # [score_cu[-1] - 1] fp32, device (see _score)
    score_cu: np.ndarray  # [num SCORE seqs + 1] int64: their bounds (they come first)


class ModelRunner:
    """Owns the model and the staging buffers; runs whole steps."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, staging: Staging, device,
                 *, logits_chunk_bytes: int = 256 << 20):
        self.model, self.spec, self.staging, self.device = model, spec, staging, device
        self.base = model.base_model
        self.head = lm_head(model) if spec.is_decoder else None
        self.classifier: ClassificationHead | None = (
            classification_head(model, spec.model_type, spec.is_decoder)
            if spec.is_classifier else None)
        self.logits_chunk_rows = max(1, logits_chunk_bytes // (4 * spec.vocab_size))
        # The reference backend's grouped mode (worker/attention/cpu.py); off: one SDPA
        # call per sequence, the definition it is tested against.
        self.group_attention = spec.attention_backend == "reference"
        # Test-only fault injection: called as fault_hook(num_tokens, num_seqs) before
        # every forward; raise torch.OutOfMemoryError from it to exercise the split path.
        self.fault_hook: Callable[[int, int], None] | None = None
        self.timer: StepTimer | None = None  # set only while the engine is observed
        # Tensor parallel rank 0: a worker.parallel.steps.StepSender that sends every bin
        # to the other ranks before its forward (they run it with ``follow_bin``).
        self.step_sender = None

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> StepResult:
        result, pending = StepResult(), []
        for bin in batch.bins:
            self._run_resilient(batch, bin, pending, result)
        self._gather(pending, result)
        return result

    @torch.inference_mode()
    def run_synthetic(self, num_tokens: int, seq_len: int) -> None:
        """One packed forward of ``num_tokens`` tokens in sequences of ``seq_len`` (the
        heaviest output path: scoring for decoders), waited for. For the budget probe;
        out-of-memory errors propagate."""
        n = -(-num_tokens // seq_len)
        offsets = np.minimum(np.arange(n + 1, dtype=np.int64) * seq_len, num_tokens)
        token_ids = np.arange(num_tokens, dtype=np.int64) % self.spec.vocab_size
        mode = OutputMode.SCORE if self.head is not None else OutputMode.MEAN
        batch = StepBatch(token_ids, offsets, np.full(n, mode, np.int8), [np.arange(n)])
        out = self._run_bin(batch, batch.bins[0])
        del out
        self.device.synchronize()

    def _run_resilient(self, batch: StepBatch, bin: np.ndarray, pending: list,
                       result: StepResult) -> None:
        try:
            pending.append(self._run_bin(batch, bin))
            result.num_bins += 1
            return
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            # Tensor parallel: the other ranks ran this bin's collectives, not the halves';
            # an out-of-memory bin fails the step, and the engine, on every rank.
            if not is_out_of_memory(exc) or self.step_sender is not None:
                raise
        # Recover outside the except block: its traceback pins the failed bin's tensors.
        lengths = batch.lengths[bin]
        result.oom_num_tokens.append(int(lengths.sum()))
        self.device.empty_cache()
        logger.warning("out of memory on a bin of %d sequences / %d tokens; splitting it",
                       len(bin), int(lengths.sum()))
        if len(bin) == 1:
            result.oom_failed.append(int(bin[0]))
            return
        cut = int(np.searchsorted(np.cumsum(lengths), lengths.sum() / 2))
        cut = min(max(cut, 1), len(bin) - 1)
        for half in (bin[:cut], bin[cut:]):
            self._run_resilient(batch, half, pending, result)

    def _run_bin(self, batch: StepBatch, bin: np.ndarray) -> _BinOutput:
        # SCORE sequences first: their rows are then one slice [0, end) of the bin.
        bin = bin[np.argsort(batch.modes[bin] != OutputMode.SCORE, kind="stable")]
        modes = batch.modes[bin]
        num_score = int(np.count_nonzero(modes == OutputMode.SCORE))
        staged = self.staging.stage(batch.token_ids, batch.offsets, bin, batch.token_type_ids)
        cu = staged.host_cu_seqlens.astype(np.int64)  # copy now: the slot is reused later
        timer = self.timer
        try:
            if self.fault_hook is not None:
                self.fault_hook(staged.num_tokens, staged.num_seqs)
            if self.step_sender is not None:
                self.step_sender.send_bin(self.staging.host_words(staged), staged,
                                          int(cu[num_score]) if num_score else 0)
            if timer is not None:
                timer.forward.begin(self.device.compute_stream())
            hidden = self.forward(staged)
            pooled = {int(m): self._pool(OutputMode(int(m)), hidden, staged)
                      for m in np.unique(modes) if m != OutputMode.SCORE}
            logprobs = self._score(hidden, staged, int(cu[num_score])) if num_score else None
            if timer is not None:
                timer.end_bin(staged.num_tokens, self.device.compute_stream())
        finally:
            self.staging.release(staged)
        return _BinOutput(bin, modes, pooled, logprobs, cu[: num_score + 1])

    @torch.inference_mode()
    def follow_bin(self, staged: StagedBin, score_end: int) -> None:
        """A tensor-parallel follower's part of rank 0's bin: the forward and the scoring
        rows' LM head, whose collectives meet rank 0's (pooling has none: rank 0 alone
        pools and returns)."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(staged.num_tokens, staged.num_seqs)
            hidden = self.forward(staged)
            if score_end:
                self._score(hidden, staged, score_end)
        finally:
            self.staging.release(staged)

    def forward(self, staged: StagedBin) -> torch.Tensor:
        """The base model over the packed bin -> last hidden states [T, hidden]."""
        positions = staged.position_ids
        if self.spec.position_offset:  # RoBERTa numbers positions from padding_idx + 1
            positions = positions + self.spec.position_offset
        kwargs = dict(input_ids=staged.input_ids, position_ids=positions,
                      use_cache=False)  # a cache makes a packed forward silently wrong
        if staged.token_type_ids is not None:
            kwargs["token_type_ids"] = staged.token_type_ids
        groups = None
        if self.group_attention:  # CPU: similar-length sequences share SDPA calls
            groups = SegmentGroups(staged.host_cu_seqlens, staged.input_ids.device,
                                   self.spec.dtype, causal=self.spec.is_decoder)
        segments = PackedSegments(staged.cu_seqlens, staged.max_seqlen, groups)
        with attention_context(segments):
            return self.base(**kwargs).last_hidden_state[0]

    def _pool(self, mode: OutputMode, hidden: torch.Tensor, staged: StagedBin) -> torch.Tensor:
        if mode is OutputMode.CLASSIFY:
            return self.classifier(hidden, staged.cu_seqlens)
        return _POOLERS[mode](hidden, staged)

    def _score(self, hidden: torch.Tensor, staged: StagedBin, end: int) -> torch.Tensor:
        """Log-prob of token t+1 at every row t < end - 1 -> [end - 1] fp32, device.

        Rows [0, end) hold the SCORE sequences. The row at each sequence's last token
        predicts the next sequence's first token: computed (no index tensor, no sync)
        and dropped in ``_gather``.
        """
        targets = staged.input_ids[0, 1:end]
        out = torch.empty(end - 1, dtype=torch.float32, device=hidden.device)
        step = self.logits_chunk_rows
        for start in range(0, end - 1, step):  # bounded [chunk, vocab] logits
            stop = min(start + step, end - 1)
            logits = self.head(hidden[start:stop])
            picked = logits.gather(1, targets[start:stop, None])[:, 0]
            out[start:stop] = picked - torch.logsumexp(logits, dim=-1)
        return out

    def _gather(self, pending: list[_BinOutput], result: StepResult) -> None:
        """Read every bin's outputs back to the host (the step's only sync point)."""
        for out in pending:
            for mode, pooled in out.pooled.items():
                rows = pooled.cpu().numpy()
                for j in np.flatnonzero(out.modes == mode):  # per sequence in the bin
                    result.outputs[int(out.seqs[j])] = rows[j]
            if out.logprobs is not None:
                logprobs, cu = out.logprobs.cpu().numpy(), out.score_cu
                for j in range(cu.shape[0] - 1):  # per SCORE sequence in the bin
                    result.outputs[int(out.seqs[j])] = logprobs[cu[j]: cu[j + 1] - 1]


def _segment_lengths(staged: StagedBin) -> torch.Tensor:
    cu = staged.cu_seqlens.long()
    return cu[1:] - cu[:-1]


def _pool_mean(hidden: torch.Tensor, staged: StagedBin) -> torch.Tensor:
    lengths = _segment_lengths(staged)
    seg = torch.repeat_interleave(
        torch.arange(staged.num_seqs, device=hidden.device), lengths,
        output_size=staged.num_tokens,
    )
    sums = torch.zeros(staged.num_seqs, hidden.shape[1], dtype=torch.float32,
                       device=hidden.device)
    for start in range(0, staged.num_tokens, POOL_CHUNK_TOKENS):
        end = start + POOL_CHUNK_TOKENS
        sums.index_add_(0, seg[start:end], hidden[start:end].float())
    return sums / lengths[:, None].float()


def _pool_last(hidden: torch.Tensor, staged: StagedBin) -> torch.Tensor:
    return hidden[staged.cu_seqlens[1:].long() - 1].float()


def _pool_cls(hidden: torch.Tensor, staged: StagedBin) -> torch.Tensor:
    return hidden[staged.cu_seqlens[:-1].long()].float()


_POOLERS = {OutputMode.MEAN: _pool_mean, OutputMode.LAST: _pool_last, OutputMode.CLS: _pool_cls}
