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

from worker.errors import (
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


@dataclass(eq=False)
class Request:
    """A validated sequence and its outcome. ``on_finish`` runs on the stepping thread."""

    token_ids: np.ndarray  # [num_tokens] int64
    task: Task
    pooling: Pooling | None = None  # EMBED only
    normalize: bool = False  # EMBED only: L2-normalize the pooled vector
    on_finish: Callable[[Request], None] | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    output: np.ndarray | None = None  # [hidden] (embed) or [num_tokens - 1] (score), float32
    error: BaseException | None = None
    cancelled: bool = False  # set by the caller; the scheduler drops it if not yet run
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def mode(self) -> OutputMode:
        return OutputMode.SCORE if self.task is Task.SCORE else _MODE_OF_POOLING[self.pooling]

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
    if n > limits.max_model_len:
        raise SequenceTooLongError(n, limits.max_model_len)
    aligned = -(-n // limits.align) * limits.align
    if aligned > limits.token_budget:
        raise SequenceOverBudgetError(n, aligned, limits.token_budget)
    bad = np.flatnonzero((token_ids < 0) | (token_ids >= limits.vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise TokenOutOfVocabError(int(token_ids[pos]), pos, limits.vocab_size)


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
        raise UnsupportedTaskError(f"task must be 'embed' or 'score', got {task!r}",
                                   value=task, setting="task") from None
