"""A Ray Serve request router that sends each request to the replica with the most free
token capacity, instead of Serve's default power-of-two choice by request counts.

Why tokens: a replica running four 4,000-token prompts is busier than one running forty
20-token ones; request counts say the opposite. Each replica's ``record_routing_stats``
reports ``capacity_tokens`` and ``used_tokens`` every ``stats_period_s``. Between two
reports the router also counts the tokens it has itself sent to each replica and not
yet seen complete, and takes the larger of the two as the replica's use, so a burst
does not all land on the replica that looked emptiest half a second ago.

Cost: one pass over the tentative charges per choice (a burst's size, pruned after
``TENTATIVE_S``) and a sort of the candidates (one per replica of the model).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


def request_tokens(pending: PendingRequest | None) -> int:
    """Tokens a request will hold: its ``Work``'s ``num_tokens`` (0 when unknown)."""
    if pending is None or not pending.args:
        return 0
    return int(getattr(pending.args[0], "num_tokens", 0))


def free_tokens(stats: dict, local_used: int) -> int:
    """Free capacity of a replica from its last report and this router's own count."""
    capacity = int(stats.get("capacity_tokens", 0))
    return capacity - max(int(stats.get("used_tokens", 0)), local_used)


class FreeBudgetRouter(FIFOMixin, RequestRouter):
    """Rank replicas by free token capacity, most free first (ties at random).

    Serve reports a request as routed only once the replica accepted it, so a burst of
    choices would all see the same numbers: the top choice is charged tentatively at
    choice time, and the charge moves to the replica that accepted (or lapses after
    ``TENTATIVE_S`` if the request never went out)."""

    TENTATIVE_S = 5.0

    def initialize_state(self, **kwargs) -> None:
        self._local_used: dict[ReplicaID, int] = defaultdict(int)  # accepted, not completed
        self._in_flight: dict[str, tuple[ReplicaID, int]] = {}  # request id -> (replica, tokens)
        self._tentative: dict[str, tuple[ReplicaID, int, float]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        charged = self._tentative_use()

        def free(replica: RunningReplica) -> tuple[int, float]:
            rid = replica.replica_id
            used = self._local_used[rid] + charged.get(rid, 0)
            return free_tokens(replica.routing_stats or {}, used), random.random()

        ranked = sorted(candidate_replicas, key=free, reverse=True)
        if pending_request is not None:
            self._tentative[pending_request.metadata.internal_request_id] = (
                ranked[0].replica_id, request_tokens(pending_request), time.monotonic())
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        request_id = pending_request.metadata.internal_request_id
        self._tentative.pop(request_id, None)
        tokens = request_tokens(pending_request)
        self._in_flight[request_id] = (replica_id, tokens)
        self._local_used[replica_id] += tokens

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._tentative.pop(internal_request_id, None)
        entry = self._in_flight.pop(internal_request_id, None)
        if entry is not None:
            self._local_used[entry[0]] -= entry[1]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._local_used.pop(replica_id, None)
        for request_id in [r for r, (rep, _) in self._in_flight.items() if rep == replica_id]:
            del self._in_flight[request_id]

    def _tentative_use(self) -> dict[ReplicaID, int]:
        """Tokens charged to each replica by choices not yet accepted (stale ones dropped)."""
        now, use = time.monotonic(), defaultdict(int)
        for request_id, (rid, tokens, t) in list(self._tentative.items()):
            if now - t > self.TENTATIVE_S:
                del self._tentative[request_id]
            else:
                use[rid] += tokens
        return use
