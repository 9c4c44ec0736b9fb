"""The per-GPU packed engine (torch + transformers, never Ray): the front door.

    from worker import Engine, EngineConfig, SamplingParams

The configuration and the errors a caller catches import no torch; ``Engine``,
``SamplingParams`` and the generation output types load lazily on first use, so the
HTTP layer can validate configurations without the engine's dependencies. Where
everything else lives: ``docs/architecture.md``.
"""

from worker.core.config import ConfigError, EngineConfig
from worker.core.errors import (
    EmptySequenceError,
    EngineDeadError,
    InvalidRequestError,
    RequestOutOfMemoryError,
    SequenceOverBudgetError,
    SequenceTooLongError,
    TokenOutOfVocabError,
    UnsupportedTaskError,
    WorkerError,
)

__all__ = [
    "ConfigError",
    "EmptySequenceError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "FinishReason",
    "GenerationDelta",
    "GenerationOutput",
    "InvalidRequestError",
    "RequestOutOfMemoryError",
    "SamplingParams",
    "SequenceOverBudgetError",
    "SequenceTooLongError",
    "TokenLogprobs",
    "TokenOutOfVocabError",
    "UnsupportedTaskError",
    "WorkerError",
]


def __getattr__(name: str):  # the names that import torch, loaded on first use
    if name == "Engine":
        from worker.engine.engine import Engine

        return Engine
    if name == "SamplingParams":
        from worker.generate.sampling import SamplingParams

        return SamplingParams
    if name in ("GenerationOutput", "GenerationDelta"):
        from worker.generate import output

        return getattr(output, name)
    if name in ("FinishReason", "TokenLogprobs"):
        from worker.generate import sequence

        return getattr(sequence, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
