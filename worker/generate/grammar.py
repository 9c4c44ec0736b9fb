"""Structured outputs: a grammar per request, a token mask per step (llguidance).

A request's ``SamplingParams.structured`` names a constraint (``Structured``: a JSON
schema, any JSON object, a regex, a choice of strings, or a Lark grammar). The engine
compiles it once per distinct constraint (cached), on a compile thread, within
``GrammarLimits`` (``worker.generate.grammar_compile``); a sequence whose constraint is
still compiling waits outside the scheduler, then gets its own matcher (a copy of the
compiled one). Each step, for the rows that have one:

1. before the forward, every constrained row's allowed tokens start being computed on a
   thread of their own (``fill_async``: one ``LLExecutor`` call for all rows, into a
   bitmask [rows, ceil(vocab / 32)] int32), so the host computes them while the CPU or
   the GPU runs the forward;
2. after the forward, the mask sets the disallowed logits to -inf (``apply_bitmask``:
   unpacked by numpy on CPU; on a GPU copied packed and unpacked there by a shift and an
   and per 32 tokens; no Python loop over rows);
3. once the token is sampled, the row's matcher consumes it (``advance``); a matcher
   that reaches the end of its grammar finishes the sequence with "stop"; one that
   refuses the token, errors or dead-ends finishes it with "error" (never "stop"),
   the refused token left out and llguidance's reason on the output's ``error``.

Rows without a constraint are untouched and cost nothing. A constraint over a limit, or
that does not compile, or whose language is empty from the start, is an
``InvalidRequestError`` naming the limit (or ``response_format``) and llguidance's
reason: raised when the request is submitted if already known, else its request fails
with it once the compile ends. Why llguidance over xgrammar and outlines-core:
docs/decisions.md ("Structured outputs use llguidance").

llguidance is imported on first use: an engine without it serves everything else, and a
constrained request then gets an error naming the missing package.
"""

from __future__ import annotations

import enum
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from worker.core.errors import InvalidRequestError
from worker.generate.grammar_compile import Compiled, GrammarCompiler, GrammarLimits, reason
from worker.params import KINDS, Structured, closed  # noqa: F401 - re-exported

_SETTING = "response_format"


class Grammars:
    """One engine's grammars: its tokenizer as llguidance sees it, the compile pool and
    cache (``worker.generate.grammar_compile``, bounded by ``limits``), and the parallel
    executor for masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int],
                 limits: GrammarLimits | None = None):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.limits = limits or GrammarLimits()
        self._lib = None
        self._lltok = None
        self._executor = None
        self._mask: torch.Tensor | None = None  # [rows, words] int32, host (pinned on CUDA)
        self._loading = threading.Lock()  # compile threads load it
        self._thread: ThreadPoolExecutor | None = None  # computes masks during forwards
        self.compiler = GrammarCompiler(self._load, self.limits)

    @property
    def words(self) -> int:
        return (self.vocab_size + 31) // 32

    def check(self, structured: Structured) -> None:
        """Raise ``InvalidRequestError`` if ``structured`` is over a limit or does not
        compile; blocks the calling thread (the edge calls it through
        ``asyncio.to_thread``) at most ``limits.grammar_compile_timeout_s`` once the compile
        started. Cached: the engine then finds it compiled."""
        self.compiler.start(structured).wait()

    def start(self, structured: Structured) -> Compiled:
        """The compile of ``structured``, queued (or cached); never blocks on it. Raises
        ``InvalidRequestError`` at once when its text is too large."""
        return self.compiler.start(structured)

    def matcher(self, structured: Structured):
        """A fresh matcher for one sequence, waiting for the compile (raises
        ``InvalidRequestError`` like ``check``)."""
        return self.compiler.start(structured).wait()

    def _load(self):
        """(llguidance, its tokenizer), loaded once, on a compile thread."""
        with self._loading:
            if self._lib is None:
                self._load_locked()
            return self._lib, self._lltok

    def _load_locked(self) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise InvalidRequestError(
                f"structured outputs need the llguidance package, which this engine cannot "
                f"import ({exc}); pip install llguidance", setting=_SETTING) from None
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            raise InvalidRequestError("structured outputs need the model's fast (Rust) "
                                      "tokenizer, and this model has none", setting=_SETTING)
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                   eos_token=eos)
        self._executor = llguidance.LLExecutor(num_threads=mask_threads())
        self._lib = llguidance

    def fill_async(self, matchers: list) -> Future:
        """``fill`` on the grammar thread (one: a step's masks are done before the next
        step's start, so they share one buffer)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="packserve-grammar")
        return self._thread.submit(self.fill, matchers)

    def fill(self, matchers: list) -> torch.Tensor:
        """The allowed-token bitmask of each matcher -> [len(matchers), words] int32 on
        the host, in one parallel call."""
        n = len(matchers)
        if self._mask is None or self._mask.shape[0] < n:
            self._mask = torch.empty((max(n, 8), self.words), dtype=torch.int32,
                                     pin_memory=torch.cuda.is_available())
        mask = self._mask[:n]
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                               mask.data_ptr(), self.words * 4, n)
        return mask


