"""The admission ledger: token leases against the replicas' measured capacity.

Pure bookkeeping (no Ray, no clock of its own: every call takes ``now``), so the rules
are unit-tested directly; ``deployments/admission/controller.py`` wraps it in the one controller
replica of the cluster.

Per model, a pool: the replicas that reported in (each with its measured capacity in
tokens) and the leases granted against their sum. A lease is one request's tokens. A
generation lease follows use (``LeaseRule``): it starts at the prompt plus a first
allotment of output tokens and grows, in blocks, as its replica reports the tokens
generated, up to its *ceiling* (prompt + max_tokens, which must fit one replica); growth
is booked even past capacity (the request is running: the engine preempts under KV
pressure, and new reservations wait for room). An embedding or scoring lease is its
inputs, fixed. A lease ends in exactly one of these ways: released (completion, error,
cancellation), reclaimed because the replica that held it stopped reporting, or
reclaimed because the ingress that holds it (its *holder*) stopped reporting. So a crash
anywhere returns the tokens.

| quantity        | meaning                                                      |
|-----------------|--------------------------------------------------------------|
| capacity        | sum over live replicas of capacity_tokens x fraction; a      |
|                 | replica under KV pressure (it preempted or cannot admit      |
|                 | for want of blocks) counts only what it holds: no new room   |
| reserved        | sum of live leases' tokens (as grown)                        |
| largest replica | a lease's ceiling must fit one replica: above it, TOO_LARGE  |

Retry-After (``retry_after``): when the pool is short of ``deficit`` tokens, the live
leases are ordered by when they should end (their expected remaining tokens x their
replica's measured seconds per decode step, slowed by how far the replica's leases
exceed what it holds) and the refusal names the time at which enough of them will have
ended; with no step time measured yet, the drain rate (tokens released per second over
``drain_window_s``); with nothing measured at all (a cold replica), the shortest wait:
the client's next try gets a measured answer, and a 429 costs no engine work. Clamped
to [retry_after_min_s, retry_after_max_s].
"""

from __future__ import annotations

import bisect
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


@dataclass(frozen=True)
class Ask:
    """What a request asks admission for: ``tokens`` now, growing to ``ceiling`` (a
    generation's prompt + max_tokens; 0: fixed at ``tokens``) while it generates up to
    ``max_output`` tokens; ``clamp``: charge a request larger than one replica at one
    replica (embedding lists, packed over several steps) instead of refusing it."""

    tokens: int
    ceiling: int = 0
    max_output: int = 0
    clamp: bool = False


