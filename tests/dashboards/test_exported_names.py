"""What Prometheus stores is what the registry says: every metric of
``deployments/app/metrics.py``, recorded from a Ray actor through the recorders, is scraped
from Ray's metrics endpoint by a real Prometheus under exactly
``MetricSpec.exported_names`` (the names the dashboard check relies on); counters that
never counted anything are there at 0."""

from __future__ import annotations

import time

import pytest

from tests.prometheus_server import DEFAULT_BINARY, PrometheusServer, prometheus_binary

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason=f"no Prometheus at {DEFAULT_BINARY}: `make prometheus`")


def _recorder_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self):
            from deployments.app.metrics import AdmissionMetrics, IngressMetrics, ReplicaMetrics
            from worker.engine.observe import StepKind, StepRecord

            self.replica = ReplicaMetrics("tiny", "r1", max_num_spec_tokens=2)
            self.ingress, self.admission = IngressMetrics(), AdmissionMetrics()
            self.ingress.export_zeros({"tiny": ("chat", "embeddings")})
            self.admission.export_zeros("tiny")
            self.step = StepRecord(StepKind.FORWARD, (60, 30), (64, 64), 120, (0.01, 0.02),
                                   1600, 0.001, 1, 48, 48, 40, 30, 10, 2, 3, (0.5,), 96, 32)
            self.spec_step = StepRecord(StepKind.GENERATE, (4,), (64,), 4, (0.01,), 0, 0.0,
                                        0, None, 64, 40, 30, 10, 0, 0, (), num_decodes=2,
                                        spec_proposed=(2, 2), spec_accepted=(2, 0), spec_k=2)

        def record(self) -> None:
            self.replica.observe_step(self.step)
            self.replica.observe_step(self.spec_step)
            self.replica.set_budget(4096, 1000)
            self.ingress.observe_request("tiny", "chat", 200, 0.05, 0.01, 0.3)
            self.ingress.observe_queue_wait("tiny", 0.01)
            self.ingress.observe_lora("tiny", "sql-lora", 200, 12)
            self.admission.set_pool("tiny", 100, 4096)
            self.admission.admitted("tiny")
            self.admission.rejected("tiny", "capacity")

    return Recorder.remote()


def test_prometheus_stores_the_registry_names(ray_cluster):
    import ray

    from deployments.app.metrics import METRICS, exported_names

    port = ray.nodes()[0]["MetricsExportPort"]
    recorder = _recorder_actor()
    want = set(exported_names())
    with PrometheusServer(targets=[f"127.0.0.1:{port}"]) as prom:
        deadline, got = time.monotonic() + 90, set()
        while time.monotonic() < deadline and got != want:
            ray.get(recorder.record.remote())
            time.sleep(1)
            result = prom.query('{__name__=~"ray_packserve_.*"}')
            got = {r["metric"]["__name__"] for r in result}
        assert got == want, f"missing {sorted(want - got)}, unexpected {sorted(got - want)}"
        (series,) = prom.query('ray_packserve_real_tokens_total{model="tiny", kind="forward"}')
        labels = series["metric"]
        assert {k: labels[k] for k in METRICS["packserve_real_tokens"].tag_keys} == {
            "model": "tiny", "replica": "r1", "kind": "forward"}
        # never incremented, yet exported at 0 from the start (no "No data" panels)
        for expr in ('ray_packserve_oom_events_total{model="tiny", kind="generate"}',
                     'ray_packserve_budget_shrinks_total{model="tiny", kind="generate"}',
                     'ray_packserve_rejections_total{model="tiny", reason="too_large"}',
                     'ray_packserve_requests_total{model="tiny", endpoint="embeddings"}',
                     ('ray_packserve_spec_accepted_tokens_by_position_total{model="tiny", '
                      'position="1"}')):
            (zero,) = prom.query(expr)
            assert float(zero["value"][1]) == 0, (expr, zero)
    ray.kill(recorder)
