"""One request's clock at the ingress, and the ASGI middleware that records it.

``RequestMetrics`` (outermost middleware of the ingress app) starts a ``RequestTimer``
for every request to an OpenAI endpoint, sees the status code the response starts with
(401, 413 and invalid bodies included: they never reach a route), and records the
request through ``IngressMetrics`` once the last byte is sent (or the client left). The
route names the model, ``OpenAIService`` marks dispatch and tokens:

| mark        | when                                                                  |
|-------------|-----------------------------------------------------------------------|
| arrival     | the middleware sees the request                                       |
| dispatch    | the first call to a replica (after admission)                         |
| first token | streamed: the first delta; non-streamed: the replica's whole answer   |
| end         | the response's last byte is sent                                      |

A client that leaves before the response starts is recorded as 499 (nginx's "client
closed request"), never as a server error. TTFT = first token - arrival; TPOT = (end - first token) / (generated - 1), streamed
requests only (a non-streamed answer arrives whole: no time between its tokens);
e2e = end - arrival, successful requests only (a 429 answered in a millisecond is not
a latency); queue wait = dispatch - arrival. Recording never raises into a request: a
failing metric is logged once and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.http.routes import ENDPOINTS

logger = logging.getLogger("ray.serve")

CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before an answer
UNKNOWN_MODEL = "unknown"  # the body did not parse, or named a model that is not served
_SCOPE_KEY = "packserve.timer"
_RECORDER: dict = {"metrics": None, "failed": False}  # per ingress process


def set_recorder(metrics) -> None:
    """This process's ``IngressMetrics`` (None: time nothing)."""
    _RECORDER["metrics"] = metrics


class RequestTimer:
    """Marks of one request (table in the module docstring); ``perf_counter`` seconds."""

    __slots__ = ("arrival", "dispatch", "endpoint", "first", "lora", "model",
                 "num_generated", "status", "streamed")

    def __init__(self, endpoint: str):
        self.endpoint, self.model, self.status = endpoint, UNKNOWN_MODEL, 500
        self.lora: str | None = None  # the LoRA adapter the request named
        self.arrival = time.perf_counter()
        self.dispatch: float | None = None
        self.first: float | None = None
        self.num_generated, self.streamed = 0, False

    def dispatched(self) -> None:
        if self.dispatch is None:
            self.dispatch = time.perf_counter()

    def delta(self, num_tokens: int) -> None:
        """A streamed delta (runs once per delta)."""
        if self.first is None and num_tokens:
            self.first = time.perf_counter()
        self.num_generated += num_tokens
        self.streamed = True

    def generated(self, num_tokens: int) -> None:
        """A non-streamed generation's answer came back."""
        self.first = time.perf_counter()
        self.num_generated = num_tokens

    def finish(self) -> None:
        """Record the request (once, from the middleware)."""
        metrics = _RECORDER["metrics"]
        if metrics is None:
            return
        end = time.perf_counter()
        ok = 200 <= self.status < 300
        ttft = self.first - self.arrival if ok and self.first is not None else None
        tpot = ((end - self.first) / (self.num_generated - 1)
                if ttft is not None and self.streamed and self.num_generated > 1 else None)
        try:
            metrics.observe_request(self.model, self.endpoint, self.status, ttft_s=ttft,
                                    tpot_s=tpot, e2e_s=end - self.arrival if ok else None)
            if self.dispatch is not None:
                metrics.observe_queue_wait(self.model, self.dispatch - self.arrival)
            if self.lora is not None:
                metrics.observe_lora(self.model, self.lora, self.status,
                                     self.num_generated if ok else 0)
        except Exception:  # metrics never fail a request
            if not _RECORDER["failed"]:
                _RECORDER["failed"] = True
                logger.exception("recording request metrics failed (logged once)")


class _Untimed(RequestTimer):
    """The timer of a request nobody records (no middleware, or metrics off)."""

    def __init__(self):
        super().__init__("")

    def dispatched(self) -> None:
        pass

    def delta(self, num_tokens: int) -> None:
        pass

    def generated(self, num_tokens: int) -> None:
        pass


UNTIMED = _Untimed()


def timer(scope: Scope, model: str, served, lora: str | None = None) -> RequestTimer:
    """The request's timer, labelled with ``model`` when it is one of ``served`` (and
    with its adapter ``lora``, if it names one)."""
    t = scope.get(_SCOPE_KEY, UNTIMED)
    if t is not UNTIMED and model in served:
        t.model, t.lora = model, lora
    return t


class RequestMetrics:
    """ASGI middleware: a ``RequestTimer`` per OpenAI-endpoint request, recorded when
    the response ends (see module docstring)."""

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http" and _RECORDER["metrics"] is not None:
            path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
            endpoint = ENDPOINTS.get(path)
        if endpoint is None:
            try:
                return await self.inner(scope, receive, send)
            except ClientLeft:
                return
        t = RequestTimer(endpoint)
        scope[_SCOPE_KEY] = t  # the scope is this request's own dict, down to the route

        started = False

        async def timed_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                t.status, started = message["status"], True
            await send(message)

        try:
            await self.inner(scope, receive, timed_send)
        except ClientLeft:
            t.status = CLIENT_CLOSED
        except asyncio.CancelledError:  # Serve cancels a request whose client left
            if not started:
                t.status = CLIENT_CLOSED
            raise
        finally:
            t.finish()


class ClientLeft(Exception):
    """The client disconnected before the request was read; there is no one to answer."""
