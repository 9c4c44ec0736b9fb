"""The recorders of ``deployments/app/metrics.py``: with Ray's real metric objects (built
without a running Ray: tag keys are validated on every call), and with fakes that show
what each call records."""

from __future__ import annotations

import pytest

from deployments.app import metrics
from deployments.app.metrics import (
    METRICS,
    AdmissionMetrics,
    IngressMetrics,
    RejectReason,
    ReplicaMetrics,
)
from worker.engine.observe import StepKind, StepRecord


def record(**overrides) -> StepRecord:
    fields = {"kind": StepKind.FORWARD, "bin_num_tokens": (60, 30), "bin_capacity": (64, 64),
              "padded_num_tokens": 120, "forward_seconds": (0.01, 0.02), "h2d_bytes": 1600,
              "h2d_seconds": 0.0, "num_oom": 0, "new_token_budget": None, "token_budget": 64,
              "num_kv_blocks": 0, "num_kv_blocks_used": 0, "num_kv_blocks_free": 0,
              "num_preemptions": 0, "num_waiting": 3, "queue_wait_seconds": (0.5, 0.25)}
    return StepRecord(**{**fields, **overrides})


OOM_STEP = record(kind=StepKind.GENERATE, bin_num_tokens=(), bin_capacity=(),
                  padded_num_tokens=0, forward_seconds=(), h2d_bytes=0, num_oom=1,
                  new_token_budget=57, token_budget=57, num_kv_blocks=40,
                  num_kv_blocks_used=30, num_kv_blocks_free=10, num_preemptions=2,
                  queue_wait_seconds=())


def test_real_ray_metrics_accept_every_call():
    replica = ReplicaMetrics("tiny", "r1")
    replica.observe_step(record())
    replica.observe_step(record(kind=StepKind.GENERATE, h2d_seconds=0.001))
    replica.observe_step(OOM_STEP)
    replica.set_budget(4096, 1024)
    ingress = IngressMetrics()
    ingress.observe_request("tiny", "chat", 200, ttft_s=0.05, tpot_s=0.01, e2e_s=0.3)
    ingress.observe_request("tiny", "embeddings", 429, e2e_s=0.001)
    ingress.observe_queue_wait("tiny", 0.002)
    admission = AdmissionMetrics()
    admission.set_pool("tiny", 100, 4096)
    admission.admitted("tiny")
    for reason in RejectReason:
        admission.rejected("tiny", reason)
    admission.rejected("tiny", "capacity")  # the value, as Verdict's str enum carries it
    with pytest.raises(ValueError):
        admission.rejected("tiny", "bored")


class Fake:
    """Stands in for a Ray metric: keeps (method, value, tags merged with defaults)."""

    def __init__(self, spec):
        self.spec, self.defaults, self.calls = spec, {}, []

    def set_default_tags(self, tags):
        self.defaults = dict(tags)
        return self

    def _call(self, method, value, tags=None):
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        merged = {**self.defaults, **(tags or {})}
        assert set(merged) == set(self.spec.tag_keys), (self.spec.name, merged)
        if method == "inc":
            assert value > 0, f"{self.spec.name}: Ray refuses inc({value})"
        self.calls.append((method, value, merged))

    def _record(self, value, tags=None):
        """Ray's own recording (what ``inc`` calls after its check): zero exports."""
        assert self.spec.kind is metrics.MetricKind.COUNTER and value == 0
        self._call("zero", value, tags)

    def inc(self, value=1.0, tags=None):
        self._call("inc", value, tags)

    def set(self, value, tags=None):
        self._call("set", value, tags)

    def observe(self, value, tags=None):
        self._call("observe", value, tags)


@pytest.fixture
def fakes(monkeypatch):
    made: dict[str, Fake] = {}

    def build(spec):
        made[spec.name] = Fake(spec)
        return made[spec.name]

    monkeypatch.setattr(metrics.MetricSpec, "build", build)
    return made


def values(fake: Fake) -> list:
    return [value for _, value, _ in fake.calls]


