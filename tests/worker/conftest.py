"""Fixtures for the worker tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_engine():
    """``make_engine(path, **config) -> Engine``. On teardown every engine made is
    checked: no leaked or double-owned KV block, and none held once requests are done."""
    from worker import Engine, EngineConfig

    made = []

    def make(path, **config):
        engine = Engine(EngineConfig(model=str(path), **config))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        try:
            engine.check_kv_invariants()
            if engine._gen is not None and not engine._gen.has_work():
                stats = engine._gen.blocks.stats()
                assert stats.num_used_blocks == 0, f"KV blocks still held: {stats}"
        finally:
            engine.shutdown()
