"""Slow and hostile clients (issue 29) against a real ``packserve serve``, in both of its
modes (throughput mode: HAProxy in front; the default one: Serve's proxy, uvicorn), with
short deadlines: a trickled header and a body shorter than it declares are cut (408) in
about the configured deadline while ``/health`` and a normal request from another
client still answer; headers over the limit get 431 in OpenAI's error body. And the
HAProxy config our wrapper produces from Ray's, as text."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from deployments.app import haproxy_guard
from tests.deployments.serve_process import packserve_serve

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
NUM_SLOW = 50
GIVE_UP_S = 30.0  # a bounded wait: a socket not cut by then counts as "held"
LIMIT_FLAGS = ["--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s",
               str(BODY_TIMEOUT_S), "--max-header-bytes", "8192"]


@pytest.fixture(scope="module", params=["throughput", "default"])
def served(request):
    mode = [] if request.param == "throughput" else ["--no-ray-throughput-mode"]
    with packserve_serve(*LIMIT_FLAGS, *mode) as s:
        yield s


def _read_until_closed(s: socket.socket, give_up: float) -> bytes:
    data = b""
    s.settimeout(max(0.1, give_up - time.monotonic()))
    try:
        while chunk := s.recv(4096):
            data += chunk
            s.settimeout(max(0.1, give_up - time.monotonic()))
    except (socket.timeout, TimeoutError):
        return data + b"<held>"
    except OSError:
        pass
    return data


def trickle_headers(port: int, out: list) -> None:
    """A header line every 0.5 s, never the end of the headers."""
    s = socket.create_connection(("127.0.0.1", port))
    give_up = time.monotonic() + GIVE_UP_S
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    s.setblocking(False)
    data = b""
    try:
        while time.monotonic() < give_up:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except BlockingIOError:
                pass
            time.sleep(0.5)
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    break
            except BlockingIOError:
                continue
        else:
            data += b"<held>"
    except OSError:
        pass
    finally:
        s.close()
    out.append(data)


def short_body(port: int) -> bytes:
    """Declares 1,000 bytes, sends 56; returns what came back until the server closed."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                  b"json\r\nContent-Length: 1000\r\n\r\n" + b'{"model": "tiny", ' + b" " * 38)
        return _read_until_closed(s, time.monotonic() + GIVE_UP_S)
    finally:
        s.close()


def openai_error(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), raw[:300]
    assert b"application/json" in head.lower(), raw[:300]
    err = json.loads(body.split(b"<held>")[0])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_slow_clients_are_cut_while_others_are_served(served):
    results: list[bytes] = []
    slow = [threading.Thread(target=trickle_headers, args=(served.port, results))
            for _ in range(NUM_SLOW)]
    for t in slow:
        t.start()
    try:
        time.sleep(0.5)
        assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
        out = httpx.post(f"{served.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert out.status_code == 200, out.text
        body = short_body(served.port)  # while the trickles run
    finally:
        for t in slow:
            t.join(GIVE_UP_S + 10)
    assert len(results) == NUM_SLOW
    held = [r for r in results if r.endswith(b"<held>")]
    assert not held, f"{len(held)} of {NUM_SLOW} trickled headers held: {held[0][:200]!r}"
    assert all(r.startswith(b"HTTP/1.1 408") or r == b"" for r in results), results[0][:300]
    assert not body.endswith(b"<held>"), body[:300]  # answered and closed
    err = openai_error(body, 408)
    assert "body" in err["message"] and err["code"] == "request_timeout"


def test_oversized_headers_get_431_in_openai_body(served):
    r = httpx.get(f"{served.url}/v1/models", headers={"X-Big": "a" * 9000}, timeout=30)
    assert r.status_code == 431, r.text
    err = r.json()["error"]
    assert "8192" in err["message"] and "http.max_header_bytes" in err["message"]
    assert httpx.get(f"{served.url}/v1/models", timeout=30).status_code == 200


# ---- the HAProxy config, as text ----------------------------------------------------

RAY_CONFIG = """global
    maxconn 4096
    tune.bufsize 16384
defaults
    mode http
    timeout client 3600s
frontend http_frontend
    bind 127.0.0.1:8000
    acl healthcheck path -i /-/healthz
    use_backend b if { path_beg / }
backend b
    server s 127.0.0.1:30000 check
"""


def test_the_haproxy_config_gets_the_limits():
    settings = {"header_timeout_s": 10.0, "max_header_bytes": 16384, "max_connections": 4096,
                "max_connections_per_client": 256, "reserve": 64}
    text = haproxy_guard.patch(RAY_CONFIG, settings)
    assert haproxy_guard.patch(text, settings) == text  # once
    lines = [x.strip() for x in text.splitlines()]
    assert "timeout http-request 10000ms" in " ".join(lines)
    assert "maxconn 4160" in lines and "maxconn 4096" in lines  # global, frontend
    assert int(next(x for x in lines if x.startswith("tune.bufsize")).split()[1]) > 2 * 16384
    front = text.split("frontend http_frontend")[1].split("\nbackend b")[0]
    assert "store conn_cur" in front and "sc0_conn_cur gt 256" in front
    assert "status 431" in front and "req.hdrs,length gt 16384" in front
    assert "fe_conn gt 4032" in front and "!{ path /health }" in front
    assert "deny_status 408" in front
    assert front.index("status 431") < front.index("use_backend")