def test_counters_are_exported_at_zero_from_the_start(fakes):
    ReplicaMetrics("tiny", "r1", kinds=("forward",))
    fwd = {"model": "tiny", "replica": "r1", "kind": "forward"}
    for name in ("packserve_real_tokens", "packserve_padding_tokens_avoided",
                 "packserve_oom_events", "packserve_budget_shrinks"):
        assert fakes[name].calls == [("zero", 0, fwd)], name  # an encoder: no generate kind
    for name in ("packserve_h2d_bytes", "packserve_h2d_seconds", "packserve_preemptions"):
        assert fakes[name].calls == [("zero", 0, {"model": "tiny", "replica": "r1"})], name
    IngressMetrics().export_zeros({"tiny": ("chat", "embeddings")})
    assert [tags["endpoint"] for _, _, tags in fakes["packserve_requests"].calls] == [
        "chat", "embeddings"]
    AdmissionMetrics().export_zeros("tiny")
    assert {tags["reason"] for _, _, tags in fakes["packserve_rejections"].calls} == {
        r.value for r in RejectReason}
    assert fakes["packserve_admissions"].calls == [("zero", 0, {"model": "tiny"})]


def test_replica_metrics_record_a_step(fakes):
    replica = ReplicaMetrics("tiny", "r1")
    for fake in fakes.values():  # the zero exports (tested above)
        fake.calls.clear()
    replica.observe_step(record())
    tags = {"model": "tiny", "replica": "r1", "kind": "forward"}
    assert fakes["packserve_real_tokens"].calls == [("inc", 90, tags)]
    assert values(fakes["packserve_padding_tokens_avoided"]) == [30]
    assert values(fakes["packserve_bin_fill_ratio"]) == [60 / 64, 30 / 64]
    assert values(fakes["packserve_forward_seconds"]) == [0.01, 0.02]
    assert values(fakes["packserve_bins_per_step"]) == [2]
    assert values(fakes["packserve_engine_queue_wait_seconds"]) == [0.5, 0.25]
    assert values(fakes["packserve_h2d_bytes"]) == [1600]
    assert values(fakes["packserve_engine_waiting_requests"]) == [3]
    for name in ("packserve_h2d_seconds", "packserve_oom_events", "packserve_budget_shrinks",
                 "packserve_preemptions", "packserve_prefix_cache_queries",
                 "packserve_prefix_cache_hits"):
        assert fakes[name].calls == [], name  # nothing happened: no zero increments

    replica.observe_step(OOM_STEP)
    gen = {"model": "tiny", "replica": "r1", "kind": "generate"}
    assert fakes["packserve_oom_events"].calls == [("inc", 1, gen)]
    assert fakes["packserve_budget_shrinks"].calls == [("inc", 1, gen)]
    assert fakes["packserve_step_token_budget"].calls[-1] == ("set", 57, gen)
    assert values(fakes["packserve_preemptions"]) == [2]
    assert values(fakes["packserve_kv_blocks_used"])[-1] == 30
    assert values(fakes["packserve_kv_blocks_free"])[-1] == 10
    assert values(fakes["packserve_bins_per_step"]) == [2]  # a step with no bin is not one

    replica.observe_step(record(kind=StepKind.GENERATE, num_prefix_queries=200,
                                num_prefix_hits=96))
    assert values(fakes["packserve_prefix_cache_queries"]) == [200]
    assert values(fakes["packserve_prefix_cache_hits"]) == [96]

    replica.set_budget(4096, 1000)
    assert values(fakes["packserve_token_budget"]) == [4096]
    assert values(fakes["packserve_free_token_budget"]) == [1000]


def test_each_heartbeat_sets_the_latest_step_gauges_again(fakes):
    """Ray drops a gauge not set within two export intervals: an idle replica's
    heartbeat (``set_budget``) keeps the step gauges alive with their latest values."""
    replica = ReplicaMetrics("tiny", "r1")
    replica.set_budget(4096, 4096)  # before any step: only the budget gauges
    assert fakes["packserve_kv_blocks_used"].calls == []
    replica.observe_step(record())
    replica.observe_step(OOM_STEP)
    n = len(fakes["packserve_step_token_budget"].calls)
    replica.set_budget(4096, 1000)
    budgets = fakes["packserve_step_token_budget"].calls[n:]
    assert sorted((v, t["kind"]) for _, v, t in budgets) == [(57, "generate"), (64, "forward")]
    assert values(fakes["packserve_kv_blocks_used"])[-1] == 30  # the latest step's
    assert values(fakes["packserve_kv_blocks_free"])[-1] == 10
    assert values(fakes["packserve_engine_waiting_requests"])[-1] == 3


SPEC = ("packserve_spec_proposed_tokens", "packserve_spec_accepted_tokens",
        "packserve_spec_proposed_tokens_by_position",
        "packserve_spec_accepted_tokens_by_position", "packserve_spec_k")


def spec_step(proposed=(), accepted=(), k=0, kind=StepKind.GENERATE) -> StepRecord:
    return record(kind=kind, spec_proposed=proposed, spec_accepted=accepted, spec_k=k)


