"""Admission by what requests use, over real Serve with the official ``openai`` client:
chats without ``max_tokens`` (what most chat clients send) no longer lease their whole
context up front, so they do not lock other requests out; a flood of long generations
that outgrows the KV cache ends in 200s and 429s only (the engine preempts, every
admitted request finishes); a 429 after a burst names a Retry-After close to the time
the admitted work really took; and nothing is left held afterwards.

The smoke replica here has a 256-token context and a 4,096-token KV cache, so the rule
before (prompt + max_tokens up front; a chat without max_tokens: the whole context)
fits 16 such chats and refuses everyone else. The lease constants are scaled to that
context (first allotment 160 output tokens, blocks of 32) the way the defaults (256, 64)
are to real ones."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import openai
import pytest

from tests.deployments.conftest import admission, running_app, wait_drained

GEN = "packserve-smoke"
CONTEXT = 256
KV_BLOCKS = 256  # x 16 tokens per block on CPU: 4,096 tokens, 16 whole contexts
ARGS = {"models": [{"name": GEN, "model": "smoke:decoder",
                    "engine": {"max_num_batched_tokens": 512, "num_kv_blocks": KV_BLOCKS,
                               "max_model_len": CONTEXT}}],
        "admission": {"heartbeat_s": 0.5, "first_output_tokens": 160,
                      "lease_block_tokens": 32}}
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def url(serve_url):
    with running_app(ARGS):
        yield serve_url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                         timeout=TIMEOUT_S)


def stream_chat(c: openai.OpenAI, i: int, started: threading.Event | None = None) -> dict:
    """One streamed chat without max_tokens, run to the end of its context (an EOS of the
    random model would end some early): its finish reason and tokens, or its 429."""
    try:
        stream = c.chat.completions.create(
            model=GEN, messages=[{"role": "user", "content": f"chat {i}: tell me about packing"}],
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})  # to the context's end: the longest they can
        finish, tokens, prompt = None, 0, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            if started is not None and chunk.choices and chunk.choices[0].delta.content:
                started.set()
        return {"status": 200, "finish": finish, "tokens": tokens, "prompt": prompt,
                "ended": time.monotonic()}
    except openai.RateLimitError as err:
        return {"status": 429, "retry_after": int(err.response.headers["retry-after"]),
                "body": err.body}
    finally:
        if started is not None:
            started.set()  # never leave the caller waiting on a request that failed


def test_chats_without_max_tokens_leave_room_for_a_small_request(url):
    c = client(url)
    starts = [threading.Event() for _ in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        chats = [pool.submit(stream_chat, c, i, starts[i]) for i in range(16)]
        for event in starts:
            assert event.wait(TIMEOUT_S)
        small = c.completions.create(model=GEN, prompt="hi", max_tokens=3)
        small_ended = time.monotonic()
        results = [f.result(timeout=TIMEOUT_S) for f in chats]
    assert small.choices[0].finish_reason == "length" and small.usage.completion_tokens == 3
    assert [r["status"] for r in results] == [200] * 16, results
    for r in results:  # each ran to its context's end, past its first lease of 160
        assert r["finish"] == "length" and r["prompt"] + r["tokens"] == CONTEXT
        assert r["tokens"] > 160  # so its lease grew
        assert r["ended"] > small_ended  # the small request did not wait for them
    wait_drained(url, [GEN])


def test_a_flood_of_long_generations_ends_in_200s_and_429s(url):
    c = client(url)
    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: stream_chat(c, i), range(64)))
    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 429}, results
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(ok) > 16, statuses  # more than whole-context leases would have admitted
    assert refused, statuses  # and the rest were refused, not queued without bound
    for r in ok:  # every admitted request finished, at its context's end
        assert r["finish"] == "length" and r["prompt"] + r["tokens"] == CONTEXT, r
    for r in refused:
        assert r["retry_after"] >= 1 and r["body"]["type"] == "rate_limit_error"
    replica = next(iter(admission(url)[GEN]["replicas"].values()))
    assert replica["num_preemptions"] > 0  # outgrown KV was handled by recompute, not OOM
    wait_drained(url, [GEN])


def complete(c: openai.OpenAI, i: int) -> dict:
    try:
        c.completions.create(model=GEN, prompt=f"burst {i}", max_tokens=150,
                             extra_body={"ignore_eos": True})
        return {"status": 200, "ended": time.monotonic()}
    except openai.RateLimitError as err:
        return {"status": 429, "at": time.monotonic(),
                "retry_after": int(err.response.headers["retry-after"])}


def test_retry_after_a_burst_is_close_to_the_time_the_admitted_work_took(url):
    """Leases of 150 output tokens (below the first allotment: they do not grow), twice
    what fits. A first burst lets the replica measure its pace; in the second, the first
    429's Retry-After is within 2x of when the admitted requests really ended."""
    c = client(url)
    for _ in range(2):
        with cf.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(lambda i: complete(c, i), range(50)))
        wait_drained(url, [GEN])
    ok = [r for r in results if r["status"] == 200]
    refused = sorted((r for r in results if r["status"] == 429), key=lambda r: r["at"])
    assert ok and refused, results
    first = refused[0]
    took = max(r["ended"] for r in ok) - first["at"]
    assert took / 2 <= first["retry_after"] <= 2 * took, (first, took)


def test_a_small_request_finishes_before_heavy_ones_that_started_first(url):
    """Fair steps over Serve: an ``n=16, logprobs=20, echo`` completion and one with
    10,000 stop strings are streaming when a 2-token request arrives; it finishes first
    (how long it took is the fair-steps benchmark's to measure, not this test's)."""
    c = client(url)
    words = " ".join(f"w{i}" for i in range(60))
    stops = [f"<never {i}>" for i in range(10_000)]
    started = [threading.Event(), threading.Event()]
    ended: dict[str, float] = {}

    def heavy(name: str, event: threading.Event, **kw) -> None:
        try:
            for _ in c.completions.create(model=GEN, stream=True, **kw):
                event.set()
        finally:
            event.set()
            ended[name] = time.monotonic()

    with cf.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(heavy, "echo", started[0], prompt=words, n=16, logprobs=20,
                            echo=True, max_tokens=64, extra_body={"ignore_eos": True}),
                pool.submit(heavy, "stops", started[1], prompt="count", stop=stops,
                            max_tokens=200, extra_body={"ignore_eos": True})]
        for event in started:
            assert event.wait(TIMEOUT_S)
        small = c.completions.create(model=GEN, prompt="hi", max_tokens=2)
        small_ended = time.monotonic()
        for job in jobs:
            job.result(timeout=TIMEOUT_S)
    assert small.usage.completion_tokens == 2
    assert small_ended < min(ended.values()), (small_ended, ended)
    wait_drained(url, [GEN])
