"""Slow and hostile clients, and the drain on stop: the ingress-side limits.

Two layers, both configured by the ``http`` section (``deployments/app/config.py``):

* ``Guard``, an ASGI middleware of the ingress app (inside ``RequestMetrics``, so what it
  refuses is counted). It sees a request once its headers are parsed, in both modes
  (behind HAProxy the replica's own HTTP server, behind Serve's proxy the handle call):

  | what                                           | answer                              |
  |------------------------------------------------|-------------------------------------|
  | headers over ``max_header_bytes``              | 431, OpenAI's error body            |
  | a body chunk not received within               | 408, OpenAI's error body,           |
  | ``body_timeout_s``, or the whole body slower   | ``Connection: close``               |
  | than ``min_body_rate_bytes_s`` (after the      |                                     |
  | ``body_timeout_s`` allowance)                  |                                     |
  | a request while draining                       | 503 + Retry-After (``/health``:     |
  |                                                | 503 ``{"status": "draining"}``)      |

  It also counts the requests in flight: a drain (``Drain``) waits for that count, and at
  its deadline ends what is left: a started event stream gets a last ``data: {"error":
  ...}`` event and ``data: [DONE]`` (never a cut body), a request not answered yet a 503.

* ``install_uvicorn_guards``: what ASGI cannot see, because uvicorn (Serve's proxy and
  the replicas' direct-ingress servers) only calls the app once the headers are complete
  and has no header deadline, no header size limit with httptools, and no connection
  caps. It replaces ``uvicorn.protocols.http.auto.AutoHTTPProtocol`` (what uvicorn's
  default ``http="auto"`` loads when a server starts) by a subclass that arms a header
  deadline on each connection and request (408 in OpenAI's body, then close), counts
  header bytes (431), and caps connections per client address and in all (429 / 503).
  Serve's proxy installs it through Ray's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
  (``proxy_callback``, set by ``packserve serve``); an ingress replica installs it when it
  starts (its direct-ingress server, throughput mode, starts after the ingress is built).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")

BODY_METHODS = ("POST", "PUT", "PATCH")
DRAIN_KV_NAMESPACE = "packserve"
DRAIN_POLL_S = 0.5
RETRY_AFTER_DRAINING_S = 1
# the environment ``packserve serve`` sets for Serve's proxy (deployments/app/serve_cli.py)
ENV_PREFIX = "PACKSERVE_GUARD_"


@dataclass(frozen=True)
class Limits:
    """The ``http`` section's client limits (defaults: ``HTTPArgs``')."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    min_body_rate_bytes_s: int = 65536
    max_header_bytes: int = 16384
    max_connections: int = 4096
    max_connections_per_client: int = 256
    drain_timeout_s: float = 30.0

    @classmethod
    def of(cls, http) -> Limits:
        """From an ``HTTPArgs`` (or anything with its attributes)."""
        return cls(**{k: getattr(http, k) for k in cls.__dataclass_fields__})

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): repr(getattr(self, k))
                for k in self.__dataclass_fields__}

    @classmethod
    def from_env(cls, environ=os.environ) -> Limits | None:
        values = {}
        for name, f in cls.__dataclass_fields__.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                return None
            values[name] = (int if f.type in ("int", int) else float)(float(raw))
        return cls(**values)


_LIMITS: dict = {"limits": Limits()}  # per ingress process (set by ``configure``)


def limits() -> Limits:
    return _LIMITS["limits"]


def error_body(status: int, message: str, *, type: str = "invalid_request_error",
               code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None,
                                 "code": code}}).encode()


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


class _InFlight:
    """One request the ingress is serving: how its response started, and whether the
    drain ended it."""

    __slots__ = ("task", "started", "event_stream", "finished", "ended_by_drain")

    def __init__(self):
        self.task = asyncio.current_task()
        self.started = self.event_stream = self.finished = self.ended_by_drain = False

    def watch(self, send: Send) -> Send:
        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started = True
                ctype = dict(message.get("headers") or ()).get(b"content-type", b"")
                self.event_stream = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self.finished = True
            await send(message)

        return watched


