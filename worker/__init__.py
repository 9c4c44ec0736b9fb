"""The per-GPU packed forward engine (torch + transformers, never Ray).

``from worker import EngineConfig`` imports no torch; ``Engine`` loads lazily, so the
HTTP layer can validate configurations without the engine's dependencies.
"""

from worker.config import EngineConfig

__all__ = ["Engine", "EngineConfig"]


def __getattr__(name: str):
    if name == "Engine":
        from worker.engine import Engine

        return Engine
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
