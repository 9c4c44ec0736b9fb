"""Overload and faults over real Serve: a burst of 10x capacity gets only 200s and 429s
(every 429 with Retry-After, every 200 complete and correct), and a replica killed mid-load
leaves no request hanging and no lease behind. Capacity is made small on purpose: one
smoke-decoder replica whose KV cache holds 256 tokens."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.deployments.conftest import admission, running_app, wait_drained

GEN = "packserve-smoke"
KV_BLOCKS = 16  # x 16 tokens per block on CPU = 256 tokens of capacity per replica
MAX_TOKENS = 40
CLIENT_TIMEOUT_S = 180


def app_args(num_replicas: int, max_wait_s: float = 0.0) -> dict:
    return {"models": [{"name": GEN, "model": "smoke:decoder", "num_replicas": num_replicas,
                        "engine": {"max_num_batched_tokens": 512, "num_kv_blocks": KV_BLOCKS,
                                   "max_model_len": 256}}],
            "admission": {"replica_timeout_s": 3.0, "heartbeat_s": 0.5,
                          "max_wait_s": max_wait_s}}


def prompts(n: int) -> list[str]:
    return [f"request {i} asks about packing" for i in range(n)]


def complete(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    body = {"model": GEN, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def expected():
    """Greedy outputs of the engine called directly (what every 200 must carry)."""
    from transformers import AutoTokenizer

    from worker import Engine, EngineConfig
    from worker.generate.sampling import SamplingParams
    from worker.models.sources import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smoke:decoder"))
    with Engine(EngineConfig(model="smoke:decoder", max_num_batched_tokens=512,
                             num_kv_blocks=64, max_model_len=256)) as engine:
        ps = prompts(50)
        outs = engine.generate([tok(p)["input_ids"] for p in ps],
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                              ignore_eos=True))
    return {p: o.text for p, o in zip(ps, outs)}


def test_a_burst_of_ten_times_capacity_gets_200_or_429(serve_url, expected):
    with running_app(app_args(1)):
        capacity = admission(serve_url)[GEN]["capacity"]
        per_request = len(prompts(1)[0].split()) + MAX_TOKENS  # a lower bound on its tokens
        burst = prompts(50)
        assert len(burst) >= 10 * capacity // (per_request + 16)  # 10x what fits at once
        with cf.ThreadPoolExecutor(len(burst)) as pool:
            responses = list(pool.map(lambda p: complete(serve_url, p), burst))
        statuses = sorted({r.status_code for r in responses})
        assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code not in
                                             (200, 429)]
        ok = [(p, r) for p, r in zip(burst, responses) if r.status_code == 200]
        rejected = [r for r in responses if r.status_code == 429]
        assert ok and rejected, statuses
        for prompt, r in ok:
            choice = r.json()["choices"][0]
            assert choice["text"] == expected[prompt] and choice["finish_reason"] == "length"
        for r in rejected:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert "capacity" in r.json()["error"]["message"]
        wait_drained(serve_url, [GEN])


def test_with_a_bounded_wait_the_same_burst_queues_instead(serve_url, expected):
    """``admission.max_wait_s``: requests that do not fit wait FIFO for room instead of a
    429; with room freed by the ones ahead, every request of the burst completes."""
    with running_app(app_args(1, max_wait_s=120.0)):
        burst = prompts(30)
        per_request = len(burst[0].split()) + MAX_TOKENS  # a lower bound on its tokens
        assert len(burst) * per_request > 4 * admission(serve_url)[GEN]["capacity"]
        with cf.ThreadPoolExecutor(len(burst)) as pool:
            responses = list(pool.map(lambda p: complete(serve_url, p), burst))
        assert [r.status_code for r in responses] == [200] * len(burst), \
            [r.text for r in responses if r.status_code != 200]
        for prompt, r in zip(burst, responses):
            assert r.json()["choices"][0]["text"] == expected[prompt]
        wait_drained(serve_url, [GEN])


def test_a_replica_killed_mid_load_leaves_nothing_hanging(serve_url):
    import ray

    with running_app(app_args(2)):
        deadline = time.monotonic() + 60
        while admission(serve_url)[GEN]["num_replicas"] < 2:
            assert time.monotonic() < deadline, admission(serve_url)
            time.sleep(0.5)
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "engine-packserve-smoke" in a["name"] and a["namespace"] == "serve"]
        assert len(victims) == 2
        with cf.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(complete, serve_url, p, 150) for p in prompts(12)]
            time.sleep(3.0)  # requests are running on both replicas
            ray.kill(ray.get_actor(victims[0]["name"], namespace="serve"), no_restart=False)
            responses = [f.result(timeout=CLIENT_TIMEOUT_S) for f in futures]  # none hangs
        for r in responses:  # 12 x 157 tokens is more than fits: some are refused
            assert r.status_code in (200, 429, 503), r.text
            if r.status_code == 503:
                assert "failed" in r.json()["error"]["message"]
            elif r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 150
        assert any(r.status_code == 200 for r in responses)
        deadline = time.monotonic() + 120
        while True:  # the dead replica's leases are gone; Serve brought a new one up
            snap = admission(serve_url)[GEN]
            if snap["reserved"] == 0 and snap["num_leases"] == 0 and snap["num_replicas"] == 2:
                break
            assert time.monotonic() < deadline, snap
            time.sleep(0.5)
        assert complete(serve_url, "after the fault", 5).status_code == 200
