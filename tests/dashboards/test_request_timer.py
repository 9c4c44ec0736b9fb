"""The ingress's request timing (``deployments/http/request_timer.py``) on a small FastAPI
app with the same middleware and marks as the ingress, and a fake ``IngressMetrics``:
what each kind of request records, and that a failing recorder never fails a request."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from deployments.http import request_timer
from deployments.http.request_timer import RequestMetrics, timer

SERVED = {"m"}


class FakeMetrics:
    def __init__(self, fail: bool = False):
        self.requests, self.waits, self.fail = [], [], fail

    def observe_request(self, model, endpoint, status, ttft_s=None, tpot_s=None, e2e_s=None):
        if self.fail:
            raise RuntimeError("metrics are down")
        self.requests.append({"model": model, "endpoint": endpoint, "status": status,
                              "ttft": ttft_s, "tpot": tpot_s, "e2e": e2e_s})

    def observe_queue_wait(self, model, seconds):
        self.waits.append((model, seconds))


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request, body: dict):
        t = timer(request.scope, body["model"], SERVED)
        t.dispatched()
        if not body.get("stream"):
            t.generated(body["n"])
            return {"ok": True}

        async def deltas():
            for _ in range(body["n"]):
                t.delta(1)
                yield "data: {}\n\n"
        return StreamingResponse(deltas(), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(body: dict):
        raise HTTPException(429, "full")

    @app.get("/v1/models")
    async def models():
        return {}

    app.add_middleware(RequestMetrics)
    return app


@pytest.fixture
def metrics():
    fake = FakeMetrics()
    request_timer.set_recorder(fake)
    yield fake
    request_timer.set_recorder(None)
    request_timer._RECORDER["failed"] = False


@pytest.fixture
def client():
    with TestClient(make_app()) as c:
        yield c


def test_a_non_streamed_generation_has_ttft_and_e2e_but_no_tpot(metrics, client):
    assert client.post("/v1/completions", json={"model": "m", "n": 5}).status_code == 200
    (r,) = metrics.requests
    assert (r["model"], r["endpoint"], r["status"], r["tpot"]) == ("m", "completions", 200, None)
    assert 0 < r["ttft"] <= r["e2e"]
    ((model, wait),) = metrics.waits
    assert model == "m" and 0 <= wait <= r["ttft"]


def test_a_stream_has_tpot_over_the_tokens_after_the_first(metrics, client):
    with client.stream("POST", "/v1/completions",
                       json={"model": "m", "n": 4, "stream": True}) as response:
        assert len([line for line in response.iter_lines() if line]) == 4
    (r,) = metrics.requests
    assert r["status"] == 200 and 0 < r["ttft"] <= r["e2e"]
    assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / 3)  # 4 tokens


def test_errors_count_by_status_without_latencies(metrics, client):
    assert client.post("/v1/embeddings", json={"model": "m"}).status_code == 429
    assert client.post("/v1/completions", content=b"{not json").status_code == 422
    assert client.post("/v1/completions", json={"model": "other", "n": 1}).status_code == 200
    assert client.get("/v1/models").status_code == 200  # not an endpoint that is timed
    got = [(r["model"], r["endpoint"], r["status"]) for r in metrics.requests]
    assert got == [("unknown", "embeddings", 429), ("unknown", "completions", 422),
                   ("unknown", "completions", 200)]
    assert [r["e2e"] for r in metrics.requests[:2]] == [None, None]
    assert [r["ttft"] for r in metrics.requests[:2]] == [None, None]


def test_a_failing_recorder_never_fails_the_request(client):
    request_timer.set_recorder(FakeMetrics(fail=True))
    try:
        for _ in range(2):
            assert client.post("/v1/completions", json={"model": "m", "n": 2}).status_code == 200
    finally:
        request_timer.set_recorder(None)
        request_timer._RECORDER["failed"] = False


def test_without_a_recorder_nothing_is_timed(client):
    assert client.post("/v1/completions", json={"model": "m", "n": 1}).json() == {"ok": True}
    assert timer({}, "m", SERVED) is request_timer.UNTIMED
