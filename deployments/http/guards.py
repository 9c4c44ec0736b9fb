"""Slow and hostile clients: the ingress's ASGI guard.

``Guard``, an ASGI middleware of the ingress app (inside ``RequestMetrics``, so what it
refuses is counted), configured by the ``http`` section (``deployments/app/config.py``).
It sees a request once its headers are parsed, in both modes (behind HAProxy the
replica's own HTTP server, behind Serve's proxy the handle call):

| what                                           | answer                              |
|------------------------------------------------|-------------------------------------|
| headers over ``max_header_bytes``              | 431, OpenAI's error body            |
| a body chunk not received within               | 408, OpenAI's error body,           |
| ``body_timeout_s``, or the whole body slower   | ``Connection: close``               |
| than ``min_body_rate_bytes_s`` (after the      |                                     |
| ``body_timeout_s`` allowance)                  |                                     |
| a request while draining                       | 503 + Retry-After (``/health``:     |
|                                                | 503 ``{"status": "draining"}``)      |

It also counts the requests in flight: a drain (``Drain``, ``deployments/http/draining.py``)
waits for that count, and at its deadline ends what is left: a started event stream gets a
last ``data: {"error": ...}`` event and ``data: [DONE]`` (never a cut body), a request not
answered yet a 503.

What ASGI cannot see (the header deadline, header bytes before the app is called,
connection caps) is uvicorn's: ``deployments/http/uvicorn_guard.py``, installed by
``configure`` for the replica's own server and by Serve's proxy through ``proxy_callback``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.http.draining import (
    DRAIN,
    RETRY_AFTER_DRAINING_S,
    SSE_END_MESSAGE,
    _InFlight,
    watch_for_drain,
)
from deployments.http.client_limits import Limits, error_body, limits, set_limits
from deployments.http.uvicorn_guard import install_uvicorn_guards

logger = logging.getLogger("ray.serve")

BODY_METHODS = ("POST", "PUT", "PATCH")
_WATCHER: dict = {}  # the drain watcher task of this ingress process


# ---- the ASGI middleware ------------------------------------------------------------

class BodyTimeout(Exception):
    """The client did not send its body in time (408)."""


def _header_bytes(scope: Scope) -> int:
    """What the request line and headers took on the wire (about: ``name: value\\r\\n``)."""
    line = len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())


def timed_receive(receive: Receive, declared: int | None, lim: Limits) -> Receive:
    """``receive`` with the body deadline: each chunk within ``body_timeout_s``, the whole
    body within ``body_timeout_s + max(declared, received) / min_body_rate_bytes_s``. Once
    the body is complete, later calls (streams listen for the client leaving) wait freely."""
    start = time.monotonic()
    state = {"received": 0, "done": False}

    async def receive_in_time() -> Message:
        if state["done"]:
            return await receive()
        expected = max(declared or 0, state["received"])
        deadline = start + lim.body_timeout_s + expected / lim.min_body_rate_bytes_s
        wait = min(lim.body_timeout_s, deadline - time.monotonic())
        if wait <= 0:
            raise BodyTimeout(state["received"], declared)
        try:
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            raise BodyTimeout(state["received"], declared) from None
        if message["type"] == "http.request":
            state["received"] += len(message.get("body", b""))
            state["done"] = not message.get("more_body", False)
        else:
            state["done"] = True
        return message

    return receive_in_time


async def _send_json(send: Send, status: int, body: bytes, *, close: bool = False,
                     retry_after: int | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI-side limits and the in-flight count (see the module docstring)."""

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        lim = limits()
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        where = f"{scope.get('method')} {scope.get('path')}"
        size = _header_bytes(scope)
        if size > lim.max_header_bytes:
            logger.warning("%s -> 431: headers of %d bytes", where, size)
            return await _send_json(send, 431, error_body(
                431, f"the request headers are {size} bytes, more than the limit of "
                f"{lim.max_header_bytes} bytes (http.max_header_bytes)",
                code="request_header_fields_too_large"), close=True)
        if DRAIN.draining:
            if path == "/health":
                body = json.dumps({"status": "draining", "reason": DRAIN.reason}).encode()
                return await _send_json(send, 503, body, retry_after=RETRY_AFTER_DRAINING_S)
            status, body = DRAIN.refusal()
            return await _send_json(send, status, body, retry_after=RETRY_AFTER_DRAINING_S)
        if scope.get("method") in BODY_METHODS:
            declared = dict(scope.get("headers") or ()).get(b"content-length")
            receive = timed_receive(receive, int(declared) if declared and declared.isdigit()
                                    else None, lim)
        rec = _InFlight()
        DRAIN.in_flight.add(rec)
        try:
            await self.inner(scope, receive, rec.watch(send))
        except BodyTimeout as exc:
            received, declared = exc.args
            logger.warning("%s -> 408: %d of %s body bytes in time", where, received,
                           declared if declared is not None else "?")
            if not rec.started:
                await _send_json(send, 408, error_body(
                    408, f"the request body did not arrive in time ({received} of "
                    f"{declared if declared is not None else 'unknown'} bytes; "
                    f"http.body_timeout_s={lim.body_timeout_s:g}, "
                    f"http.min_body_rate_bytes_s={lim.min_body_rate_bytes_s})",
                    code="request_timeout"), close=True)
        except asyncio.CancelledError:
            if not rec.ended_by_drain:
                raise
            if rec.task is not None:
                rec.task.uncancel()
            await self._end(rec, send)
        finally:
            DRAIN.in_flight.discard(rec)

    @staticmethod
    async def _end(rec: _InFlight, send: Send) -> None:
        """The drain deadline cut this request: finish its response properly."""
        try:
            if not rec.started:
                status, body = DRAIN.refusal()
                await _send_json(send, status, body, retry_after=RETRY_AFTER_DRAINING_S)
            elif rec.event_stream and not rec.finished:
                event = {"error": {"message": SSE_END_MESSAGE, "type": "service_unavailable",
                                   "param": None, "code": "draining"}}
                tail = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            elif not rec.finished:  # a JSON body half sent: only closing is left
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # noqa: BLE001 - the client may be gone already
            logger.debug("could not end a drained request", exc_info=True)


def configure(http) -> None:
    """Called by the ingress when it starts: its limits, uvicorn's guards for its own
    direct-ingress server, and the drain watcher."""
    set_limits(Limits.of(http))
    install_uvicorn_guards(limits())
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        app, replica = ctx.app_name, ctx.replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (unit tests)
        return
    task = asyncio.get_running_loop().create_task(watch_for_drain(app, replica))
    _WATCHER["task"] = task  # keep a reference