class CompileWaits:
    """Sequences whose constraint is still compiling (``Sequence.grammar``), by seq_id in
    arrival order. Read by the step loop's ``has_work`` from its own thread, changed
    under the step lock; ``wake`` is called when one of their compiles ends."""

    def __init__(self, wake=None):
        self._seqs: dict = {}
        self.wake = wake  # () -> None, or None

    def __len__(self) -> int:
        return len(self._seqs)

    def hold(self, seq) -> None:
        self._seqs[seq.seq_id] = seq
        seq.grammar.add_done_callback(self._ended)

    def drop(self, seq) -> None:
        self._seqs.pop(seq.seq_id, None)

    def any_done(self) -> bool:
        return any(s.grammar.done() for s in list(self._seqs.values()))

    def take_done(self) -> list:
        """[(seq, None)] with its matcher set, or [(seq, the compile's error)], for every
        sequence whose compile ended; they leave the wait."""
        out = []
        for seq in [s for s in self._seqs.values() if s.grammar.done()]:
            del self._seqs[seq.seq_id]
            try:
                seq.matcher, seq.grammar = seq.grammar.matcher(), None
            except InvalidRequestError as exc:
                out.append((seq, exc))
                continue
            out.append((seq, None))
        return out

    def _ended(self, _compiled) -> None:
        if self.wake is not None:
            self.wake()


def mask_threads() -> int:
    """Threads for the masks: half the cores, at most 16. Masks of a 64-row step take
    tens of microseconds each; more threads than that mostly add hand-offs, and the
    other half of the cores run torch (the forward on CPU, kernel launches on GPU)."""
    return max(1, min(16, (os.cpu_count() or 2) // 2))


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, at: torch.Tensor, mask: torch.Tensor) -> None:
    """Set, in place, ``logits[at[i], t] = -inf`` for every token t whose bit is 0 in
    ``mask[i]`` ([len(at), words] int32 on the host). On CPU numpy unpacks the bits; on
    a GPU the packed mask is copied (1/32 of the logits' size) and unpacked there."""
    device, vocab, n = logits.device, logits.shape[1], at.shape[0]
    if device.type == "cpu":
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")
        banned = torch.from_numpy(bits[:, :vocab]) == 0
    else:
        shifts = _SHIFTS.get(device)
        if shifts is None:
            shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
        packed = mask.to(device, non_blocking=True)
        banned = ((packed[:, :, None] >> shifts) & 1).reshape(n, -1)[:, :vocab] == 0
    if n == logits.shape[0]:  # every row constrained (at is 0..n-1, in order)
        logits.masked_fill_(banned, float("-inf"))
    else:
        logits.index_copy_(0, at, logits.index_select(0, at).masked_fill_(banned,
                                                                          float("-inf")))


class GrammarState(enum.Enum):
    """Where a matcher stands after a sampled token (``advance``)."""

    RUNNING = "running"  # the token was allowed and more may follow
    COMPLETE = "complete"  # the grammar reached its end: the sequence finishes "stop"
    FAILED = "failed"  # refused, errored or dead-ended: the sequence finishes "error"


def advance(matcher, token: int) -> GrammarState:
    """The matcher consumes ``token``. FAILED when it was already in error (a mask
    that hit a llguidance limit, or found no way on: its mask then allows only EOS),
    refused the token, or errored consuming it (``failure`` says why); a stopped
    matcher in error is FAILED, never COMPLETE."""
    if matcher.is_error() or not matcher.consume_token(token) or matcher.is_error():
        return GrammarState.FAILED
    return GrammarState.COMPLETE if matcher.is_stopped() else GrammarState.RUNNING


def failure(matcher) -> str:
    """Why a FAILED matcher cannot go on, on one line (llguidance's reason)."""
    return reason(matcher) or f"the matcher stopped ({matcher.stop_reason()})"


def allowed_tokens(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    """The token ids a bitmask row allows (tests and debugging)."""
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)