def by_position(fake: Fake) -> list[tuple[str, int]]:
    return [(tags["position"], value) for _, value, tags in fake.calls]


def test_a_replica_that_never_speculates_records_no_speculation(fakes):
    replica = ReplicaMetrics("tiny", "r1")
    replica.observe_step(record())
    replica.observe_step(record(kind=StepKind.GENERATE))
    replica.set_budget(4096, 1000)
    assert {name: fakes[name].calls for name in SPEC} == {name: [] for name in SPEC}


def test_speculation_metrics_from_step_records(fakes):
    replica = ReplicaMetrics("tiny", "r1", max_num_spec_tokens=3)
    rep = {"model": "tiny", "replica": "r1"}
    for name in SPEC[:2]:  # exported at 0 from the start, every position included
        assert fakes[name].calls == [("zero", 0, rep)], name
    for name in SPEC[2:4]:
        assert by_position(fakes[name]) == [("0", 0), ("1", 0), ("2", 0)], name
    for fake in fakes.values():
        fake.calls.clear()

    replica.observe_step(spec_step((4, 3, 1), (3, 1, 0), k=3))
    assert fakes["packserve_spec_proposed_tokens"].calls == [("inc", 8, rep)]
    assert fakes["packserve_spec_accepted_tokens"].calls == [("inc", 4, rep)]
    assert by_position(fakes["packserve_spec_proposed_tokens_by_position"]) == [
        ("0", 4), ("1", 3), ("2", 1)]
    assert by_position(fakes["packserve_spec_accepted_tokens_by_position"]) == [
        ("0", 3), ("1", 1)]  # nothing accepted at position 2: no zero increment
    assert fakes["packserve_spec_k"].calls == [("set", 3, rep)]

    replica.observe_step(record())  # a forward step (score, embed) says nothing of k
    replica.observe_step(spec_step(k=1))  # the load rule lowered k: no proposal verified
    replica.observe_step(spec_step((2,), (2,), k=0))  # k=1's proposals; the cluster: off
    replica.observe_step(spec_step())  # off, unchanged: nothing recorded
    assert values(fakes["packserve_spec_k"]) == [3, 1, 0]
    assert values(fakes["packserve_spec_proposed_tokens"]) == [8, 2]
    replica.set_budget(4096, 1000)  # the heartbeat sets the gauge again
    assert fakes["packserve_spec_k"].calls[-1] == ("set", 0, rep)

    replica.observe_step(spec_step((1, 1, 1, 1, 1), (1, 1, 1, 1, 0), k=5))  # past the start's k
    assert by_position(fakes["packserve_spec_accepted_tokens_by_position"])[-2:] == [
        ("2", 1), ("3", 1)]


def test_ingress_and_admission_metrics(fakes):
    ingress = IngressMetrics()
    ingress.observe_request("m", "chat", 200, ttft_s=0.05, tpot_s=0.01, e2e_s=0.3)
    ingress.observe_request("m", "embeddings", 429, e2e_s=0.001)
    ingress.observe_queue_wait("m", 0.002)
    assert [tags for *_, tags in fakes["packserve_requests"].calls] == [
        {"model": "m", "endpoint": "chat", "status": "200"},
        {"model": "m", "endpoint": "embeddings", "status": "429"}]
    assert values(fakes["packserve_ttft_seconds"]) == [0.05]
    assert values(fakes["packserve_tpot_seconds"]) == [0.01]
    assert values(fakes["packserve_e2e_seconds"]) == [0.3, 0.001]
    assert fakes["packserve_queue_wait_seconds"].calls == [("observe", 0.002, {"model": "m"})]

    admission = AdmissionMetrics()
    admission.set_pool("m", 100, 4096)
    admission.admitted("m")
    admission.rejected("m", RejectReason.TOO_LARGE)
    assert values(fakes["packserve_admission_reserved_tokens"]) == [100]
    assert values(fakes["packserve_admission_capacity_tokens"]) == [4096]
    assert values(fakes["packserve_admissions"]) == [1]
    assert fakes["packserve_rejections"].calls == [
        ("inc", 1, {"model": "m", "reason": "too_large"})]


def test_every_metric_is_built_by_a_recorder(fakes):
    ReplicaMetrics("m", "r")
    IngressMetrics()
    AdmissionMetrics()
    assert set(fakes) == set(METRICS)


def test_the_module_imports_no_ray_at_module_level():
    """Ray is imported where metrics are built (inside the actors), never on import."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(metrics.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n and n.split(".")[0] in ("ray", "torch", "worker")]
