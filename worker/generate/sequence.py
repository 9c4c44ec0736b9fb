"""One generation request while it runs: its tokens, how far its KV is computed, its fate.

Token accounting, the one table to keep in mind::

    token_ids        prompt + generated tokens so far       len = num_tokens
    num_computed     tokens whose K/V are in the paged cache (0 again after preemption)
    uncomputed       num_tokens - num_computed
                     1   -> a decode: the last sampled token goes in, the next comes out
                     > 1 -> a prefill (first time, or recompute after preemption); the
                            chunk that reaches num_tokens samples the next token

Sequences stay on the host: the scheduler reads them, the runner gets plain arrays.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.generate.sampling import SamplingParams
from worker.params import TokenLogprobs

_ids = itertools.count()


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or max_model_len reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # its output constraint could not be followed (the output's ``error``)


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (its KV was freed; it recomputes)
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A generation request. Callbacks run on the stepping thread: ``on_update`` after
    every step that changed it (streaming), ``on_finish`` once when it finishes."""

    token_ids: list[int]  # prompt + generated
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None = None  # None for greedy requests
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: int = field(default_factory=lambda: next(_ids))  # FCFS order
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per generated token
    text: str = ""  # detokenized output so far ("" without a tokenizer)
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained, of full blocks so far
    num_registered: int = 0  # leading blocks known to the prefix cache (taken or registered)
    num_cached_tokens: int | None = None  # prompt tokens found cached at first admission
    error: BaseException | None = None  # raised to the caller: the engine died under the
    #   request, or its constraint failed to compile
    error_message: str | None = None  # why it finished with FinishReason.ERROR
    grammar: object | None = None  # its constraint's compile (grammar_compile.Compiled)
    #   while in flight; the sequence waits outside the scheduler until it is done
    matcher: object | None = None  # its grammar's state (an llguidance LLMatcher) when
    #   params.structured is set; it consumes each sampled token
    stops: object | None = None  # its stop strings' matcher (worker.generate.stops), made
    #   on first use
    lora: str | None = None  # the LoRA adapter it runs with (None: the base model)
    lora_slot: int = -1  # its adapter's slot while it runs (pinned; worker.lora.manager)
    spec_want: int = 0  # proposals it makes next step (set by the proposer, taken by the
    #   scheduler); 0: a plain decode (worker.generate.speculative)
    spec_tokens: object | None = None  # n-gram: the proposed tokens (int64 array)
    spec_acceptance: object | None = None  # its acceptance record (speculative.Acceptance)
    on_update: Callable[[Sequence], None] | None = None
    on_finish: Callable[[Sequence], None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) - self.num_computed == 1

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
