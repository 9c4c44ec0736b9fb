"""One request: a token sequence, what to compute on it, and where its result goes.

Request objects stay on the host side: the scheduler reads them to build a
``StepBatch`` of plain arrays, and only that reaches the model runner.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from worker.core.errors import (
    EmptySequenceError,
    InvalidRequestError,
    SequenceOverBudgetError,
    SequenceTooLongError,
    TokenOutOfVocabError,
    UnsupportedTaskError,
)


class Task(enum.StrEnum):
    EMBED = "embed"  # one pooled vector per sequence
    SCORE = "score"  # log-prob of every token after the first, given its prefix
    CLASSIFY = "classify"  # the classification head's logits (the model's own pooling)


class Pooling(enum.StrEnum):
    MEAN = "mean"
    LAST = "last"
    CLS = "cls"


class OutputMode(enum.IntEnum):
    """What the runner computes for one sequence; int8 codes in ``StepBatch.modes``."""

    SCORE = 0
    MEAN = 1
    LAST = 2
    CLS = 3
    CLASSIFY = 4


_MODE_OF_POOLING = {Pooling.MEAN: OutputMode.MEAN, Pooling.LAST: OutputMode.LAST,
                    Pooling.CLS: OutputMode.CLS}
_ids = itertools.count()


@dataclass(frozen=True)
class RequestLimits:
    """What every request is checked against before it is queued."""

    vocab_size: int  # rows of the input embedding
    max_model_len: int
    token_budget: int  # max_num_batched_tokens as configured (aligned tokens)
    align: int
    can_score: bool  # the model has an LM head
    can_classify: bool = False  # a *ForSequenceClassification checkpoint
    type_vocab_size: int = 0  # token types the model embeds (BERT: 2); 0 = none


@dataclass(eq=False)
class Request:
    """A validated sequence and its outcome. ``on_finish`` runs on the stepping thread."""

    token_ids: np.ndarray  # [num_tokens] int64
    task: Task
    pooling: Pooling | None = None  # EMBED only
    normalize: bool = False  # EMBED only: L2-normalize the pooled vector
    token_type_ids: np.ndarray | None = None  # [num_tokens] int64 (pairs); None = all 0
    on_finish: Callable[[Request], None] | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    output: np.ndarray | None = None  # float32: [hidden] (embed), [num_tokens - 1] (score),
    #   [num_labels] logits (classify)
    error: BaseException | None = None
    cancelled: bool = False  # set by the caller; the scheduler drops it if not yet run
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def mode(self) -> OutputMode:
        if self.task is Task.EMBED:
            return _MODE_OF_POOLING[self.pooling]
        return OutputMode.SCORE if self.task is Task.SCORE else OutputMode.CLASSIFY

    def finish(self, output: np.ndarray | None = None, error: BaseException | None = None):
        self.output, self.error, self.finished = output, error, True
        if self.on_finish is not None:
            self.on_finish(self)


def as_token_array(token_ids) -> np.ndarray:
    """Token ids as a contiguous int64 array; a typed error for anything else."""
    try:
        arr = np.ascontiguousarray(token_ids, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"token ids must be a flat list of integers ({exc})") from exc
    if arr.ndim != 1:
        raise InvalidRequestError(
            f"token ids must be one-dimensional, got shape {tuple(arr.shape)}", value=arr.shape
        )
    return arr


def validate(token_ids: np.ndarray, task: Task, limits: RequestLimits) -> None:
    """Raise the typed error for the first limit the sequence breaks."""
    n = int(token_ids.shape[0])
    if n == 0:
        raise EmptySequenceError()
    if task is Task.SCORE and not limits.can_score:
        raise UnsupportedTaskError(
            "score needs a model with a language-modeling head; this model is an encoder",
            value="score", setting="model",
        )
    if task is Task.CLASSIFY and not limits.can_classify:
        raise UnsupportedTaskError(
            "classify needs a sequence-classification checkpoint (an *ForSequenceClassification "
            "architecture); this model has no classification head",
            value="classify", setting="model",
        )
    if n > limits.max_model_len:
        raise SequenceTooLongError(n, limits.max_model_len)
    aligned = -(-n // limits.align) * limits.align
    if aligned > limits.token_budget:
        raise SequenceOverBudgetError(n, aligned, limits.token_budget)
    bad = np.flatnonzero((token_ids < 0) | (token_ids >= limits.vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise TokenOutOfVocabError(int(token_ids[pos]), pos, limits.vocab_size)


def check_type_count(token_type_ids, num_sequences: int) -> None:
    """One ``token_type_ids`` entry (or None) per sequence of a batch call."""
    if token_type_ids is not None and len(token_type_ids) != num_sequences:
        raise InvalidRequestError(
            f"token_type_ids has {len(token_type_ids)} entries for {num_sequences} sequences; "
            "send one per sequence (or None)", limit=num_sequences,
            value=len(token_type_ids), setting="token_type_ids")


def as_token_types(token_type_ids, num_tokens: int, limits: RequestLimits) -> np.ndarray | None:
    """A pair's token types (0 for the first text, 1 for the second, as the tokenizer
    made them) as int64, checked against the sequence and the model; None when absent
    or all zero (zero is what an absent one means)."""
    if token_type_ids is None:
        return None
    types = as_token_array(token_type_ids)
    if types.shape[0] != num_tokens:
        raise InvalidRequestError(
            f"token_type_ids has {types.shape[0]} entries for a sequence of {num_tokens} "
            "tokens; send one per token", limit=num_tokens, value=int(types.shape[0]),
            setting="token_type_ids")
    if not types.any():
        return None
    if limits.type_vocab_size < 2:
        raise UnsupportedTaskError(
            "token_type_ids: this model has no token-type embeddings (type_vocab_size="
            f"{limits.type_vocab_size}); send the pair as one sequence without them",
            value="token_type_ids", setting="token_type_ids")
    bad = np.flatnonzero((types < 0) | (types >= limits.type_vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise InvalidRequestError(
            f"token_type_ids: type {int(types[pos])} at position {pos} is outside [0, "
            f"{limits.type_vocab_size}) (the model's type_vocab_size)",
            limit=limits.type_vocab_size, value=int(types[pos]), setting="token_type_ids")
    return types


def parse_pooling(pooling: str | Pooling | None, default: Pooling) -> Pooling:
    if pooling is None:
        return default
    try:
        return Pooling(pooling)
    except ValueError:
        raise UnsupportedTaskError(
            f"pooling must be one of mean, last, cls or None (the model's default), "
            f"got {pooling!r}",
            value=pooling, setting="pooling",
        ) from None


def parse_task(task: str | Task) -> Task:
    try:
        return Task(task)
    except ValueError:
        raise UnsupportedTaskError(f"task must be 'embed', 'score' or 'classify', got {task!r}",
                                   value=task, setting="task") from None
