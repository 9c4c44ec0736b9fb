"""Errors a caller of the engine sees.

``InvalidRequestError`` and its subclasses are the caller's fault (the HTTP layer maps
them to 4xx); each carries the ``limit``, the ``value`` and the ``setting`` to change,
and says all three in its message. The others are the engine's state.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose.

    Picklable whatever the subclass's constructor takes (Ray sends a replica's errors to
    the ingress by pickling them): rebuilt from the message and the attributes.
    """

    def __reduce__(self):
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class InvalidRequestError(WorkerError, ValueError):
    """One request cannot be served as given; nothing else is affected."""

    def __init__(self, message: str, *, limit=None, value=None, setting: str | None = None):
        super().__init__(message)
        self.limit, self.value, self.setting = limit, value, setting


class EmptySequenceError(InvalidRequestError):
    """A sequence with no tokens."""

    def __init__(self):
        super().__init__(
            "the sequence is empty (0 tokens); at least 1 token is required",
            limit=1, value=0, setting=None,
        )


class SequenceTooLongError(InvalidRequestError):
    """Longer than the model accepts (``max_model_len``)."""

    def __init__(self, num_tokens: int, max_model_len: int):
        super().__init__(
            f"the sequence has {num_tokens} tokens, more than max_model_len={max_model_len}; "
            "shorten it or raise max_model_len (up to the model's max_position_embeddings)",
            limit=max_model_len, value=num_tokens, setting="max_model_len",
        )


class SequenceOverBudgetError(SequenceTooLongError):
    """Longer, once aligned, than one bin holds (``max_num_batched_tokens``)."""

    def __init__(self, num_tokens: int, aligned: int, budget: int):
        InvalidRequestError.__init__(
            self,
            f"the sequence has {num_tokens} tokens ({aligned} once aligned), more than the "
            f"token budget max_num_batched_tokens={budget}; shorten it or raise "
            "max_num_batched_tokens",
            limit=budget, value=num_tokens, setting="max_num_batched_tokens",
        )


class TokenOutOfVocabError(InvalidRequestError):
    """A token id outside ``[0, vocab_size)``."""

    def __init__(self, token_id: int, position: int, vocab_size: int):
        super().__init__(
            f"token id {token_id} at position {position} is outside the vocabulary "
            f"[0, {vocab_size}) (vocab_size={vocab_size}); tokenize with this model's tokenizer",
            limit=vocab_size, value=token_id, setting="vocab_size",
        )


class UnsupportedTaskError(InvalidRequestError):
    """A task or option the loaded model cannot do (e.g. score on an encoder)."""

    def __init__(self, message: str, *, value=None, setting: str | None = None):
        super().__init__(message, limit=None, value=value, setting=setting)


class RequestOutOfMemoryError(WorkerError):
    """One sequence alone ran the device out of memory (after splitting its bin)."""

    def __init__(self, num_tokens: int, budget: int):
        super().__init__(
            f"a sequence of {num_tokens} tokens ran out of device memory on its own "
            f"(token budget now max_num_batched_tokens={budget}); shorten it, or lower "
            "max_model_len so such sequences are rejected up front"
        )
        self.limit, self.value, self.setting = budget, num_tokens, "max_model_len"


class EngineDeadError(WorkerError):
    """The engine was shut down or its step loop died; ``__cause__`` says why."""
