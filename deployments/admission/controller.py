"""The global admission controller: one Serve replica holding the cluster's ledger.

Every ingress replica asks it for a lease before routing a request, and releases the
lease when the request ends; every engine replica reports its measured capacity, the
leases it is serving with what each holds now (generations grow: ``LeaseRule``), its
pace and its KV pressure each ``heartbeat_s``, and hears back whether the model's
replicas may speculate (``deployments/admission/speculation.py``). A reaper expires
silent replicas and ingresses and reclaims their leases (see
``deployments/admission/ledger.py``). When the pool is full, ``reserve`` either answers
at once (a 429 with Retry-After: when enough leases should have ended) or, with
``max_wait_s > 0``, queues the caller FIFO until room frees or the wait runs out.

Why not Ray's own tools: ``max_queued_requests`` bounds requests per caller, not tokens
cluster-wide; ``CapacityQueue`` counts requests against static per-replica limits.
Neither knows a 4,000-token prompt from a 10-token one (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from ray import serve

from deployments.app.config import AdmissionArgs
from deployments.admission.ledger import AdmissionLedger, Ask, Decision, Verdict
from deployments.admission.speculation import SpeculationSwitch
from deployments.app.metrics import AdmissionMetrics

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, max_ongoing_requests=100_000,
                  ray_actor_options={"num_cpus": 0})
class AdmissionController:
    """Lease tokens against the replicas' measured capacity (one replica, cluster-wide)."""

    def __init__(self, args: dict):
        self.args = AdmissionArgs.model_validate(args)
        a = self.args
        self.ledger = AdmissionLedger(
            capacity_fraction=a.capacity_fraction, retry_after_min_s=a.retry_after_min_s,
            retry_after_max_s=a.retry_after_max_s, drain_window_s=a.drain_window_s,
            replica_timeout_s=a.replica_timeout_s, holder_timeout_s=a.holder_timeout_s)
        self.speculation = SpeculationSwitch(a.speculation_off_utilization,
                                             a.speculation_on_utilization)
        self._waiters: dict[str, deque] = {}  # model -> FIFO of (future, holder, Ask)
        self._reaper: asyncio.Task | None = None
        self.metrics = _admission_metrics()  # None: record nothing
        self._zeroed: set[str] = set()  # models whose counters are exported at 0

    async def reserve(self, model: str, ask: Ask, holder: str) -> Decision:
        """A lease for ``ask`` of ``model``, or the reason there is none."""
        self._start_reaper()
        queue = self._waiters.setdefault(model, deque())
        decision = (Decision(Verdict.CAPACITY) if queue  # FIFO: nobody jumps the waiters
                    else self._reserve(model, ask, holder, time.monotonic()))
        if decision.verdict is Verdict.CAPACITY and self.args.max_wait_s > 0:
            decision = await self._wait(queue, model, ask, holder)
        self._record(model, decision)
        return decision

    async def exchange(self, ops: list[tuple], holder: str
                       ) -> tuple[list[Decision | None], dict[str, tuple]]:
        """An ingress's queued operations, in order (deployments/admission/leases.py):
        ``("reserve", model, ask)`` -> its ``Decision``; ``("grant", model, ask,
        lease_id)`` books a lease the ingress granted itself; ``("refused", model)``
        counts a 429 it answered itself; ``("release", lease_id)``. Returns the
        decisions (None for the others) and every touched pool's ``view``. Never waits:
        ingresses use ``reserve`` when ``max_wait_s > 0``."""
        self._start_reaper()
        now, decisions, models, released = time.monotonic(), [], set(), set()
        for op in ops:
            decision = None
            if op[0] == "reserve":
                _, model, ask = op
                decision = (Decision(Verdict.CAPACITY) if self._waiters.get(model)
                            else self._reserve(model, ask, holder, now))
                if decision.verdict is Verdict.CAPACITY and decision.retry_after_s is None:
                    decision = self._refusal(model, ask.tokens)
                self._record(model, decision, pool=False)
            elif op[0] == "refused":  # an ingress refused it without asking: count it
                model = op[1]
                self._record(model, Decision(Verdict.CAPACITY), pool=False)
            elif op[0] == "grant":
                _, model, ask, lease_id = op
                self.ledger.grant(model, lease_id, ask.tokens, holder, now,
                                  ceiling=ask.ceiling, max_output=ask.max_output)
                self._record(model, Decision(Verdict.ADMITTED, lease_id), pool=False)
            else:
                lease = self.ledger.leases.get(op[1])
                model = lease.model if lease is not None else None
                if self.ledger.release(op[1], now):
                    released.add(model)
            if model is not None:
                models.add(model)
            decisions.append(decision)
        for model in released:
            self._admit_waiters(model)
        for model in models:
            self._record_pool(model)
        return decisions, {m: self.ledger.view(m, now) for m in models}

    async def release(self, lease_ids: list[str]) -> int:
        """End leases (idempotent); returns how many were still live."""
        now = time.monotonic()
        models = {self.ledger.leases[i].model for i in lease_ids if i in self.ledger.leases}
        released = sum(self.ledger.release(i, now) for i in lease_ids)
        for model in models:
            self._admit_waiters(model)
            self._record_pool(model)
        return released

    async def replica_report(self, model: str, replica: str, capacity_tokens: int,
                             leases: dict[str, tuple[int, int]], load: dict | None = None
                             ) -> int | None:
        """A replica is alive: its capacity, and per lease it serves (tokens held by the
        lease rule, tokens generated) — the leases grow here. Returns the speculation
        cap for the model's replicas (0: off, None: no cap; ``SpeculationSwitch``)."""
        self._start_reaper()
        self.ledger.replica_report(model, replica, capacity_tokens, leases, time.monotonic(),
                                   load)
        reserved, capacity = self.ledger.pool_tokens(model)
        if self.speculation.update(model, reserved, capacity):
            logger.info("admission: speculation %s on the replicas of %r (%d of %d tokens "
                        "leased)", "on" if self.speculation.is_on(model) else "off", model,
                        reserved, capacity)
        if model not in self._zeroed and self.metrics is not None:
            self._zeroed.add(model)
            try:
                self.metrics.export_zeros(model)
            except Exception:  # metrics never fail a report
                logger.exception("admission metrics failed")
        self._admit_waiters(model)
        self._record_pool(model)
        return self.speculation.speculation_cap(model)

    async def holder_report(self, holder: str) -> dict[str, tuple]:
        """An ingress is alive; returns every pool's ``view`` (its grants need them)."""
        self.ledger.holder_report(holder, time.monotonic())
        now = time.monotonic()
        return {model: self.ledger.view(model, now) for model in self.ledger.pools}

    async def snapshot(self) -> dict[str, dict]:
        """Per model: reserved, capacity, largest replica, replicas, leases, waiters,
        whether its replicas may speculate."""
        return {model: {**self.ledger.snapshot(model),
                        "num_waiters": len(self._waiters.get(model, ())),
                        "speculation": self.speculation.is_on(model)}
                for model in self.ledger.pools}

    def check_health(self) -> None:
        if self._reaper is not None and self._reaper.done():
            raise RuntimeError(f"admission reaper stopped: {self._reaper.exception()!r}")

    # ---- internals ------------------------------------------------------------------

    def _reserve(self, model: str, ask: Ask, holder: str, now: float) -> Decision:
        return self.ledger.reserve(model, ask.tokens, holder, now, clamp=ask.clamp,
                                   ceiling=ask.ceiling, max_output=ask.max_output)

    async def _wait(self, queue: deque, model: str, ask: Ask, holder: str) -> Decision:
        future = asyncio.get_running_loop().create_future()
        entry = (future, holder, ask)
        queue.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.args.max_wait_s)
        except asyncio.CancelledError:  # the caller left: give back a grant it never saw
            if future.done() and not future.cancelled():
                self.ledger.release(future.result().lease_id, time.monotonic())
            future.cancel()
            raise
        except TimeoutError:
            if future.done() and not future.cancelled():  # admitted as the clock ran out
                return future.result()
            future.cancel()
            refusal = self._refusal(model, ask.tokens)
            return Decision(Verdict.TIMEOUT, retry_after_s=refusal.retry_after_s,
                            capacity=refusal.capacity, largest=refusal.largest)
        finally:
            if entry in queue:
                queue.remove(entry)

    def _admit_waiters(self, model: str) -> None:
        queue = self._waiters.get(model)
        now = time.monotonic()
        while queue:
            future, holder, ask = queue[0]
            if future.done():
                queue.popleft()
                continue
            decision = self._reserve(model, ask, holder, now)
            if decision.verdict is Verdict.CAPACITY:
                return
            queue.popleft()
            future.set_result(decision)

    def _refusal(self, model: str, tokens: int) -> Decision:
        _, capacity, largest, _, _ = self.ledger.view(model)
        return Decision(Verdict.CAPACITY,
                        retry_after_s=self.ledger.retry_after(model, tokens, time.monotonic()),
                        capacity=capacity, largest=largest)

    def _record(self, model: str, decision: Decision, pool: bool = True) -> None:
        """Count one decision and publish the pool after it (never raises)."""
        if self.metrics is None:
            return
        try:
            if decision.verdict is Verdict.ADMITTED:
                self.metrics.admitted(model)
            else:
                self.metrics.rejected(model, decision.verdict.value)
        except Exception:  # metrics never fail a request
            logger.exception("admission metrics failed")
        if pool:
            self._record_pool(model)

    def _record_pool(self, model: str) -> None:
        """Publish the pool's reserved and capacity tokens (never raises)."""
        if self.metrics is None:
            return
        try:
            self.metrics.set_pool(model, *self.ledger.pool_tokens(model))
        except Exception:  # metrics never fail a request
            logger.exception("admission metrics failed")

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_s)
            reclaimed = self.ledger.expire(time.monotonic())
            if reclaimed:
                logger.warning("admission: reclaimed %d leases of silent replicas/ingresses",
                               reclaimed)
            for model in list(self._waiters):
                self._admit_waiters(model)
            for model in list(self.ledger.pools):  # expiry may have dropped replicas
                self._record_pool(model)


def _admission_metrics() -> AdmissionMetrics | None:
    try:
        return AdmissionMetrics()
    except Exception:  # admit without metrics rather than not at all
        logger.exception("admission metrics unavailable")
        return None
