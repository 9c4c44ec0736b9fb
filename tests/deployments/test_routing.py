"""Token-aware routing: the router ranks replicas by free token capacity, and with four
replicas on four (fake) GPUs the load spreads over all of them."""

from __future__ import annotations

import concurrent.futures as cf
import time
from types import SimpleNamespace

import httpx

from deployments.router import FreeBudgetRouter, free_tokens
from tests.deployments.conftest import admission, running_app

GEN = "packserve-smoke"


def replica(name: str, capacity: int, used: int):
    return SimpleNamespace(replica_id=name,
                           routing_stats={"capacity_tokens": capacity, "used_tokens": used})


async def _rank(router, replicas, tokens=10):
    pending = SimpleNamespace(args=[SimpleNamespace(num_tokens=tokens)],
                              metadata=SimpleNamespace(internal_request_id="x"))
    return [r[0].replica_id for r in await router.choose_replicas(replicas, pending)]


def test_router_prefers_the_most_free_tokens_and_counts_what_it_sent():
    import asyncio

    router = FreeBudgetRouter.__new__(FreeBudgetRouter)  # ranking only: no Serve wiring
    router.initialize_state()
    reps = [replica("a", 1000, 900), replica("b", 1000, 100), replica("c", 4000, 2000)]
    assert asyncio.run(_rank(router, reps)) == ["c", "b", "a"]
    pending = SimpleNamespace(args=[SimpleNamespace(num_tokens=1600)],
                              metadata=SimpleNamespace(internal_request_id="r1"))
    router.on_request_routed(pending, "c", None)  # c: max(2000 reported, 1600 sent) used
    assert asyncio.run(_rank(router, reps)) == ["c", "b", "a"]
    router.on_request_routed(SimpleNamespace(args=pending.args, metadata=SimpleNamespace(
        internal_request_id="r2")), "c", None)  # 3200 sent > 2000 reported: 800 free
    assert asyncio.run(_rank(router, reps)) == ["b", "c", "a"]
    router.on_request_completed("c", "r2")
    assert asyncio.run(_rank(router, reps)) == ["c", "b", "a"]
    assert free_tokens({}, 0) == 0


def test_four_replicas_on_four_gpus_share_the_load(serve_url):
    import ray

    args = {"models": [{"name": GEN, "model": "smoke:decoder", "num_replicas": 4,
                        "num_gpus": 1, "engine": {"device": "cpu", "num_kv_blocks": 64,
                                                  "max_num_batched_tokens": 512,
                                                  "max_model_len": 256}}],
            "router": {"stats_period_s": 0.2}}
    with running_app(args):
        assert ray.available_resources().get("GPU", 0) == 0  # each replica holds one GPU
        deadline = time.monotonic() + 60
        while admission(serve_url)[GEN]["num_replicas"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.5)

        def ask(i):
            body = {"model": GEN, "prompt": f"spread {i}", "max_tokens": 60, "temperature": 0,
                    "ignore_eos": True}
            return httpx.post(f"{serve_url}/v1/completions", json=body, timeout=180)

        with cf.ThreadPoolExecutor(32) as pool:
            statuses = [r.status_code for r in pool.map(ask, range(32))]
        assert statuses == [200] * 32
        time.sleep(1.5)  # one more report from every replica
        replicas = admission(serve_url)[GEN]["replicas"]
        served = sorted(r["num_served"] for r in replicas.values())
        assert len(served) == 4 and sum(served) == 32, replicas
        assert min(served) >= 4, served  # every replica got a fair share, none starved
