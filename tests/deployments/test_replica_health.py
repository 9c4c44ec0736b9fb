"""The replica's health check: healthy while its engine runs, failing once the engine is
dead (Serve then replaces the replica; the admission controller, no longer hearing from
it, reclaims its leases: see test_overload.py for the replacement under load)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.replica.deployment import EngineReplica


def test_health_check_fails_once_the_engine_is_dead(tiny_model):
    from worker import Engine, EngineConfig

    replica = EngineReplica.__new__(EngineReplica)  # the method alone, without Serve
    replica.args = type("Args", (), {"name": "tiny"})()
    replica.engine = Engine(EngineConfig(model=str(tiny_model("llama"))))

    async def check():
        replica._heartbeat = asyncio.get_running_loop().create_task(asyncio.sleep(60))
        replica.check_health()  # alive: no error
        replica.engine.shutdown()
        with pytest.raises(RuntimeError, match="engine of tiny is dead"):
            replica.check_health()
        replica._heartbeat.cancel()

    asyncio.run(check())
