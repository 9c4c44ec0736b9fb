"""After a step: append sampled tokens, detokenize, decide who stops, build outputs.

Stop rules, checked after every generated token in this order:

1. a token in ``stop_token_ids``, or one of the model's EOS tokens (from its generation
   config, as HF ``generate`` stops) unless ``ignore_eos``: finish "stop"; the token is
   kept in ``token_ids`` (as HF keeps EOS) and is not part of ``text`` when special;
2. a stop string appears in the text: finish "stop"; ``text`` is cut before it;
3. ``max_tokens`` generated: finish "length".

Before all three, a structured request's matcher consumes the token: the grammar's end
finishes "stop" (the token kept); a refused token, a matcher error or a dead end finishes
"error" (the token left out, llguidance's reason in ``error``, one WARNING logged).

Text is decoded from all output tokens (O(output) per token, a per-request loop that
runs every step) only while a request has stop strings or is streamed; otherwise once,
at the end. Stop strings are matched only where the text grew (``worker.generate.stops``),
so their number does not slow the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from worker.generate import grammar
from worker.generate.grammar import GrammarState
from worker.generate.sampling import SampledTokens
from worker.generate.sequence import FinishReason, Sequence, TokenLogprobs
from worker.generate.stops import StopStrings

logger = logging.getLogger(__name__)
_FAILED, _COMPLETE = GrammarState.FAILED, GrammarState.COMPLETE  # module globals: this
#   runs per row per step, and an enum member read through its class costs more


@dataclass(frozen=True)
class GenerationOutput:
    """A finished request."""

    request_id: int
    prompt_token_ids: list[int]  # [prompt_len]
    token_ids: list[int]  # [num generated], a final EOS / stop token included
    text: str | None  # None without a tokenizer
    logprobs: list[TokenLogprobs] | None  # [num generated]; None unless asked for
    finish_reason: FinishReason
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str | None = None  # why, when finish_reason is ERROR (the output is cut there)


@dataclass(frozen=True)
class GenerationDelta:
    """What one step added to a streamed request."""

    request_id: int
    token_ids: list[int]  # new tokens since the previous delta
    text: str  # new text ("" without a tokenizer)
    logprobs: list[TokenLogprobs] | None  # [len(token_ids)]; None unless asked for
    finish_reason: FinishReason | None  # set on the last delta only
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (once admitted)
    error: str | None = None  # on the last delta, when finish_reason is ERROR: why


class OutputProcessor:
    """Applies sampled tokens to sequences; knows the EOS ids and the tokenizer."""

    def __init__(self, eos_token_ids: frozenset[int], tokenizer=None):
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer

    def append(self, seq: Sequence, sampled: SampledTokens, i: int) -> FinishReason | None:
        """Add row ``i`` of ``sampled`` to ``seq``; the reason it must finish, if any."""
        token = sampled.token_ids[i]
        state = None if seq.matcher is None else grammar.advance(seq.matcher, token)
        if state is _FAILED:
            return self._grammar_failed(seq)
        seq.token_ids.append(token)
        if seq.params.logprobs is not None:
            k = seq.params.logprobs
            top = tuple(zip(sampled.top_ids[i][:k], sampled.top_logprobs[i][:k])) if k else ()
            seq.logprobs.append(TokenLogprobs(sampled.logprobs[i], top))
        if state is _COMPLETE or token in seq.params.stop_token_ids or (
                not seq.params.ignore_eos and token in self.eos_token_ids):
            self.update_text(seq)
            return FinishReason.STOP
        decode = seq.params.stop or seq.on_update is not None
        if decode and self.update_text(seq) and seq.params.stop and self._cut_at_stop(seq):
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _grammar_failed(self, seq: Sequence) -> FinishReason:
        seq.error_message = (f"the output could not follow its {seq.params.structured.kind} "
                             f"constraint: {grammar.failure(seq.matcher)}")
        logger.warning("request %d finished with error: %s", seq.seq_id, seq.error_message)
        self.update_text(seq)
        return FinishReason.ERROR

    def update_text(self, seq: Sequence) -> bool:
        """Decode ``seq``'s output into ``seq.text``; False without a tokenizer."""
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(seq.output_ids,
                                     skip_special_tokens=seq.params.skip_special_tokens)
        seq.text = text
        return True

    def _cut_at_stop(self, seq: Sequence) -> bool:
        hit = stop_strings(seq).find(seq.text)
        if hit is None:
            return False
        seq.text = seq.text[:hit]
        return True

    def output(self, seq: Sequence) -> GenerationOutput:
        if not seq.params.stop:  # with stop strings the text is current (and maybe cut)
            self.update_text(seq)
        return GenerationOutput(
            seq.seq_id, seq.token_ids[: seq.prompt_len], seq.output_ids,
            seq.text if self.tokenizer is not None else None,
            list(seq.logprobs) if seq.params.logprobs is not None else None,
            seq.finish_reason, seq.num_preemptions, seq.num_cached_tokens or 0,
            seq.error_message)


class DeltaTracker:
    """Turns a streamed sequence's growth into deltas (one per step that changed it)."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.num_sent_tokens = 0
        self.sent_text = ""

    def delta(self) -> GenerationDelta:
        seq = self.seq
        new_ids = seq.output_ids[self.num_sent_tokens:]
        text = seq.text if seq.finished else stop_strings(seq).settled(seq.text)
        new_text = text.removeprefix(self.sent_text)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.logprobs[self.num_sent_tokens:]
        self.num_sent_tokens += len(new_ids)
        self.sent_text = text
        return GenerationDelta(seq.seq_id, new_ids, new_text, logprobs,
                               seq.finish_reason if seq.finished else None,
                               seq.num_cached_tokens or 0,
                               seq.error_message if seq.finished else None)


def stop_strings(seq: Sequence) -> StopStrings:
    """``seq``'s stop-string matcher, made on first use."""
    if seq.stops is None:
        seq.stops = StopStrings(seq.params.stop)
    return seq.stops