class Drain:
    """This ingress process's requests in flight and its drain (one per process)."""

    def __init__(self):
        self.in_flight: set[_InFlight] = set()
        self.draining = False
        self.deadline: float | None = None
        self.reason = ""
        self._done: asyncio.Event | None = None

    def begin(self, timeout_s: float, reason: str) -> asyncio.Task | None:
        """Stop admitting; end what is left after ``timeout_s``. Idempotent."""
        if self.draining:
            return None
        self.draining, self.reason = True, reason
        self.deadline = time.monotonic() + timeout_s
        logger.warning("draining (%s): %d requests in flight, ending what is left in %.0f s",
                       reason, len(self.in_flight), timeout_s)
        return asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.in_flight and time.monotonic() < self.deadline:
            await asyncio.sleep(0.05)
        left = [r for r in self.in_flight if not r.finished]
        if left:
            logger.warning("drain deadline: ending %d requests still in flight", len(left))
        for rec in left:
            rec.ended_by_drain = True
            if rec.task is not None:
                rec.task.cancel()

    def refusal(self) -> tuple[int, bytes]:
        remaining = max(0.0, (self.deadline or 0) - time.monotonic())
        return 503, error_body(503, "the server is shutting down (draining its requests for "
                               f"{math.ceil(remaining)} more s); retry the request",
                               type="service_unavailable", code="draining")


DRAIN = Drain()
SSE_END_MESSAGE = ("the server is shutting down: this stream was ended at the drain "
                   "deadline (http.drain_timeout_s); retry the request")


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


# ---- the drain's triggers -----------------------------------------------------------

def drain_key(app_name: str) -> bytes:
    """The internal-KV key ``packserve serve`` sets to drain an application's ingresses."""
    return f"drain:{app_name}".encode()


def in_flight_key(app_name: str, replica: str) -> bytes:
    return f"inflight:{app_name}:{replica}".encode()


def _replica_stopping() -> bool:
    """Whether Serve began this replica's graceful shutdown (a rolling upgrade, a
    scale-down, ``serve.delete``). Ray has no public hook before ``__del__`` (which runs
    after the drain), so this reads the replica actor's ``_shutting_down`` flag; if a
    Ray version moves it, this trigger is off (False) and the explicit one still works."""
    try:
        import ray

        worker = ray._private.worker.global_worker
        actor = worker.actors.get(worker.actor_id)
        return bool(getattr(getattr(actor, "_replica_impl", None), "_shutting_down", False))
    except Exception:  # noqa: BLE001
        return False


async def watch_for_drain(app_name: str, replica: str) -> None:
    """Poll both triggers; while draining, publish the in-flight count for the CLI."""
    from ray.experimental import internal_kv as kv

    loop = asyncio.get_running_loop()

    def poll() -> bytes | None:
        return kv._internal_kv_get(drain_key(app_name), namespace=DRAIN_KV_NAMESPACE)

    while True:
        await asyncio.sleep(DRAIN_POLL_S)
        try:
            if not DRAIN.draining:
                asked = await loop.run_in_executor(None, poll)
                if asked is not None:
                    timeout = json.loads(asked).get("timeout_s", limits().drain_timeout_s)
                    DRAIN.begin(float(timeout), "packserve serve is stopping")
                elif _replica_stopping():
                    DRAIN.begin(limits().drain_timeout_s, "Serve is stopping this replica")
            if DRAIN.draining:
                count = str(len(DRAIN.in_flight)).encode()
                await loop.run_in_executor(None, lambda: kv._internal_kv_put(
                    in_flight_key(app_name, replica), count, overwrite=True,
                    namespace=DRAIN_KV_NAMESPACE))
        except Exception:  # noqa: BLE001 - never take the ingress down for this
            logger.debug("drain watch failed", exc_info=True)


def configure(http) -> None:
    """Called by the ingress when it starts: its limits, uvicorn's guards for its own
    direct-ingress server, and the drain watcher."""
    _LIMITS["limits"] = Limits.of(http)
    install_uvicorn_guards(limits())
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        app, replica = ctx.app_name, ctx.replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (unit tests)
        return
    task = asyncio.get_running_loop().create_task(watch_for_drain(app, replica))
    _LIMITS["watcher"] = task  # keep a reference


# ---- uvicorn: the header deadline, header bytes, connection caps -------------------

def _raw_response(status: int, reason: str, body: bytes, retry_after: int | None = None) -> bytes:
    extra = f"retry-after: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n").encode() + body


