"""The serving edge under requests that used to hurt everyone else, on the session's
shared app: huge prompts never stall ``/health`` or a small completion (tokenizing runs
off the ingress's event loop, and text over the cap is refused before it), a large
embedding list is served in parts without starving other requests and leaves no memory
behind, and a stream sends at most one message per engine step.

No wall-clock speed is asserted: the no-stall test checks ordering (the small requests
finish before the huge ones) and a generous bound."""

from __future__ import annotations

import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from tests.deployments.conftest import (
    EMBED,
    GEN,
    KEY,
    MAX_PROMPT_CHARS,
    SHARED_APP,
    admission,
    ingress_handle,
    replica_handle,
)

HEADERS = {"Authorization": f"Bearer {KEY}"}
NO_STALL_BOUND_S = 30.0  # generous: the point is the ordering


@pytest.fixture(scope="module")
def client(shared_url):
    return openai.OpenAI(base_url=f"{shared_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ingress_state() -> dict:
    return ingress_handle(SHARED_APP).state.remote().result(timeout_s=30)


def replica_state(model: str) -> dict:
    return replica_handle(model, SHARED_APP).state.remote().result(timeout_s=30)


class Sender(threading.Thread):
    """One POST in a thread; keeps the response and when it ended."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.response: httpx.Response | None = None
        self.done_at = float("inf")
        self.start()

    def run(self) -> None:
        self.response = httpx.post(f"{self.url}{self.path}", json=self.body, headers=HEADERS,
                                   timeout=300)
        self.done_at = time.monotonic()


def test_a_cpu_replica_runs_torch_on_every_core_it_may_use(shared_url):
    """Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU; the replica's torch
    must not inherit it (the in-process engine uses every core: ModelArgs.torch_threads)."""
    assert replica_state(GEN)["torch_threads"] == len(os.sched_getaffinity(0))


def test_huge_prompts_never_stall_health_or_a_small_completion(shared_url, client):
    allowed = "word " * (1_500_000 // 5)  # under the cap: tokenized on the pool, then too long
    refused = "x" * 3_900_000  # over the cap: refused before tokenizing
    bigs = [Sender(shared_url, "/v1/completions", {"model": GEN, "prompt": allowed,
                                                   "max_tokens": 2}) for _ in range(8)]
    huges = [Sender(shared_url, "/v1/completions", {"model": GEN, "prompt": refused,
                                                    "max_tokens": 2}) for _ in range(8)]
    deadline = time.monotonic() + 120
    while ingress_state()["tokenizer_queued"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the pool is busy with the big ones
    started = time.monotonic()
    health = httpx.get(f"{shared_url}/health", timeout=120)
    small = client.completions.create(model=GEN, prompt="hi", max_tokens=2, temperature=0)
    finished = time.monotonic()
    for sender in bigs + huges:
        sender.join(timeout=300)
    assert health.status_code == 200 and small.usage.completion_tokens == 2
    assert finished < max(s.done_at for s in bigs), "the small requests waited for the pool"
    assert finished - started < NO_STALL_BOUND_S
    for s in bigs:
        assert s.response.status_code == 400 and "max_model_len=512" in s.response.text
    for s in huges:
        err = s.response.json()["error"]
        assert s.response.status_code == 400 and err["param"] == "prompt"
        assert str(MAX_PROMPT_CHARS) in err["message"] and "3900000" in err["message"]
    assert ingress_state()["tokenizer_queued"] == 0


def test_a_large_embedding_list_runs_in_parts_and_others_are_served_meanwhile(shared_url,
                                                                            client):
    texts = [f"document {i}: packing sequences into token budgets, not padding" for i in
             range(2048)]
    capacity = next(m for m in client.models.list().data if m.id == EMBED).model_extra[
        "packserve"]["capacity_tokens"]
    big = Sender(shared_url, "/v1/embeddings", {"model": EMBED, "input": texts})
    deadline = time.monotonic() + 120
    while not admission(shared_url, KEY)[EMBED]["reserved"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the first part holds its lease
    held = admission(shared_url, KEY)[EMBED]["reserved"]
    others = [client.embeddings.create(model=EMBED, input=f"small request {i}") for i in range(3)]
    big.join(timeout=300)
    assert 0 < held <= capacity // 2, (held, capacity)  # a part, never the whole pool
    assert all(len(o.data) == 1 for o in others)  # served, not 429
    body = big.response.json()
    assert big.response.status_code == 200 and [d["index"] for d in body["data"]] == list(
        range(2048))
    for i in (0, 1000, 2047):  # parts are concatenated in input order
        alone = client.embeddings.create(model=EMBED, input=texts[i]).data[0].embedding
        np.testing.assert_allclose(body["data"][i]["embedding"], alone, atol=1e-5)


def test_memory_goes_back_after_large_responses(shared_url):
    texts = [f"large response {i}" for i in range(2048)]  # few tokens, 15 MB of JSON back

    def one() -> None:
        r = httpx.post(f"{shared_url}/v1/embeddings", headers=HEADERS, timeout=300,
                       json={"model": EMBED, "input": texts})
        assert r.status_code == 200 and len(r.content) > 8 << 20

    one()  # the first grows caches for good (tokenizer, allocator arenas)
    base = ingress_state()["rss_bytes"], replica_state(EMBED)["rss_bytes"]
    for _ in range(2):
        one()
    after = ingress_state()["rss_bytes"], replica_state(EMBED)["rss_bytes"]
    grown = [(a - b) >> 20 for a, b in zip(after, base)]
    assert max(grown) < 64, f"ingress, replica grew by {grown} MiB over two more responses"


def test_a_stream_sends_at_most_one_message_per_engine_step(client):
    before = replica_state(GEN)["num_engine_steps"]
    counts: list[tuple[int, int]] = []

    def stream(seed: int) -> None:
        chunks = list(client.completions.create(
            model=GEN, prompt=f"stream {seed}", max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        counts.append((sum(1 for c in chunks if c.choices), chunks[-1].usage.completion_tokens))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    steps = replica_state(GEN)["num_engine_steps"] - before
    assert len(counts) == 6
    for messages, tokens in counts:
        assert tokens == 24 and 1 <= messages <= min(steps, tokens), (messages, tokens, steps)
