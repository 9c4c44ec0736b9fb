"""The drain on stop: the ingress's requests in flight, and ending them in time.

``Guard`` (``deployments/http/guards.py``) counts each request it lets through in
``DRAIN``, this process's ``Drain``. Once a drain begins the guard refuses new requests
(503 + Retry-After; ``/health``: 503 ``{"status": "draining"}``); ``Drain`` waits for the
count to reach zero and, at its deadline, ends what is left: a started event stream gets a
last ``data: {"error": ...}`` event and ``data: [DONE]`` (never a cut body), a request
not answered yet a 503.

Two triggers begin it, both polled by ``watch_for_drain`` (started by the guard's
``configure``): the internal-KV key ``packserve serve`` sets (``drain_key``,
``deployments/app/drain.py``), and Serve beginning this replica's graceful shutdown
(``_replica_stopping``). While draining, each replica publishes its in-flight count
(``in_flight_key``) for the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from starlette.types import Message, Send

from deployments.http.client_limits import error_body, limits

logger = logging.getLogger("ray.serve")

DRAIN_KV_NAMESPACE = "packserve"
DRAIN_POLL_S = 0.5
RETRY_AFTER_DRAINING_S = 1


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