@dataclass(frozen=True)
class LeaseRule:
    """How many tokens a generation lease holds: the prompt plus a first allotment of
    output tokens, then one ``block_tokens`` block ahead of what the request generated,
    never past ``prompt + max_output`` (the ceiling). ``follow_use=False`` is the rule
    before (the ceiling from the start), kept for the side-by-side benchmark
    (benchmarks/admission.py). Constants: docs/decisions.md."""

    first_output_tokens: int = 256
    block_tokens: int = 64
    follow_use: bool = True

    def ask(self, prompt: int, max_output: int) -> Ask:
        """A generation's first lease."""
        return Ask(self.tokens(prompt, max_output), prompt + max_output, max_output)

    def tokens(self, prompt: int, max_output: int, generated: int = 0) -> int:
        if not self.follow_use:
            return prompt + max_output
        ahead = (generated // self.block_tokens + 1) * self.block_tokens
        return prompt + min(max_output, max(self.first_output_tokens, ahead))


@dataclass
class Lease:
    model: str
    tokens: int  # held now (grows with a generation's use, never past the ceiling)
    holder: str  # the ingress replica that reserved it
    replica: str | None = None  # the engine replica that took the request, once known
    ceiling: int = 0  # the most it may grow to (prompt + max_tokens; = tokens if fixed)
    max_output: int = 0  # a generation's max_tokens (0: a fixed lease)
    generated: int = 0  # output tokens so far, as its replica last reported
    reported_at: float | None = None  # when its replica last reported it


@dataclass
class _Replica:
    capacity: int
    last_seen: float
    load: dict = field(default_factory=dict)  # what it last said it holds (for operators)
    held: int = 0  # tokens of the leases it said it serves, as grown
    pressure: bool = False  # it preempted or ran out of KV blocks lately: no new room
    step_s: float | None = None  # its measured seconds per decode step (None: not yet)


@dataclass
class _Pool:
    model: str
    replicas: dict[str, _Replica] = field(default_factory=dict)
    reserved: int = 0
    drained: deque = field(default_factory=deque)  # (time, tokens) released recently
    output_tokens: float | None = None  # mean output length of ended generations (EWMA)
    ends: tuple | None = None  # (built at, end times, tokens freed): see _time_to_free;
    # None after any change to the pool's leases or reports


VIEW_POINTS = 16  # of the Retry-After schedule sent to ingresses with every view
OUTPUT_EWMA = 0.1  # weight of each ended generation in the pool's mean output length


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
                       leases: dict[str, tuple[int, int]] | list[str], now: float,
                       load: dict | None = None) -> None:
        """A replica is alive with this capacity and serves these leases: per lease id,
        (tokens it holds now by the lease rule, output tokens generated so far); a plain
        list of ids reports no growth. ``load``: what the replica holds, for operators;
        its ``kv_pressure`` and ``decode_step_s`` also set the replica's room and pace."""
        pool = self._pool(model)
        load = load or {}
        rep = _Replica(int(capacity_tokens * self.fraction), now, load,
                       pressure=bool(load.get("kv_pressure")),
                       step_s=load.get("decode_step_s") or None)
        pool.replicas[replica] = rep
        pool.ends = None
        uses = leases if isinstance(leases, dict) else dict.fromkeys(leases)
        for lease_id, use in uses.items():
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            lease.replica = replica
            if use is not None:
                tokens, lease.generated = int(use[0]), int(use[1])
                lease.reported_at = now
                grown = min(max(lease.tokens, tokens), max(lease.ceiling, lease.tokens))
                pool.reserved += grown - lease.tokens
                lease.tokens = grown
            rep.held += lease.tokens

    def holder_report(self, holder: str, now: float) -> None:
        self.holders[holder] = now

    # ---- leases ---------------------------------------------------------------------

    def reserve(self, model: str, tokens: int, holder: str, now: float,
                *, clamp: bool = False, ceiling: int | None = None,
                max_output: int = 0) -> Decision:
        """Grant a lease of ``tokens`` or say why not. ``ceiling``: what the lease may
        grow to (a generation's prompt + max_tokens; default ``tokens``): it must fit one
        replica. ``max_output``: a generation's max_tokens (Retry-After reads it).
        ``clamp``: a request larger than one replica is charged at one replica's capacity
        (embedding lists: they are packed over several steps) instead of refused."""
        pool = self._pool(model)
        self.holders[holder] = now
        capacity, largest = self._capacity(pool), self._largest(pool)
        ceiling = max(tokens, ceiling or 0)
        if not pool.replicas:
            return Decision(Verdict.NO_REPLICAS, retry_after_s=self.retry_min)
        if ceiling > largest:
            if not clamp:
                return Decision(Verdict.TOO_LARGE, capacity=capacity, largest=largest)
            tokens = ceiling = largest
        if pool.reserved + tokens > capacity:
            return Decision(Verdict.CAPACITY, retry_after_s=self.retry_after(model, tokens, now),
                            capacity=capacity, largest=largest)
        lease_id = f"{holder}:{next(self._ids)}"
        self.leases[lease_id] = Lease(model, tokens, holder, ceiling=ceiling,
                                      max_output=max_output)
        pool.reserved += tokens
        pool.ends = None
        return Decision(Verdict.ADMITTED, lease_id, capacity=capacity, largest=largest)

    def grant(self, model: str, lease_id: str, tokens: int, holder: str, now: float,
              ceiling: int | None = None, max_output: int = 0) -> None:
        """Book a lease its holder granted itself (within its share of a pool far from
        full, deployments/admission/leases.py): booked as it comes, even past capacity, because
        its request is already running."""
        self.holders[holder] = now
        if lease_id not in self.leases:
            self.leases[lease_id] = Lease(model, tokens, holder,
                                          ceiling=max(tokens, ceiling or 0),
                                          max_output=max_output)
            pool = self._pool(model)
            pool.reserved += tokens
            pool.ends = None

    def view(self, model: str, now: float | None = None) -> tuple:
        """(reserved, capacity, largest replica, holders, ends): what an ingress needs to
        grant, and to refuse without asking (``ends``: ``retry_after``'s schedule as up to
        ``VIEW_POINTS`` (tokens freed, seconds from ``now``) points; empty when not
        measured or without ``now``)."""
        pool = self._pool(model)
        ends = ()
        if now is not None and self._time_to_free(pool, 1, now) is not None:
            at, times, freed = pool.ends
            step = max(1, len(times) // VIEW_POINTS)
            picks = sorted({*range(step - 1, len(times), step), len(times) - 1})
            ends = tuple((freed[i], round(max(0.0, times[i] - (now - at)), 3)) for i in picks)
        return (pool.reserved, self._capacity(pool), self._largest(pool), len(self.holders),
                ends)

    def release(self, lease_id: str, now: float) -> bool:
        """End a lease; False when it already ended (release is idempotent)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        pool = self._pool(lease.model)
        pool.reserved -= lease.tokens
        pool.ends = None
        pool.drained.append((now, lease.tokens))
        if lease.max_output > 0 and lease.reported_at is not None:
            ran = self._final_output(pool, lease, now)
            out = pool.output_tokens
            pool.output_tokens = ran if out is None else out + OUTPUT_EWMA * (ran - out)
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
        """Seconds until ``tokens`` should fit (the module docstring's rule)."""
        pool = self._pool(model)
        while pool.drained and now - pool.drained[0][0] > self.drain_window:
            pool.drained.popleft()
        deficit = pool.reserved + tokens - self._capacity(pool)
        if deficit <= 0:
            return self.retry_min
        eta = self._time_to_free(pool, deficit, now)
        if eta is None:  # no pace measured: the drain rate, else the shortest wait
            rate = sum(t for _, t in pool.drained) / self.drain_window
            eta = deficit / rate if rate > 0 else self.retry_min
        return max(self.retry_min, min(self.retry_max, math.ceil(eta)))

    def _time_to_free(self, pool: _Pool, deficit: int, now: float) -> float | None:
        """Seconds until leases holding ``deficit`` tokens should have ended: each live
        lease ends after its expected remaining output tokens at its replica's pace (one
        token per decode step); None when no replica has measured its pace. The order of
        ends is kept until the pool's leases or reports change, so a flood of refusals
        between two changes costs a bisection each, not a pass over the leases."""
        if pool.ends is None:
            pool.ends = (now, *self._ends(pool, now))
        at, times, freed = pool.ends
        if not times:
            return None
        i = bisect.bisect_left(freed, deficit)
        if i == len(freed):
            return None  # even every live lease ending would not make room: capacity fell
        return max(0.0, times[i] - (now - at))

    def _ends(self, pool: _Pool, now: float) -> tuple[list[float], list[int]]:
        """(seconds until each live lease of the pool ends, ascending; tokens freed by
        then, cumulative); both empty when no replica has measured its pace."""
        paces = {name: r.step_s * max(1.0, r.held / max(1, r.capacity))  # overcommitted:
                 for name, r in pool.replicas.items() if r.step_s}  # not all run at once
        if not paces:
            return [], []
        default_pace = max(paces.values())  # a lease not yet placed: the slowest replica
        ends = []
        for lease in self.leases.values():
            if lease.model != pool.model:
                continue
            pace = paces.get(lease.replica, default_pace)
            since = now - lease.reported_at if lease.reported_at is not None else 0.0
            ends.append((max(0.0, self._expected_left(pool, lease) * pace - since),
                         lease.tokens))
        ends.sort()
        return [t for t, _ in ends], list(itertools.accumulate(n for _, n in ends))

    @staticmethod
    def _final_output(pool: _Pool, lease: Lease, now: float) -> float:
        """A released generation's output length: what its replica last reported, plus
        what it should have generated since at that replica's pace (the report is up to a
        heartbeat old), at most its max_tokens."""
        rep = pool.replicas.get(lease.replica)
        since = (now - lease.reported_at) / rep.step_s if rep is not None and rep.step_s else 0
        return min(lease.max_output, lease.generated + since)

    @staticmethod
    def _expected_left(pool: _Pool, lease: Lease) -> int:
        """Output tokens a lease should still generate: what its max_tokens leaves, or
        what the pool's generations ran on average when that is sooner (but at least as
        many again as it has: a long generation tends to run long). A fixed lease
        (embeddings, scores) ends after one step."""
        if lease.max_output <= 0:
            return 1
        room = max(1, lease.max_output - lease.generated)
        if pool.output_tokens is None:
            return room
        return max(1, min(room, max(int(pool.output_tokens) - lease.generated,
                                    lease.generated)))

    def pool_tokens(self, model: str) -> tuple[int, int]:
        """(reserved, capacity) of ``model``'s pool; O(replicas), for metrics."""
        pool = self._pool(model)
        return pool.reserved, self._capacity(pool)

    def snapshot(self, model: str) -> dict:
        pool = self._pool(model)
        return {"reserved": pool.reserved, "capacity": self._capacity(pool),
                "largest": self._largest(pool), "num_replicas": len(pool.replicas),
                "mean_output_tokens": (round(pool.output_tokens, 1)
                                       if pool.output_tokens is not None else None),
                "num_leases": sum(1 for lease in self.leases.values() if lease.model == model),
                "replicas": {name: {"capacity": r.capacity, **r.load}
                             for name, r in pool.replicas.items()}}

    def _pool(self, model: str) -> _Pool:
        pool = self.pools.get(model)
        if pool is None:
            pool = self.pools[model] = _Pool(model)
        return pool

    @staticmethod
    def _capacity(pool: _Pool) -> int:
        """What the pool may hold: a replica under KV pressure offers no room past what
        its leases hold (one that holds none is not short of KV for them: all of it)."""
        return sum(min(r.capacity, r.held) if r.pressure and r.held else r.capacity
                   for r in pool.replicas.values())

    @staticmethod
    def _largest(pool: _Pool) -> int:
        return max((r.capacity for r in pool.replicas.values()), default=0)
