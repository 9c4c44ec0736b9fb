"""Every packserve metric, declared once, and the recorders the deployments call.

``METRICS`` is the registry: plain data (name, kind, description, tag keys, histogram
boundaries) that the tests and the dashboard check read without Ray. The metrics are
Ray's (``ray.util.metrics``); the Ray metrics agent on each node serves them to
Prometheus as ``ray_<name>``, counters with ``_total`` appended and histograms as
``_bucket`` / ``_sum`` / ``_count`` (``MetricSpec.exported_names``).

The Ray metric objects are built in a recorder's ``__init__``, which runs inside the
actor that records (importing this module needs neither a running Ray nor torch).
Recorders fix their constant tags once (``set_default_tags``) and keep one prebuilt tag
dict per value of a varying tag, so a call builds no dict of ours.

Tags: ``model`` (the served model's name), ``replica`` (the engine replica's id),
``kind`` (``forward`` for embed/score steps, ``generate`` for generation steps),
``endpoint`` (``chat``, ``completions``, ``embeddings``, ...), ``status`` (the HTTP
status code), ``reason`` (a ``RejectReason``), ``position`` (a speculative token's place
in its proposal, ``0`` .. k-1: accepted / proposed at each position is the acceptance
rate there). ``ray.util.metrics`` rather than
``ray.serve.metrics``: the latter reserves the ``replica`` tag and adds Serve's own tags
only inside Serve replicas, so the same metric would carry different labels in
different processes; here the registry is exactly what Prometheus sees.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine.observe import StepRecord

PREFIX = "packserve_"
RAY_PREFIX = "ray_"  # added by Ray's metrics agent to every application metric


class MetricKind(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class RejectReason(enum.StrEnum):
    """Why the admission controller turned a request away (the ``reason`` tag)."""

    CAPACITY = "capacity"  # the pool is full now: 429 + Retry-After
    TOO_LARGE = "too_large"  # larger than any replica can hold: 400
    TIMEOUT = "timeout"  # waited for room and none came: 429
    NO_REPLICAS = "no_replicas"  # no replica has reported capacity: 503


@dataclass(frozen=True)
class MetricSpec:
    """One metric as declared; ``exported_names`` are the series Prometheus stores."""

    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()  # histograms only: upper bounds, +Inf implied

    @property
    def exported_names(self) -> tuple[str, ...]:
        base = RAY_PREFIX + self.name
        if self.kind is MetricKind.COUNTER:
            return (base + "_total",)
        if self.kind is MetricKind.HISTOGRAM:
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)

    def build(self):
        """The Ray metric object (call inside the process that records)."""
        from ray.util import metrics

        if self.kind is MetricKind.COUNTER:
            return metrics.Counter(self.name, self.description, self.tag_keys)
        if self.kind is MetricKind.GAUGE:
            return metrics.Gauge(self.name, self.description, self.tag_keys)
        return metrics.Histogram(self.name, self.description, list(self.boundaries),
                                 self.tag_keys)


TTFT_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
E2E_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
         300.0)
QUEUE_S = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)
FORWARD_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FILL = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Ray's metrics agent rebuilds a histogram from its bucket counts, each observation at
# its bucket's midpoint (the first bucket's lower bound is 0), so ``_sum`` is approximate.
# Bounds halfway between integers make small bin counts exact (1 bin: (0.5, 1.5] -> 1.0).
BINS = (0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 32.5, 64.5)

_C, _G, _H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM
_REQ, _REP, _STEP = ("model", "endpoint"), ("model", "replica"), ("model", "replica", "kind")

_SPECS = [
    # ingress: one per HTTP request
    MetricSpec("packserve_requests", _C, "Requests answered, by HTTP status code.",
               _REQ + ("status",)),
    MetricSpec("packserve_ttft_seconds", _H, "Time to first token (generation requests).",
               _REQ, TTFT_S),
    MetricSpec("packserve_tpot_seconds", _H, "Time per output token after the first "
               "(generation requests).", _REQ, TPOT_S),
    MetricSpec("packserve_e2e_seconds", _H, "End-to-end request latency at the ingress.",
               _REQ, E2E_S),
    MetricSpec("packserve_queue_wait_seconds", _H, "Wait from arrival at the ingress to "
               "dispatch to a replica (admission included).", ("model",), QUEUE_S),
    MetricSpec("packserve_lora_requests", _C, "Requests of LoRA adapters answered, by "
               "adapter and HTTP status code (adapters past the first "
               "MAX_LORA_LABELS share lora=\"other\").", ("model", "lora", "status")),
    MetricSpec("packserve_lora_generated_tokens", _C, "Tokens generated for LoRA adapters' "
               "answered requests, by adapter.", ("model", "lora")),
    # admission controller: one pool of tokens per model
    MetricSpec("packserve_admission_reserved_tokens", _G, "Tokens leased to requests in "
               "flight.", ("model",)),
    MetricSpec("packserve_admission_capacity_tokens", _G, "Tokens the live replicas "
               "measured they can hold.", ("model",)),
    MetricSpec("packserve_admissions", _C, "Requests admitted (a lease granted).",
               ("model",)),
    MetricSpec("packserve_rejections", _C, "Requests refused admission, by reason.",
               ("model", "reason")),
    # engine replica: per step (worker.engine.observe.StepRecord)
    MetricSpec("packserve_real_tokens", _C, "Tokens computed by forwards (no padding).",
               _STEP),
    MetricSpec("packserve_padding_tokens_avoided", _C, "Padded-equivalent minus real "
               "tokens: what arrival-order padded batches would have wasted.", _STEP),
    MetricSpec("packserve_bin_fill_ratio", _H, "Real tokens / token budget, per bin.", _STEP,
               FILL),
    MetricSpec("packserve_bins_per_step", _H, "Bins (forwards) per engine step.", _STEP,
               BINS),
    MetricSpec("packserve_forward_seconds", _H, "Device time of one bin's forward.", _STEP,
               FORWARD_S),
    MetricSpec("packserve_h2d_bytes", _C, "Bytes staged for host-to-device copies.", _REP),
    MetricSpec("packserve_h2d_seconds", _C, "Device time of host-to-device copies.", _REP),
    MetricSpec("packserve_oom_events", _C, "Forwards that ran out of device memory.", _STEP),
    MetricSpec("packserve_budget_shrinks", _C, "Token budget cuts after out-of-memory "
               "errors.", _STEP),
    MetricSpec("packserve_step_token_budget", _G, "Engine token budget: per bin (forward) "
               "or per step (generate).", _STEP),
    MetricSpec("packserve_token_budget", _G, "Replica token capacity offered to admission.",
               _REP),
    MetricSpec("packserve_free_token_budget", _G, "Replica token capacity not in use.", _REP),
    MetricSpec("packserve_kv_blocks_used", _G, "KV cache blocks held by sequences.", _REP),
    MetricSpec("packserve_kv_blocks_free", _G, "KV cache blocks free.", _REP),
    MetricSpec("packserve_preemptions", _C, "Sequences preempted (recomputed later).", _REP),
    MetricSpec("packserve_prefix_cache_queries", _C, "Prompt tokens of admitted generation "
               "requests, looked up in the prefix cache.", _REP),
    MetricSpec("packserve_prefix_cache_hits", _C, "Prompt tokens whose KV came from the "
               "prefix cache.", _REP),
    MetricSpec("packserve_engine_waiting_requests", _G, "Requests queued in the engine, "
               "not yet running.", _REP),
    MetricSpec("packserve_engine_queue_wait_seconds", _H, "Wait in the engine's queue "
               "until first scheduled.", _STEP, QUEUE_S),
    # engine replica, speculative decoding (StepRecord.spec_*): only replicas that speculate
    MetricSpec("packserve_spec_proposed_tokens", _C, "Speculative tokens proposed and "
               "verified.", _REP),
    MetricSpec("packserve_spec_accepted_tokens", _C, "Speculative tokens accepted (of those "
               "proposed).", _REP),
    MetricSpec("packserve_spec_proposed_tokens_by_position", _C, "Speculative tokens "
               "proposed and verified, by position in the proposal (0: the first).",
               _REP + ("position",)),
    MetricSpec("packserve_spec_accepted_tokens_by_position", _C, "Speculative tokens "
               "accepted, by position in the proposal.", _REP + ("position",)),
    MetricSpec("packserve_spec_k", _G, "Tokens a sequence may propose per step now (the "
               "engine's load rule and the cluster's cap; 0: speculation off).", _REP),
]
METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


def exported_names() -> dict[str, MetricSpec]:
    """Every series name Prometheus stores for our metrics -> its spec."""
    return {name: spec for spec in METRICS.values() for name in spec.exported_names}


def _build(*names: str, **default_tags: str) -> list:
    return [METRICS[n].build().set_default_tags(dict(default_tags)) for n in names]


def export_zero(counter, tags: dict[str, str] | None = None) -> None:
    """Make Prometheus see ``counter``'s series for ``tags`` at 0 before its first event,
    so a panel reads 0, not "No data". ``Counter.inc`` refuses 0; recording 0 through
    ``_record`` (what ``inc`` calls after its check) creates the series and adds nothing."""
    counter._record(0, tags=tags)


class ReplicaMetrics:
    """Engine-replica metrics; ``observe_step`` is an engine step observer (it runs on
    the stepping thread, a few metric calls per bin)."""

    def __init__(self, model: str, replica: str, kinds: tuple[str, ...] = ("forward", "generate"),
                 max_num_spec_tokens: int = 0):
        """``kinds``: the step kinds this replica runs (an encoder never generates); each
        gets its counters exported at 0 now. ``max_num_spec_tokens``: the engine's k when
        it speculates (0: it does not); its speculation counters, every position's
        included, are exported at 0 now."""
        tags = {"model": model, "replica": replica}
        (self._real, self._avoided, self._fill, self._bins, self._forward, self._oom,
         self._shrinks, self._step_budget, self._wait) = _build(
            "packserve_real_tokens", "packserve_padding_tokens_avoided",
            "packserve_bin_fill_ratio", "packserve_bins_per_step",
            "packserve_forward_seconds", "packserve_oom_events", "packserve_budget_shrinks",
            "packserve_step_token_budget", "packserve_engine_queue_wait_seconds", **tags)
        (self._h2d_bytes, self._h2d_seconds, self._budget, self._free, self._kv_used,
         self._kv_free, self._preempt, self._waiting, self._prefix_queries,
         self._prefix_hits) = _build(
            "packserve_h2d_bytes", "packserve_h2d_seconds", "packserve_token_budget",
            "packserve_free_token_budget", "packserve_kv_blocks_used",
            "packserve_kv_blocks_free", "packserve_preemptions",
            "packserve_engine_waiting_requests", "packserve_prefix_cache_queries",
            "packserve_prefix_cache_hits", **tags)
        self._spec = _SpecMetrics(tags, max_num_spec_tokens)
        self._kind_tags = {k: {"kind": k} for k in ("forward", "generate")}
        self._last: dict[str, StepRecord] = {}  # kind -> its latest step (gauge refresh)
        self._latest: StepRecord | None = None
        for kind in kinds:
            for counter in (self._real, self._avoided, self._oom, self._shrinks):
                export_zero(counter, self._kind_tags[kind])
        for counter in (self._h2d_bytes, self._h2d_seconds, self._preempt):
            export_zero(counter)

    def observe_step(self, record: StepRecord) -> None:
        """Record one engine step (``worker.engine.observe.StepRecord``)."""
        tags = self._kind_tags[record.kind]
        if record.num_tokens:
            self._real.inc(record.num_tokens, tags)
        if record.num_padding_avoided:
            self._avoided.inc(record.num_padding_avoided, tags)
        if record.num_bins:
            self._bins.observe(record.num_bins, tags)
        for fill, seconds in zip(record.fill_ratios, record.forward_seconds):  # per bin
            self._fill.observe(fill, tags)
            self._forward.observe(seconds, tags)
        for seconds in record.queue_wait_seconds:  # per request first scheduled
            self._wait.observe(seconds, tags)
        if record.num_oom:
            self._oom.inc(record.num_oom, tags)
        if record.new_token_budget is not None:
            self._shrinks.inc(1, tags)
        if record.h2d_bytes:
            self._h2d_bytes.inc(record.h2d_bytes)
        if record.h2d_seconds > 0:
            self._h2d_seconds.inc(record.h2d_seconds)
        if record.num_preemptions:
            self._preempt.inc(record.num_preemptions)
        if record.num_prefix_queries:
            self._prefix_queries.inc(record.num_prefix_queries)
            if record.num_prefix_hits:
                self._prefix_hits.inc(record.num_prefix_hits)
        if record.spec_proposed or record.spec_k != self._spec.k:  # off: () and 0 == 0
            self._spec.observe(record)
        self._step_budget.set(record.token_budget, tags)
        self._set_engine_gauges(record)
        self._last[record.kind] = self._latest = record

    def set_budget(self, token_budget: int, free_tokens: int) -> None:
        """The replica's token capacity and the part of it not in use. Called every
        heartbeat, it also sets the latest steps' gauges again: Ray drops a gauge that
        was not set within two export intervals, so an idle engine's KV blocks and step
        budgets would vanish from Prometheus."""
        self._budget.set(token_budget)
        self._free.set(free_tokens)
        latest = self._latest
        for record in list(self._last.values()):  # the latest step of each kind
            self._step_budget.set(record.token_budget, self._kind_tags[record.kind])
        if latest is not None:
            self._set_engine_gauges(latest)
        self._spec.refresh()

    def _set_engine_gauges(self, record: StepRecord) -> None:
        self._kv_used.set(record.num_kv_blocks_used)
        self._kv_free.set(record.num_kv_blocks_free)
        self._waiting.set(record.num_waiting)


class _SpecMetrics:
    """A replica's speculative decoding metrics (``StepRecord.spec_*``): built with the
    replica's, but nothing is recorded, not even the k gauge, until a step speculates
    (or the replica says at start that its engine does)."""

    def __init__(self, tags: dict[str, str], max_num_spec_tokens: int):
        (self._proposed, self._accepted, self._proposed_at, self._accepted_at,
         self._k) = _build(
            "packserve_spec_proposed_tokens", "packserve_spec_accepted_tokens",
            "packserve_spec_proposed_tokens_by_position",
            "packserve_spec_accepted_tokens_by_position", "packserve_spec_k", **tags)
        self._positions: list[dict[str, str]] = []  # j -> {"position": "j"}, grown once
        self.k = max_num_spec_tokens  # the latest generation step's spec_k (idle: all k)
        self._seen = max_num_spec_tokens > 0  # export the k gauge (a replica that speculates)
        if self._seen:
            for counter in (self._proposed, self._accepted):
                export_zero(counter)
            for tags_j in self._position_tags(max_num_spec_tokens):
                export_zero(self._proposed_at, tags_j)
                export_zero(self._accepted_at, tags_j)

    def observe(self, record: StepRecord) -> None:
        """A step that verified proposals or changed k (``ReplicaMetrics.observe_step``
        calls it only then)."""
        if record.kind != "generate":  # a forward step (embed, score) says nothing of k
            return
        proposed, accepted = record.spec_proposed, record.spec_accepted
        if proposed:
            num_proposed, num_accepted = sum(proposed), sum(accepted)
            if num_proposed:
                self._proposed.inc(num_proposed)
            if num_accepted:
                self._accepted.inc(num_accepted)
            positions = self._position_tags(len(proposed))
            for tags, p, a in zip(positions, proposed, accepted):  # per position, k <= 16
                if p:
                    self._proposed_at.inc(p, tags)
                if a:
                    self._accepted_at.inc(a, tags)
        self.k, self._seen = record.spec_k, True
        self._k.set(record.spec_k)

    def refresh(self) -> None:
        """Set the k gauge again (heartbeat: Ray drops a gauge not set lately)."""
        if self._seen:
            self._k.set(self.k)

    def _position_tags(self, k: int) -> list[dict[str, str]]:
        while len(self._positions) < k:
            self._positions.append({"position": str(len(self._positions))})
        return self._positions


MAX_LORA_LABELS = 64  # adapters with a label of their own; the others are "other"


class IngressMetrics:
    """Per-request metrics at the ingress (any number of models)."""

    def __init__(self):
        self._requests, self._ttft, self._tpot, self._e2e, self._wait = (
            METRICS[n].build() for n in ("packserve_requests", "packserve_ttft_seconds",
                                         "packserve_tpot_seconds", "packserve_e2e_seconds",
                                         "packserve_queue_wait_seconds"))
        self._lora_requests, self._lora_tokens = (
            METRICS[n].build() for n in ("packserve_lora_requests",
                                         "packserve_lora_generated_tokens"))
        self._tags: dict[tuple, dict[str, str]] = {}  # bounded: models x endpoints x codes
        self._lora_labels: set[str] = set()  # at most MAX_LORA_LABELS

    def lora_label(self, lora: str) -> str:
        """``lora`` while fewer than ``MAX_LORA_LABELS`` adapters have a label, else
        "other": an ingress serving thousands of adapters keeps its series bounded."""
        if lora in self._lora_labels:
            return lora
        if len(self._lora_labels) < MAX_LORA_LABELS:
            self._lora_labels.add(lora)
            return lora
        return "other"

    def observe_lora(self, model: str, lora: str, status: int | str,
                     num_generated: int) -> None:
        """One answered request of adapter ``lora`` (its base ``model``)."""
        label = self.lora_label(lora)
        self._lora_requests.inc(1, {"model": model, "lora": label, "status": str(status)})
        if num_generated:
            self._lora_tokens.inc(num_generated, {"model": model, "lora": label})

    def export_zeros(self, endpoints: dict[str, tuple[str, ...]]) -> None:
        """Requests answered with 200 by each model's endpoints, at 0 from the start."""
        for model, names in endpoints.items():
            for endpoint in names:
                export_zero(self._requests, self._tag(model, endpoint, "200"))

    def observe_request(self, model: str, endpoint: str, status: int | str,
                        ttft_s: float | None = None, tpot_s: float | None = None,
                        e2e_s: float | None = None) -> None:
        """One answered request. ``ttft_s``/``tpot_s`` for generation only (None
        otherwise; ``tpot_s`` None when a single token came out)."""
        self._requests.inc(1, self._tag(model, endpoint, str(status)))
        tags = self._tag(model, endpoint)
        if ttft_s is not None:
            self._ttft.observe(ttft_s, tags)
        if tpot_s is not None:
            self._tpot.observe(tpot_s, tags)
        if e2e_s is not None:
            self._e2e.observe(e2e_s, tags)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Wait from arrival to dispatch to a replica (admission included)."""
        self._wait.observe(seconds, self._tag(model))

    def _tag(self, model: str, endpoint: str | None = None, status: str | None = None):
        key = (model, endpoint, status)
        tags = self._tags.get(key)
        if tags is None:
            names = ("model", "endpoint", "status")
            tags = self._tags[key] = {k: v for k, v in zip(names, key) if v is not None}
        return tags


class AdmissionMetrics:
    """The admission controller's pool and decisions, per model."""

    def __init__(self):
        self._reserved, self._capacity, self._admitted, self._rejected = (
            METRICS[n].build() for n in (
                "packserve_admission_reserved_tokens", "packserve_admission_capacity_tokens",
                "packserve_admissions", "packserve_rejections"))
        self._models: dict[str, dict[str, str]] = {}
        self._reasons: dict[tuple[str, RejectReason], dict[str, str]] = {}

    def export_zeros(self, model: str) -> None:
        """The model's admissions and every rejection reason, at 0 (call once per model)."""
        export_zero(self._admitted, self._model(model))
        for reason in RejectReason:
            export_zero(self._rejected, self._reason(model, reason))

    def set_pool(self, model: str, reserved: int, capacity: int) -> None:
        tags = self._model(model)
        self._reserved.set(reserved, tags)
        self._capacity.set(capacity, tags)

    def admitted(self, model: str) -> None:
        self._admitted.inc(1, self._model(model))

    def rejected(self, model: str, reason: RejectReason | str) -> None:
        """``reason``: a ``RejectReason`` or its value (ValueError for anything else)."""
        self._rejected.inc(1, self._reason(model, RejectReason(reason)))

    def _reason(self, model: str, reason: RejectReason) -> dict[str, str]:
        tags = self._reasons.get((model, reason))
        if tags is None:
            tags = self._reasons[(model, reason)] = {"model": model, "reason": reason.value}
        return tags

    def _model(self, model: str) -> dict[str, str]:
        tags = self._models.get(model)
        if tags is None:
            tags = self._models[model] = {"model": model}
        return tags
