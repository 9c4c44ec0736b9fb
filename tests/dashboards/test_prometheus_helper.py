"""The real-Prometheus helper on its own: Debian's binary scrapes its own /metrics."""

from __future__ import annotations

import pytest

from tests.prometheus_server import DEFAULT_BINARY, PrometheusServer, prometheus_binary

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason=f"no Prometheus at {DEFAULT_BINARY}: `make prometheus`")


def test_a_real_scrape_returns_series():
    with PrometheusServer(scrape_self=True) as prom:
        up = prom.wait_for('up{job="packserve-test"} == 1')
        assert [r["metric"]["instance"] for r in up] == [f"127.0.0.1:{prom.port}"]
        assert prom.targets_health() == [(f"{prom.url}/metrics", "up", "")]
        # a scraped counter of Prometheus's own, through a PromQL function
        (scrapes,) = prom.wait_for("sum(prometheus_target_scrapes_sample_duplicate_"
                                   "timestamp_total) >= 0")
        assert float(scrapes["value"][1]) >= 0
        assert prom.values("vector(1) + 1") == [2.0]
        proc = prom._proc
    assert proc.poll() is not None  # stopped through its own handle
    assert prom._dir is None  # config and storage removed


def test_a_bad_query_names_the_error():
    from tests.prometheus_server import PrometheusError

    with PrometheusServer() as prom, pytest.raises(PrometheusError, match="parse error"):
        prom.query("sum(")