def guarded_protocol(base: type, lim: Limits) -> type:
    """A subclass of uvicorn's HTTP protocol class with the limits of ``lim``."""

    class GuardedHTTPProtocol(base):
        packserve_limits = lim
        per_client: dict = {}

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._ps_timer = None
            self._ps_header_bytes = 0
            self._ps_tail = b""
            self._ps_ip = self.client[0] if self.client else None
            counts = type(self).per_client
            counts[self._ps_ip] = counts.get(self._ps_ip, 0) + 1
            if counts[self._ps_ip] > lim.max_connections_per_client:
                return self._ps_refuse(429, "Too Many Requests", error_body(
                    429, f"more than {lim.max_connections_per_client} connections from your "
                    "address (http.max_connections_per_client)", type="rate_limit_error",
                    code="too_many_connections"))
            if len(self.connections) > lim.max_connections:
                return self._ps_refuse(503, "Service Unavailable", error_body(
                    503, f"the server holds its limit of {lim.max_connections} connections "
                    "(http.max_connections); retry", type="service_unavailable"), 1)
            self._ps_arm()

        def connection_lost(self, exc) -> None:
            self._ps_disarm()
            counts = type(self).per_client
            left = counts.get(self._ps_ip, 1) - 1
            if left > 0:
                counts[self._ps_ip] = left
            else:
                counts.pop(self._ps_ip, None)
            super().connection_lost(exc)

        def _ps_refuse(self, status: int, reason: str, body: bytes, retry=None) -> None:
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, reason, body, retry))
                self.transport.close()

        def _ps_arm(self) -> None:
            if self._ps_timer is None:
                self._ps_header_bytes, self._ps_tail = 0, b""
                self._ps_timer = self.loop.call_later(lim.header_timeout_s, self._ps_expired)

        def _ps_disarm(self) -> None:
            if getattr(self, "_ps_timer", None) is not None:
                self._ps_timer.cancel()
                self._ps_timer = None

        def _ps_expired(self) -> None:
            self._ps_timer = None
            if self._ps_awaiting_headers():
                self._ps_refuse(408, "Request Timeout", error_body(
                    408, f"the request headers did not arrive within "
                    f"{lim.header_timeout_s:g} s (http.header_timeout_s)",
                    code="request_timeout"))

        def _ps_awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            awaiting = self._ps_awaiting_headers()
            if awaiting:
                self._ps_arm()
                seen = self._ps_tail + data
                end = seen.find(b"\r\n\r\n")
                counted = len(data) if end < 0 else max(0, end + 4 - len(self._ps_tail))
                self._ps_header_bytes += counted
                self._ps_tail = seen[-3:]
                if self._ps_header_bytes > lim.max_header_bytes:
                    self._ps_disarm()
                    return self._ps_refuse(431, "Request Header Fields Too Large", error_body(
                        431, f"the request headers are more than {lim.max_header_bytes} "
                        "bytes (http.max_header_bytes)",
                        code="request_header_fields_too_large"))
            super().data_received(data)
            if awaiting and self.cycle is not before:  # the headers are complete
                self._ps_disarm()

    GuardedHTTPProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedHTTPProtocol


def install_uvicorn_guards(lim: Limits) -> bool:
    """Make uvicorn's default HTTP protocol the guarded one (idempotent; the latest limits
    win). False if this uvicorn does not have the expected shape (nothing is changed)."""
    try:
        from uvicorn.protocols.http import auto

        base = getattr(auto.AutoHTTPProtocol, "packserve_base", auto.AutoHTTPProtocol)
        for name in ("connection_made", "connection_lost", "data_received"):
            getattr(base, name)
        guarded = guarded_protocol(base, lim)
        guarded.packserve_base = base
        auto.AutoHTTPProtocol = guarded
        return True
    except Exception:  # noqa: BLE001
        logger.warning("uvicorn guards not installed (unexpected uvicorn)", exc_info=True)
        return False


def proxy_callback() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: run in Serve's proxy actor before
    its uvicorn starts; installs the guards with the limits ``packserve serve`` put in the
    environment. Returns no middleware."""
    lim = Limits.from_env()
    if lim is not None:
        install_uvicorn_guards(lim)
    return []
