"""The ingress's end of admission: reserve a lease, hold it while the request runs,
release it exactly once.

A ``Lease`` is released explicitly when its request ends; as a safety net it is also
released when it is garbage-collected unreleased (a streaming response that the server
dropped before it started iterating never runs its ``finally``). Calls to the
controller are tasks in a context of their own, so they survive the request's
cancellation (see ``_detached``).

With ``admission.max_wait_s = 0`` (the default) the client talks to the controller in
*exchanges*: every operation (reserve, grant, release) waits in one queue, and one call
at a time carries all of them in order (``AdmissionController.exchange``), so a burst
costs one round trip per batch, not per request, with no timer: alone, an operation
leaves at once. And far from capacity a request costs no round trip at all:

| pool, as last seen (every exchange and every heartbeat)  | reserve                     |
|-----------------------------------------------------------|-----------------------------|
| reserved + granted since + tokens <= LOCAL_SHARE x capacity / holders | granted here; the grant is booked by the next exchange |
| else                                                      | an exchange decides         |

Near capacity the same view refuses without asking: when the pool as last seen (at
most ``heartbeat_s`` ago; every exchange refreshes it) is short of room for a request,
the 429 is answered at once, with the Retry-After the controller's schedule in the view
names (``AdmissionLedger.view``), and counted by the next exchange. So a flood of
refusals costs the controller nothing and the client no round trip. A release follows
its grant in the same queue, so the controller never sees one before the other. With
``max_wait_s > 0`` the controller queues callers, so each reservation is a call of its
own and nothing is granted or refused locally.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import time
from dataclasses import dataclass

from deployments.http.errors import APIError, bad_request, overloaded, unavailable
from deployments.admission.ledger import Ask, Decision, Verdict

logger = logging.getLogger("ray.serve")

LOCAL_SHARE = 0.5  # of the pool an ingress may grant without asking (split among ingresses)


@dataclass(frozen=True)
class PoolView:
    """A model's pool as the controller last told this ingress."""

    reserved: int
    capacity: int
    largest: int
    num_holders: int
    ends: tuple  # ((tokens freed, seconds from ``at``), ...): when room frees, as estimated
    at: float  # time.monotonic() when received


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

    def __init__(self, handle, holder: str, heartbeat_s: float, enabled: bool = True,
                 batch: bool = True, retry_after_s: tuple[int, int] = (1, 30)):
        self.handle, self.holder, self.heartbeat_s = handle, holder, heartbeat_s
        self.retry_after_s = retry_after_s  # (min, max), as the controller clamps them
        self.enabled = enabled and handle is not None
        self.batch = batch  # False when the controller may queue a reservation (max_wait_s)
        self.views: dict[str, PoolView] = {}
        self._granted: dict[str, int] = {}  # model -> tokens granted here, not yet booked
        self._ops: list[tuple] = []  # waiting for the next exchange, in order
        self._futures: list[asyncio.Future | None] = []  # one per op (reserves only)
        self._sending = False
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat: asyncio.Task | None = None

    async def reserve(self, model: str, ask: Ask | int, *, clamp: bool = False,
                      what: str = "this request") -> Lease:
        """A lease for ``ask`` (a generation's, from ``LeaseRule.ask``; or a fixed
        number of tokens), or raise the ``APIError`` the client should see."""
        if not isinstance(ask, Ask):
            ask = Ask(ask, clamp=clamp)
        if not self.enabled:
            return Lease(self, None, ask.tokens)
        self._start()
        if not self.batch:
            decision = await self.handle.reserve.remote(model, ask, self.holder)
        elif (lease := self._grant_here(model, ask)) is not None:
            return lease
        elif (refused := self._refuse_here(model, ask)) is not None:
            self._send(("refused", model), None)
            raise refusal(refused, model, ask, what)
        else:
            future = self._loop.create_future()
            self._send(("reserve", model, ask), future)
            decision = await future
        if decision.verdict is Verdict.ADMITTED:
            return Lease(self, decision.lease_id, ask.tokens)
        raise refusal(decision, model, ask, what)

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
        """Send the release (the caller does not wait)."""
        if self.batch:
            self._send(("release", lease_id), None)
        else:
            self._track(_detached(asyncio.get_running_loop(), self._release_alone(lease_id)))

    def release_threadsafe(self, lease_id: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.release, lease_id, context=contextvars.Context())
            except RuntimeError:  # the loop closed meanwhile: the holder timeout reclaims it
                pass

    # ---- internals ------------------------------------------------------------------

    def _grant_here(self, model: str, ask: Ask) -> Lease | None:
        """A lease granted without asking, when the pool is far from full (table above)."""
        view = self.views.get(model)
        if view is None or time.monotonic() - view.at > 2 * self.heartbeat_s:
            return None
        tokens, granted = ask.tokens, self._granted.get(model, 0)
        share = LOCAL_SHARE * view.capacity / max(1, view.num_holders)
        if max(tokens, ask.ceiling) > view.largest or view.reserved + granted + tokens > share:
            return None
        lease_id = f"{self.holder}:local-{next(self._ids)}"
        self._granted[model] = granted + tokens
        self._send(("grant", model, ask, lease_id), None)
        return Lease(self, lease_id, tokens)

    def _refuse_here(self, model: str, ask: Ask) -> Decision | None:
        """A refusal without asking, when the pool as last seen has no room (the module
        docstring); None: the controller decides."""
        view = self.views.get(model)
        age = time.monotonic() - view.at if view is not None else math.inf
        if age > self.heartbeat_s or not view.ends or max(ask.tokens, ask.ceiling) > view.largest:
            return None
        deficit = view.reserved + self._granted.get(model, 0) + ask.tokens - view.capacity
        if deficit <= 0:
            return None
        lo, hi = self.retry_after_s
        seconds = next((s for freed, s in view.ends if freed >= deficit), None)
        if seconds is None:
            return None  # not even every lease ending makes room: the controller decides
        retry = max(lo, min(hi, math.ceil(seconds - age)))
        return Decision(Verdict.CAPACITY, retry_after_s=retry, capacity=view.capacity,
                        largest=view.largest)

    def _send(self, op: tuple, future: asyncio.Future | None) -> None:
        self._ops.append(op)
        self._futures.append(future)
        if not self._sending:
            self._sending = True
            self._track(_detached(asyncio.get_running_loop(), self._exchange_forever()))

    async def _exchange_forever(self) -> None:
        try:
            while self._ops:
                ops, futures = self._ops, self._futures
                self._ops, self._futures = [], []
                try:
                    decisions, views = await self.handle.exchange.remote(ops, self.holder)
                except Exception as exc:  # noqa: BLE001 - reserves fail; grants/releases expire
                    logger.warning("admission exchange of %d operations failed: %s",
                                   len(ops), exc)
                    for future in futures:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                    decisions, views = [None] * len(ops), {}
                for op, future, decision in zip(ops, futures, decisions):
                    if op[0] == "grant":
                        self._granted[op[1]] -= op[2].tokens  # booked: in the views' reserved
                    elif future is not None and not future.done():
                        future.set_result(decision)
                    elif decision is not None and decision.verdict is Verdict.ADMITTED:
                        self.release(decision.lease_id)  # its request left meanwhile
                self._update_views(views)
        finally:
            self._sending = False

    def _update_views(self, views: dict) -> None:
        now = time.monotonic()
        for model, (reserved, capacity, largest, holders, ends) in views.items():
            self.views[model] = PoolView(reserved, capacity, largest, holders, ends, now)

    async def _release_alone(self, lease_id: str) -> None:
        try:
            await self.handle.release.remote([lease_id])
        except Exception as exc:  # noqa: BLE001 - the controller reclaims it by timeout
            logger.warning("releasing lease %s failed: %s", lease_id, exc)

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start(self) -> None:
        if self._heartbeat is None:
            self._loop = asyncio.get_running_loop()
            self._heartbeat = _detached(self._loop, self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            try:
                self._update_views(await self.handle.holder_report.remote(self.holder))
            except Exception as exc:  # noqa: BLE001 - keep reporting; it restarts
                logger.warning("admission holder report failed: %s", exc)
            await asyncio.sleep(self.heartbeat_s)


def _detached(loop: asyncio.AbstractEventLoop, coro) -> asyncio.Task:
    """A task outside the current request's context. Serve cancels the handle calls a
    request made when that request is cancelled (a client that left): a release or a
    heartbeat sent from its context would be cancelled with it, and the lease leaked."""
    return loop.create_task(coro, context=contextvars.Context())


def refusal(decision: Decision, model: str, ask: Ask, what: str) -> APIError:
    v = decision.verdict
    if v is Verdict.TOO_LARGE:
        return bad_request(
            f"{what} needs up to {max(ask.tokens, ask.ceiling)} tokens, more than one replica "
            f"of {model!r} can hold ({decision.largest} tokens: its measured capacity, see GET "
            "/v1/models); shorten the prompt or lower max_tokens")
    if v is Verdict.NO_REPLICAS:
        return unavailable(f"no replica of {model!r} is ready yet", decision.retry_after_s)
    return overloaded(
        f"{model!r} is at capacity: {what} needs {ask.tokens} tokens to start and the "
        f"replicas' {decision.capacity} tokens are in use ({v.value}); retry after "
        f"{decision.retry_after_s} s", decision.retry_after_s or 1)
