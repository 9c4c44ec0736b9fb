"""Token-aware routing: the free-budget router ranks replicas by free token capacity; the
prefix-aware router (the default) keeps a prompt prefix on the replica that last served
it while that replica's free budget allows. With four replicas on four (fake) GPUs:
distinct prompts spread over all of them, a conversation's turns stay on one and hit its
prefix cache, a flood of one prefix spreads once its replica fills up."""

from __future__ import annotations

import concurrent.futures as cf
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from deployments.admission.router import (
    FreeBudgetRouter,
    PrefixAwareRouter,
    PrefixIndex,
    free_tokens,
    prefix_chunks,
)
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


ARGS4 = {"models": [{"name": GEN, "model": "smoke:decoder", "num_replicas": 4, "num_gpus": 1,
                     "engine": {"device": "cpu", "num_kv_blocks": 64,
                                "max_num_batched_tokens": 512, "max_model_len": 256,
                                "max_loras": 2}}],
         "router": {"stats_period_s": 0.2}}  # prefix_aware, the default
ADAPTERS = [f"lora-{i}" for i in range(8)]  # 8 adapters, 2 slots per replica


@pytest.fixture(scope="module")
def four(serve_url, tmp_path_factory):
    """Four replicas of the smoke decoder on four (fake) GPUs, 1,024 KV tokens each,
    serving eight LoRA adapters (two slots each)."""
    import ray

    from benchmarks.adapters import write_adapter
    from worker.models.sources import resolve_model

    d, base = tmp_path_factory.mktemp("routing-loras"), resolve_model("smoke:decoder")
    loras = [{"name": n, "path": str(write_adapter(base, d / n, r=4, seed=i))}
             for i, n in enumerate(ADAPTERS)]
    args = {**ARGS4, "models": [dict(ARGS4["models"][0], loras=loras)]}
    with running_app(args):
        assert ray.available_resources().get("GPU", 0) == 0  # each replica holds one GPU
        deadline = time.monotonic() + 60
        while admission(serve_url)[GEN]["num_replicas"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        yield serve_url


def _served(url) -> dict[str, int]:
    time.sleep(1.0)  # one more report from every replica (stats_period 0.2 s, heartbeat 1 s)
    return {r: s["num_served"] for r, s in admission(url)[GEN]["replicas"].items()}


def _lora_loads(url) -> dict[str, int]:
    time.sleep(1.0)  # one more report from every replica
    return {r: s["num_lora_loads"] for r, s in admission(url)[GEN]["replicas"].items()}


def _complete(url, prompt, max_tokens=4, model=GEN, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=180)


def _pending(request_id, prompt=None, tokens=10):
    work = SimpleNamespace(num_tokens=tokens, prompt_token_ids=prompt)
    return SimpleNamespace(args=[work], metadata=SimpleNamespace(internal_request_id=request_id))


def test_prefix_aware_router_prefers_the_prefix_within_the_free_bound():
    import asyncio

    router = PrefixAwareRouter.__new__(PrefixAwareRouter)
    router.initialize_state(min_free_fraction=0.5, ttl_s=60.0, max_entries=1000)
    reps = [replica("a", 1000, 0), replica("b", 1000, 300), replica("c", 1000, 600)]
    prompt = list(range(100))  # 6 chunks of 16
    rank = lambda rid, p=prompt: [r[0].replica_id for r in asyncio.run(  # noqa: E731
        router.choose_replicas(reps, _pending(rid, p)))]
    assert rank("r1")[0] == "a"  # no match anywhere: most free
    router.on_request_completed("a", "r1")
    router._indexes.clear()
    router._indexes["c"].add(prefix_chunks(prompt), time.monotonic())
    assert rank("r3")[0] == "a"  # c holds the prefix, but 400 free < 0.5 x 1000
    router._tentative.clear()
    router._indexes.clear()
    router._indexes["b"].add(prefix_chunks(prompt[:40]), time.monotonic())  # 2 chunks
    assert rank("r4")[0] == "b"  # 700 free >= 500: the prefix wins
    router._tentative.clear()
    assert rank("r5", list(range(500, 600)))[0] == "a"  # another prefix: most free
    router._tentative.clear()
    assert rank("r6", None)[0] == "a"  # no prompt (embeddings): most free


def _lora_pending(request_id, lora, prompt=None, tokens=10):
    work = SimpleNamespace(num_tokens=tokens, prompt_token_ids=prompt, lora=lora)
    return SimpleNamespace(args=[work], metadata=SimpleNamespace(internal_request_id=request_id))


def test_prefix_aware_router_keeps_an_adapter_on_its_replicas_within_the_free_bound():
    """Four replicas, eight adapters: a request goes to a replica holding its adapter
    (reported resident, or routed it lately) while that replica's free tokens are at
    least half the most free one's; the base model's prefix elsewhere does not draw it
    (prefix hashes are salted by adapter); past the bound, or with no holder, the most
    free replica takes it and learns it."""
    import asyncio

    router = PrefixAwareRouter.__new__(PrefixAwareRouter)
    router.initialize_state(min_free_fraction=0.5, ttl_s=60.0, max_entries=1000,
                            lora_min_free_fraction=0.5)
    reps = [replica(n, 1000, 0) for n in "abcd"]
    resident = {"a": ["l0", "l1"], "b": ["l2", "l3"], "c": ["l4", "l5"], "d": ["l6", "l7"]}
    for r in reps:
        r.routing_stats["loras"] = resident[r.replica_id]
    reps[0].routing_stats["used_tokens"] = 0
    reps[2].routing_stats["used_tokens"] = 450  # c: 550 free, >= 0.5 x 1000

    def rank(request_id, lora, prompt=None):
        router._tentative.clear()
        return [r[0].replica_id for r in asyncio.run(router.choose_replicas(
            reps, _lora_pending(request_id, lora, prompt)))]

    for i in range(8):  # each adapter to the replica that holds it
        assert rank(f"r{i}", f"l{i}")[0] == "abcd"[i // 2]
    prompt = list(range(64))
    router._indexes["a"].add(prefix_chunks(prompt), time.monotonic())  # the base's prefix
    assert rank("p1", "l4", prompt)[0] == "c"  # the adapter's KV is not the base model's
    assert rank("p2", None, prompt)[0] == "a"  # the base model's request: its prefix
    reps[2].routing_stats["used_tokens"] = 600  # c: 400 free < 500: spread by free tokens
    assert rank("p3", "l5")[0] in "abd"
    reps[2].routing_stats["used_tokens"] = 0
    spilled = rank("p4", "new")[0]  # no holder: most free; the router learns it
    reps[0].routing_stats["used_tokens"] = 100
    reps[1].routing_stats["used_tokens"] = 100
    reps[3].routing_stats["used_tokens"] = 100
    reps[2].routing_stats["used_tokens"] = 100
    next(r for r in reps if r.replica_id == spilled).routing_stats["used_tokens"] = 300
    assert rank("p5", "new")[0] == spilled  # 700 free >= 0.5 x 900: still there
    assert rank("p6", None)[0] != spilled  # the base model: most free


def test_prefix_index_is_bounded_and_ages_out():
    index = PrefixIndex(max_entries=4, ttl_s=10.0)
    chunks = prefix_chunks(list(range(16 * 6)))
    assert len(chunks) == 6 and prefix_chunks(list(range(15))) == []
    index.add(chunks[:3], now=0.0)
    assert index.match(chunks, now=1.0) == 3
    assert index.match(chunks, now=11.0) == 0  # older than the TTL
    index.add(chunks, now=2.0)  # 6 entries > 4: the oldest (first) chunks go
    assert len(index) == 4 and index.match(chunks, now=3.0) == 0
    assert index.match(chunks[2:], now=3.0) == 4
    index.add(chunks[:1], now=20.0)  # expired entries are dropped on the next add
    assert len(index) == 1


def test_four_replicas_on_four_gpus_share_the_load(four):
    """Short distinct prompts (no full 16-token chunk in common): spread by free tokens."""
    before = _served(four)
    with cf.ThreadPoolExecutor(32) as pool:
        statuses = [r.status_code for r in pool.map(
            lambda i: _complete(four, f"spread {i}", max_tokens=60), range(32))]
    assert statuses == [200] * 32
    served = {r: n - before.get(r, 0) for r, n in _served(four).items()}
    assert len(served) == 4 and sum(served.values()) == 32, served
    assert min(served.values()) >= 4, served  # every replica got a fair share, none starved


def test_turns_of_a_conversation_stay_on_one_replica(four):
    """Each turn resends the conversation so far: every turn after the first goes to the
    replica that served the first, and finds its prefix in that engine's cache."""
    rng = np.random.default_rng(5)
    conversation = rng.integers(10, 4000, size=40).tolist()
    before = _served(four)
    cached = []
    for turn in range(5):
        conversation += rng.integers(10, 4000, size=20).tolist()
        r = _complete(four, conversation, max_tokens=4)
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        conversation += [int(t) for t in rng.integers(10, 4000, size=4)]  # the "answer"
    served = {r: n - before.get(r, 0) for r, n in _served(four).items()}
    assert sorted(served.values()) == [0, 0, 0, 5], served
    assert cached[0] == 0 and all(c >= 48 for c in cached[1:]), cached


def test_a_flood_of_one_prefix_spreads_when_its_replica_fills(four):
    """32 concurrent requests sharing a 96-token prefix, each holding 96 + 160 tokens of
    a replica's 1,024: the first replica takes them until its free tokens fall below
    half of the most free replica's, then the others do."""
    prefix = np.random.default_rng(6).integers(10, 4000, size=96).tolist()
    before = _served(four)
    with cf.ThreadPoolExecutor(32) as pool:
        statuses = [r.status_code for r in pool.map(
            lambda i: _complete(four, prefix + [i + 10], max_tokens=150), range(32))]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 16, statuses
    served = {r: n - before.get(r, 0) for r, n in _served(four).items()}
    assert sum(1 for n in served.values() if n) >= 3, served


def test_an_adapter_sticks_to_the_replica_that_loaded_it(four):
    """Eight adapters, three requests each, one after another: each adapter is loaded
    once in all (its later requests go to the replica that holds it)."""
    before = _lora_loads(four)
    for i, lora in enumerate(ADAPTERS):
        for turn in range(3):
            r = _complete(four, f"adapter {i} turn {turn}", model=lora)
            assert r.status_code == 200, r.text
    loads = {r: n - before.get(r, 0) for r, n in _lora_loads(four).items()}
    assert sum(loads.values()) == len(ADAPTERS), loads


def test_a_flood_of_one_adapter_spreads_when_its_replica_fills(four):
    """32 concurrent requests of one adapter, each holding ~30 + 150 tokens of a
    replica's 1,024: its replica takes them until it fills, then others load it too."""
    before = _lora_loads(four)
    with cf.ThreadPoolExecutor(32) as pool:
        statuses = [r.status_code for r in pool.map(
            lambda i: _complete(four, f"flood {i} of one adapter", max_tokens=150,
                                model=ADAPTERS[0]), range(32))]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 16, statuses
    loads = {r: n - before.get(r, 0) for r, n in _lora_loads(four).items()}
    assert sum(1 for n in loads.values() if n) >= 2, loads


def test_usage_reports_cached_tokens_through_the_openai_client(four):
    import openai

    client = openai.OpenAI(base_url=f"{four}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = np.random.default_rng(7).integers(10, 4000, size=70).tolist()
    first = client.completions.create(model=GEN, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=GEN, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 64  # 4 full blocks of 16
    stream = client.completions.create(model=GEN, prompt=prompt + [11], max_tokens=2,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens == 64
