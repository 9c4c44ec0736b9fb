"""The admission ledger: token leases against the replicas' measured capacity.

Pure bookkeeping (no Ray, no clock of its own: every call takes ``now``), so the rules
are unit-tested directly; ``deployments/admission.py`` wraps it in the one controller
replica of the cluster.

Per model, a pool: the replicas that reported in (each with its measured capacity in
tokens) and the leases granted against their sum. A lease is one request's tokens
(prompt + max_tokens, or the inputs of an embedding request). It ends in exactly one
of these ways: released (completion, error, cancellation), reclaimed because the replica
that held it stopped reporting, or reclaimed because the ingress that holds it
(its *holder*) stopped reporting. So a crash anywhere returns the tokens.

| quantity        | meaning                                                    |
|-----------------|------------------------------------------------------------|
| capacity        | sum over live replicas of capacity_tokens x fraction       |
| reserved        | sum of live leases' tokens                                 |
| largest replica | a lease must fit one replica: above it is TOO_LARGE        |
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from dataclasses import dataclass, field


class Verdict(str, enum.Enum):
    ADMITTED = "admitted"
    CAPACITY = "capacity"  # full now: 429, Retry-After
    TOO_LARGE = "too_large"  # can never fit one replica: 400
    NO_REPLICAS = "no_replicas"  # none reported yet (starting, or all dead): 503
    TIMEOUT = "timeout"  # waited max_wait_s without room: 429


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    lease_id: str | None = None  # set when admitted
    retry_after_s: int | None = None  # set on CAPACITY / TIMEOUT / NO_REPLICAS
    capacity: int = 0  # tokens the model's pool holds now
    largest: int = 0  # tokens the largest replica holds (TOO_LARGE names it)


@dataclass
class Lease:
    model: str
    tokens: int
    holder: str  # the ingress replica that reserved it
    replica: str | None = None  # the engine replica that took the request, once known


@dataclass
class _Replica:
    capacity: int
    last_seen: float
    load: dict = field(default_factory=dict)  # what it last said it holds (for operators)


@dataclass
class _Pool:
    replicas: dict[str, _Replica] = field(default_factory=dict)
    reserved: int = 0
    drained: deque = field(default_factory=deque)  # (time, tokens) released recently


class AdmissionLedger:
    """Token leases per model. Not thread-safe: the controller calls it from one loop."""

    def __init__(self, *, capacity_fraction: float = 1.0, retry_after_min_s: int = 1,
                 retry_after_max_s: int = 30, drain_window_s: float = 10.0,
                 replica_timeout_s: float = 5.0, holder_timeout_s: float = 15.0):
        self.fraction = capacity_fraction
        self.retry_min, self.retry_max = retry_after_min_s, retry_after_max_s
        self.drain_window = drain_window_s
        self.replica_timeout, self.holder_timeout = replica_timeout_s, holder_timeout_s
        self.pools: dict[str, _Pool] = {}
        self.leases: dict[str, Lease] = {}
        self.holders: dict[str, float] = {}  # holder -> last seen
        self._ids = itertools.count()

    # ---- reports --------------------------------------------------------------------

    def replica_report(self, model: str, replica: str, capacity_tokens: int,
                       lease_ids: list[str], now: float, load: dict | None = None) -> None:
        """A replica is alive with this capacity and holds these leases."""
        pool = self._pool(model)
        pool.replicas[replica] = _Replica(int(capacity_tokens * self.fraction), now, load or {})
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is not None:
                lease.replica = replica

    def holder_report(self, holder: str, now: float) -> None:
        self.holders[holder] = now

    # ---- leases ---------------------------------------------------------------------

    def reserve(self, model: str, tokens: int, holder: str, now: float,
                *, clamp: bool = False) -> Decision:
        """Grant a lease of ``tokens`` or say why not. ``clamp``: a request larger than
        one replica is charged at one replica's capacity (embedding lists: they are
        packed over several steps) instead of refused."""
        pool = self._pool(model)
        self.holders[holder] = now
        capacity, largest = self._capacity(pool), self._largest(pool)
        if not pool.replicas:
            return Decision(Verdict.NO_REPLICAS, retry_after_s=self.retry_min)
        if tokens > largest:
            if not clamp:
                return Decision(Verdict.TOO_LARGE, capacity=capacity, largest=largest)
            tokens = largest
        if pool.reserved + tokens > capacity:
            return Decision(Verdict.CAPACITY, retry_after_s=self.retry_after(model, tokens, now),
                            capacity=capacity, largest=largest)
        lease_id = f"{holder}:{next(self._ids)}"
        self.leases[lease_id] = Lease(model, tokens, holder)
        pool.reserved += tokens
        return Decision(Verdict.ADMITTED, lease_id, capacity=capacity, largest=largest)

    def grant(self, model: str, lease_id: str, tokens: int, holder: str, now: float) -> None:
        """Book a lease its holder granted itself (within its share of a pool far from
        full, deployments/leases.py): booked as it comes, even past capacity, because
        its request is already running."""
        self.holders[holder] = now
        if lease_id not in self.leases:
            self.leases[lease_id] = Lease(model, tokens, holder)
            self._pool(model).reserved += tokens

    def view(self, model: str) -> tuple[int, int, int, int]:
        """(reserved, capacity, largest replica, holders): what an ingress needs to grant."""
        pool = self._pool(model)
        return pool.reserved, self._capacity(pool), self._largest(pool), len(self.holders)

    def release(self, lease_id: str, now: float) -> bool:
        """End a lease; False when it already ended (release is idempotent)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        pool = self._pool(lease.model)
        pool.reserved -= lease.tokens
        pool.drained.append((now, lease.tokens))
        return True

    def expire(self, now: float) -> int:
        """Drop replicas and holders that stopped reporting; reclaim their leases.
        Returns the number of leases reclaimed."""
        dead_replicas = set()
        for pool in self.pools.values():
            for name, rep in list(pool.replicas.items()):
                if now - rep.last_seen > self.replica_timeout:
                    del pool.replicas[name]
                    dead_replicas.add(name)
        dead_holders = {h for h, seen in self.holders.items()
                        if now - seen > self.holder_timeout}
        for h in dead_holders:
            del self.holders[h]
        doomed = [lid for lid, lease in self.leases.items()
                  if lease.replica in dead_replicas or lease.holder in dead_holders]
        for lease_id in doomed:
            self.release(lease_id, now)
        return len(doomed)

    # ---- reading --------------------------------------------------------------------

    def retry_after(self, model: str, tokens: int, now: float) -> int:
        """Seconds until ``tokens`` should fit, from the pool's recent drain rate."""
        pool = self._pool(model)
        while pool.drained and now - pool.drained[0][0] > self.drain_window:
            pool.drained.popleft()
        deficit = pool.reserved + tokens - self._capacity(pool)
        rate = sum(t for _, t in pool.drained) / self.drain_window
        if deficit <= 0:
            return self.retry_min
        if rate <= 0:
            return self.retry_max
        return max(self.retry_min, min(self.retry_max, math.ceil(deficit / rate)))

    def pool_tokens(self, model: str) -> tuple[int, int]:
        """(reserved, capacity) of ``model``'s pool; O(replicas), for metrics."""
        pool = self._pool(model)
        return pool.reserved, self._capacity(pool)

    def snapshot(self, model: str) -> dict:
        pool = self._pool(model)
        return {"reserved": pool.reserved, "capacity": self._capacity(pool),
                "largest": self._largest(pool), "num_replicas": len(pool.replicas),
                "num_leases": sum(1 for lease in self.leases.values() if lease.model == model),
                "replicas": {name: {"capacity": r.capacity, **r.load}
                             for name, r in pool.replicas.items()}}

    def _pool(self, model: str) -> _Pool:
        pool = self.pools.get(model)
        if pool is None:
            pool = self.pools[model] = _Pool()
        return pool

    @staticmethod
    def _capacity(pool: _Pool) -> int:
        return sum(r.capacity for r in pool.replicas.values())

    @staticmethod
    def _largest(pool: _Pool) -> int:
        return max((r.capacity for r in pool.replicas.values()), default=0)
