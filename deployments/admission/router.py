"""Ray Serve request routers: by free token capacity (``FreeBudgetRouter``), and by
prefix affinity within a free-budget bound (``PrefixAwareRouter``), instead of Serve's
default power-of-two choice by request counts.

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
from collections import OrderedDict, defaultdict

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


def request_lora(pending: PendingRequest | None) -> str | None:
    """The LoRA adapter a request runs with (None: the base model, or not a generation)."""
    if pending is None or not pending.args:
        return None
    return getattr(pending.args[0], "lora", None)


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


# ---- prefix affinity ------------------------------------------------------------------

PREFIX_CHUNK = 16  # tokens per hashed unit of a prompt (the engines' default KV block)


def prefix_chunks(token_ids, chunk: int = PREFIX_CHUNK, salt: str | None = None) -> list[int]:
    """Chained hashes of a prompt's full ``chunk``-token pieces: equal hashes at position
    i mean equal first ``(i + 1) * chunk`` tokens (up to Python hash collisions, which
    only cost a routing choice, never a wrong answer: engines check their own cache).
    ``salt``: the request's LoRA adapter (its KV is its own, as in the engines' cache)."""
    out, parent = [], 0 if salt is None else hash(("lora", salt))
    for i in range(len(token_ids) // chunk):  # per full chunk of the prompt
        parent = hash((parent, tuple(token_ids[i * chunk: (i + 1) * chunk])))
        out.append(parent)
    return out


class PrefixIndex:
    """Per replica, the prompt chunks recently routed there: an LRU of chained hashes,
    at most ``max_entries``, each forgotten ``ttl_s`` after it was last routed."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._seen: OrderedDict[int, float] = OrderedDict()  # hash -> last routed

    def __len__(self) -> int:
        return len(self._seen)

    def match(self, chunks: list[int], now: float) -> int:
        """How many leading ``chunks`` were routed here within the TTL."""
        n = 0
        for h in chunks:  # per matching chunk
            t = self._seen.get(h)
            if t is None or now - t > self.ttl_s:
                break
            n += 1
        return n

    def add(self, chunks: list[int], now: float) -> None:
        for h in chunks:  # per chunk of the routed prompt
            self._seen[h] = now
            self._seen.move_to_end(h)
        while self._seen and (len(self._seen) > self.max_entries
                              or now - next(iter(self._seen.values())) > self.ttl_s):
            self._seen.popitem(last=False)


class PrefixAwareRouter(FreeBudgetRouter):
    """The replica whose engine most likely holds the request's adapter and prefix, unless
    it is too busy.

    - A LoRA adapter's request: among replicas that hold the adapter (in their last
      report's ``loras``, or routed it within ``ttl_s``), the one with the longest
      matching prefix (ties: most free tokens) is chosen when its free tokens are at least
      ``lora_min_free_fraction`` of the most free replica's. An adapter therefore stays on
      the replicas that loaded it (no reload, and its prefix cache) until they fill up,
      then spreads, by free tokens, to one that loads it too.
    - Otherwise, or when no holder is free enough: among replicas with the longest
      matching prefix, the first is chosen when its free tokens are at least
      ``min_free_fraction`` of the most free replica's; a hot prefix stays on one replica
      until it fills up, then spreads to the next one, whose index learns it too.
    - Else by free tokens (``FreeBudgetRouter``)."""

    def initialize_state(self, min_free_fraction: float = 0.5, ttl_s: float = 600.0,
                         max_entries: int = 100_000, lora_min_free_fraction: float = 0.5,
                         **kwargs) -> None:
        super().initialize_state(**kwargs)
        self.min_free_fraction, self.lora_min_free_fraction = (min_free_fraction,
                                                               lora_min_free_fraction)
        self.ttl_s = ttl_s
        self._indexes: dict[ReplicaID, PrefixIndex] = defaultdict(
            lambda: PrefixIndex(max_entries, ttl_s))
        self._loras: dict[ReplicaID, dict[str, float]] = defaultdict(dict)  # adapter -> routed

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        ranked = await super().choose_replicas(candidate_replicas, pending_request)
        lora = request_lora(pending_request)
        chunks = self._request_chunks(pending_request)
        if not ranked or not (chunks or lora):
            return ranked
        now, charged = time.monotonic(), self._tentative_use()
        by_free = [r[0] for r in ranked]

        def free(replica: RunningReplica) -> int:
            rid = replica.replica_id
            return free_tokens(replica.routing_stats or {},
                               self._local_used[rid] + charged.get(rid, 0))

        matches = {r.replica_id: self._indexes[r.replica_id].match(chunks, now) for r in by_free}
        top_free = max(0, free(by_free[0]))
        best = None
        holders = [r for r in by_free if lora and self._holds(r, lora, now)]
        if holders:
            first = max(holders, key=lambda r: (matches[r.replica_id], free(r)))
            if free(first) >= self.lora_min_free_fraction * top_free:
                best = first
        if best is None and chunks:
            first = max(by_free, key=lambda r: (matches[r.replica_id], free(r)))
            if matches[first.replica_id] and free(first) >= self.min_free_fraction * top_free:
                best = first
        if best is not None:
            by_free.remove(best)
            by_free.insert(0, best)
            if pending_request is not None:  # the tentative charge follows the choice
                request_id = pending_request.metadata.internal_request_id
                _, tokens, t = self._tentative[request_id]
                self._tentative[request_id] = (best.replica_id, tokens, t)
        self._learn(by_free[0].replica_id, chunks, lora, now)
        return [[replica] for replica in by_free]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        # where it really went (Serve may have tried the next choice)
        self._learn(replica_id, self._request_chunks(pending_request),
                    request_lora(pending_request), time.monotonic())

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._indexes.pop(replica_id, None)
        self._loras.pop(replica_id, None)

    def _holds(self, replica: RunningReplica, lora: str, now: float) -> bool:
        """Whether ``replica`` has ``lora`` resident (its report) or was sent it lately."""
        if lora in (replica.routing_stats or {}).get("loras", ()):
            return True
        routed = self._loras[replica.replica_id].get(lora)
        return routed is not None and now - routed <= self.ttl_s

    def _learn(self, replica_id: ReplicaID, chunks: list[int], lora: str | None,
               now: float) -> None:
        if chunks:
            self._indexes[replica_id].add(chunks, now)
        if lora:
            seen = self._loras[replica_id]
            seen[lora] = now
            if len(seen) > 1024:  # adapters routed here: keep the most recent
                for name in sorted(seen, key=seen.get)[: len(seen) - 1024]:
                    del seen[name]

    @staticmethod
    def _request_chunks(pending: PendingRequest | None) -> list[int]:
        """The prompt's chunk hashes, salted by its adapter (none for embeddings and
        scoring)."""
        if pending is None or not pending.args:
            return []
        ids = getattr(pending.args[0], "prompt_token_ids", None)
        return prefix_chunks(ids, salt=request_lora(pending)) if ids else []
