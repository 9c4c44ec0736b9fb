"""Ctrl-C to ``packserve serve`` drains (issue 29): with a stream in flight and a request
still sending its body, SIGINT makes new requests 503 + Retry-After in OpenAI's body and
``/health`` report draining; the stream ends with ``data: [DONE]`` (finished, or ended
with an error event at the drain deadline), never a cut body; the request not answered
by the deadline gets a 503; then the server stops."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx

from tests.deployments.serve_process import packserve_serve

DRAIN_TIMEOUT_S = 3


def test_sigint_drains_streams_and_refuses_new_requests():
    # body_timeout_s > the drain: the half-sent body stays in flight until the deadline
    with packserve_serve("--drain-timeout", str(DRAIN_TIMEOUT_S), "--body-timeout-s", "60") as s:
        events: list[str] = []
        started = threading.Event()

        def stream():
            with httpx.stream("POST", f"{s.url}/v1/completions", timeout=120, json={
                    "model": "tiny", "prompt": "hi", "max_tokens": 240, "stream": True,
                    "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        holder = socket.create_connection(("127.0.0.1", s.port))
        holder.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                       b"application/json\r\nContent-Length: 1000\r\n\r\n{")
        assert started.wait(60), s.output()[-2000:]
        time.sleep(0.5)  # the holder's headers reached the ingress
        s.proc.send_signal(signal.SIGINT)

        refused = None
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + 2
        while time.monotonic() < deadline:
            r = httpx.get(f"{s.url}/v1/models", timeout=10)
            if r.status_code == 503:
                refused = r
                break
            time.sleep(0.1)
        assert refused is not None, "no 503 while draining"
        assert int(refused.headers["retry-after"]) >= 1
        err = refused.json()["error"]
        assert err["type"] == "service_unavailable" and "shutting down" in err["message"]
        health = httpx.get(f"{s.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "draining"

        holder.settimeout(30)
        answer = holder.recv(4096)
        holder.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]

        reader.join(60)
        assert events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2].removeprefix("data: "))
        assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
        assert s.wait_exit(120) in (0, 130)
        out = s.output()
        assert "draining" in out and "stopped in" in out, out[-3000:]
        assert "Ray metrics (Prometheus) on http://127.0.0.1:" in out  # the API's host
