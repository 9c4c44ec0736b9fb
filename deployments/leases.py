"""The ingress's end of admission: reserve a lease, hold it while the request runs,
release it exactly once.

A ``Lease`` is released explicitly when its request ends; as a safety net it is also
released when it is garbage-collected unreleased (a streaming response that the server
dropped before it started iterating never runs its ``finally``). Releases are sent as
tasks the caller does not wait for, in a context of their own, so they survive the
request's cancellation (see ``_detached``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from deployments.errors import APIError, bad_request, overloaded, unavailable
from deployments.ledger import Decision, Verdict

logger = logging.getLogger("ray.serve")


class Lease:
    def __init__(self, client: AdmissionClient, lease_id: str | None, tokens: int):
        self.client, self.lease_id, self.tokens = client, lease_id, tokens
        self.released = lease_id is None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client.release(self.lease_id)

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            self.client.release_threadsafe(self.lease_id)


class AdmissionClient:
    """Talks to the admission controller on behalf of one ingress replica (the holder)."""

    def __init__(self, handle, holder: str, heartbeat_s: float, enabled: bool = True):
        self.handle, self.holder, self.heartbeat_s = handle, holder, heartbeat_s
        self.enabled = enabled and handle is not None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat: asyncio.Task | None = None

    async def reserve(self, model: str, tokens: int, *, clamp: bool = False,
                      what: str = "this request") -> Lease:
        """A lease for ``tokens``, or raise the ``APIError`` the client should see."""
        if not self.enabled:
            return Lease(self, None, tokens)
        self._start()
        decision: Decision = await self.handle.reserve.remote(model, tokens, self.holder, clamp)
        if decision.verdict is Verdict.ADMITTED:
            return Lease(self, decision.lease_id, tokens)
        raise refusal(decision, model, tokens, what)

    async def reserve_waiting(self, model: str, tokens: int, timeout_s: float) -> Lease:
        """``reserve``, retrying while the pool is full (after each Retry-After, capped at
        a second) for up to ``timeout_s``: for the later parts of a request that was
        already admitted, which should finish rather than fail half done."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                return await self.reserve(model, tokens, clamp=True)
            except APIError as err:
                left = deadline - asyncio.get_running_loop().time()
                if err.status != 429 or left <= 0:
                    raise
                await asyncio.sleep(min(err.retry_after_s or 1.0, 1.0, left))

    def release(self, lease_id: str) -> None:
        task = _detached(asyncio.get_running_loop(), self._send_release(lease_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_threadsafe(self, lease_id: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.release, lease_id, context=contextvars.Context())
            except RuntimeError:  # the loop closed meanwhile: the holder timeout reclaims it
                pass

    async def _send_release(self, lease_id: str) -> None:
        try:
            await self.handle.release.remote([lease_id])
        except Exception as exc:  # noqa: BLE001 - the controller reclaims it by timeout
            logger.warning("releasing lease %s failed: %s", lease_id, exc)

    def _start(self) -> None:
        if self._heartbeat is None:
            self._loop = asyncio.get_running_loop()
            self._heartbeat = _detached(self._loop, self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.handle.holder_report.remote(self.holder)
            except Exception as exc:  # noqa: BLE001 - keep reporting; it restarts
                logger.warning("admission holder report failed: %s", exc)
            await asyncio.sleep(self.heartbeat_s)


def _detached(loop: asyncio.AbstractEventLoop, coro) -> asyncio.Task:
    """A task outside the current request's context. Serve cancels the handle calls a
    request made when that request is cancelled (a client that left): a release or a
    heartbeat sent from its context would be cancelled with it, and the lease leaked."""
    return loop.create_task(coro, context=contextvars.Context())


def refusal(decision: Decision, model: str, tokens: int, what: str) -> APIError:
    v = decision.verdict
    if v is Verdict.TOO_LARGE:
        return bad_request(
            f"{what} needs {tokens} tokens, more than one replica of {model!r} can hold "
            f"({decision.largest} tokens: its measured capacity, see GET /v1/models); "
            "shorten the prompt or lower max_tokens")
    if v is Verdict.NO_REPLICAS:
        return unavailable(f"no replica of {model!r} is ready yet", decision.retry_after_s)
    return overloaded(
        f"{model!r} is at capacity: {what} needs {tokens} tokens and the replicas' "
        f"{decision.capacity} tokens are reserved ({v.value}); retry after "
        f"{decision.retry_after_s} s", decision.retry_after_s or 1)
