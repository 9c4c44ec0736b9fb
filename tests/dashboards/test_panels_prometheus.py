"""Every dashboard panel against a real Prometheus scraping a real Ray node that serves
packserve under load: each panel query (and each variable query) returns at least one
series with a plausible value.

The app: the smoke decoder with a 256-token KV cache (so a burst gets 429s), a LoRA
adapter and speculative decoding (prompt lookup), and the packaged all-MiniLM-L6-v2 for
embeddings. A background thread sends rounds of load,
each: completions and chat completions, streamed and not, embeddings of inputs of
different lengths, two bad requests (400, 404) and an overload burst. The panels are
polled while it runs, until every rule holds (or the deadline names the ones that do
not): a ``rate()`` needs a counter to grow between two samples inside its window (so
at least two rounds), and Ray drops a gauge that is not set again within two export
intervals (so Ray Serve's own gauges show only while requests flow). Scrapes and Ray's
export period decide when data lands; the test never times anything itself.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import threading
import time
from collections import Counter

import httpx
import pytest

from benchmarks.metrics_demo import APP_ARGS, EMBED, GEN
from dashboards import queries
from deployments.http.request_timer import UNKNOWN_MODEL
from tests.deployments.conftest import running_app, wait_drained
from tests.prometheus_server import DEFAULT_BINARY, PrometheusServer, prometheus_binary

pytestmark = pytest.mark.skipif(prometheus_binary() is None,
                                reason=f"no Prometheus at {DEFAULT_BINARY}: `make prometheus`")

# The demo's app (a 256-token KV cache, so an overload burst gets 429s), with a shorter
# replica timeout for the test.
ARGS = {**APP_ARGS, "admission": {"replica_timeout_s": 3.0, "heartbeat_s": 0.5}}
LORA = "smoke-lora"  # a random adapter of the smoke decoder (benchmarks/adapters.py)
# prompt lookup on the smoke decoder (it repeats itself: proposals are accepted); the
# bursts fill the pool, so the cluster rule switches it off and on again
SPEC_K = 2
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": SPEC_K}


def app_args(adapter_dir) -> dict:
    """``ARGS`` with ``LORA`` (written to ``adapter_dir``) served on the smoke decoder, which
    speculates (``SPECULATIVE``)."""
    from benchmarks.adapters import write_adapter
    from worker.models.sources import resolve_model

    path = write_adapter(resolve_model("smoke:decoder"), adapter_dir, r=8)
    models = [dict(m, loras=[{"name": LORA, "path": str(path)}],
                   engine={**m["engine"], "speculative": SPECULATIVE})
              if m["name"] == GEN else m for m in ARGS["models"]]
    return {**ARGS, "models": models}

# $model as Grafana renders a multi-value selection: this app's models, and "unknown" (the
# label of requests that name no served model), not the series other tests of the
# session left behind (e.g. model="tiny"); "All" would be ".*"
SELECTED_MODELS = f"({GEN}|{EMBED}|{UNKNOWN_MODEL})"
BURST, BURST_TOKENS = 24, 24  # 24 x ~30 tokens: about 3x what 256 tokens hold
TIMEOUT_S = 120
PANELS_DEADLINE_S = 90

# ---- plausibility rules: (labels, value) series -> what is wrong, or None ---------------


def finite(series, low=0.0, high=math.inf, low_open=False):
    if not series:
        return "no series"
    bad = [v for _, v in series
           if not math.isfinite(v) or v < low or v > high or (low_open and v == low)]
    return f"values out of {'(' if low_open else '['}{low}, {high}]: {bad}" if bad else None


def positive(series):
    return finite(series) or (None if max(v for _, v in series) > 0 else "all zero")


def fraction(series):
    return finite(series, 0.0, 1.0, low_open=True)


def labelled(label, *values, check=positive):
    """``check``, and a series with a value > 0 for each of ``values`` of ``label``."""
    def rule(series):
        seen = {labels.get(label) for labels, v in series if v > 0}
        return check(series) or (f"no {label}={sorted(set(values) - seen)} > 0"
                                 if not set(values) <= seen else None)
    return rule


def zero(series):
    return finite(series) or (None if all(v == 0 for _, v in series) else "not zero")


def empty_on_cpu(series):
    """No copy on CPU (the model reads the staging buffer): no seconds, no bandwidth."""
    return None if not series else finite(series)


# (panel id, refId) -> rule; (None, variable) for the template variables. Every query of
# the dashboard must be listed (a new panel needs a rule).
RULES = {
    (2, "A"): labelled("status", "200", "400", "404", "429"),  # requests/s by status
    (3, "A"): labelled("status_code", "200", "429"),  # Serve: requests/s by status
    (4, "A"): labelled("model", GEN),  # 429/s
    (4, "B"): positive,  # Serve: 429/s
    (5, "A"): labelled("error_code", "400", "404", "429"),  # Serve: errors/s
    (6, "A"): finite,  # ongoing HTTP requests (0 once the load ended)
    (7, "A"): finite,  # queries in flight per Serve replica
    (9, "A"): positive, (9, "B"): positive,  # TTFT p50, p99
    (10, "A"): positive, (10, "B"): positive,  # TPOT
    (11, "A"): positive, (11, "B"): positive,  # e2e
    (12, "A"): positive, (12, "B"): positive, (12, "C"): positive,  # queue waits
    (13, "A"): positive, (13, "B"): positive,  # Serve HTTP latency
    (14, "A"): positive,  # Serve deployment processing latency
    (16, "A"): labelled("kind", "forward", "generate"),  # real tokens/s
    (17, "A"): positive,  # padding avoided/s
    (18, "A"): lambda s: finite(s, 1.0),  # padded-equivalent per real token >= 1
    (19, "A"): fraction, (19, "B"): fraction,  # bin fill ratio
    (20, "A"): lambda s: finite(s, 1.0),  # bins per step
    (21, "A"): positive, (21, "B"): positive,  # forward time per bin
    (23, "A"): positive, (23, "B"): positive,  # token budget, free budget
    (24, "A"): positive,  # engine step budget
    (25, "A"): finite, (25, "B"): positive,  # KV blocks used, free
    (26, "A"): zero, (26, "B"): zero,  # OOM events, budget shrinks (none on CPU)
    (27, "A"): positive,  # H2D bytes/s staged
    (27, "B"): empty_on_cpu,  # H2D bandwidth while copying
    (28, "A"): finite, (28, "B"): finite,  # preemptions/s, waiting requests
    (39, "A"): lambda s: finite(s, 0.0, 1.0), (39, "B"): positive,  # prefix cache
    (30, "A"): finite, (30, "B"): positive,  # reserved, capacity tokens
    (31, "A"): lambda s: finite(s, 0.0, 1.0),  # pool utilization
    (32, "A"): labelled("model", GEN, EMBED),  # admissions/s
    (33, "A"): labelled("reason", "capacity"),  # rejections/s by reason
    # speculative decoding (the smoke decoder speculates, SPECULATIVE)
    (42, "A"): lambda s: fraction(s) or positive(s),  # acceptance rate, overall
    (42, "B"): labelled("position", *map(str, range(SPEC_K)), check=fraction),  # by position
    (43, "A"): positive, (43, "B"): positive,  # proposed, accepted tokens/s
    (44, "A"): lambda s: finite(s, 0.0, SPEC_K),  # k per replica (0 while the pool is full)
    (35, "A"): labelled("kind", "forward", "generate"),  # per replica: real tokens/s
    (36, "A"): fraction,  # fill ratio p50
    (37, "A"): positive,  # forward time p50
    (38, "A"): positive, (38, "B"): finite,  # free tokens, KV blocks used
    (40, "A"): labelled("lora", LORA), (40, "B"): labelled("lora", LORA),  # LoRA adapters
    (None, "model"): labelled("model", GEN, EMBED),  # variable: models
    (None, "replica"): positive,  # variable: replicas
}

# ---- load -------------------------------------------------------------------------------


def completion(url: str, prompt: str, max_tokens: int, stream: bool = False,
               model: str = GEN) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    return _post(url, "/v1/completions", body, stream)


def chat(url: str, text: str, stream: bool) -> int:
    body = {"model": GEN, "messages": [{"role": "user", "content": text}], "max_tokens": 8,
            "temperature": 0, "stream": stream}
    return _post(url, "/v1/chat/completions", body, stream)


def _post(url: str, path: str, body: dict, stream: bool) -> int:
    if not stream:
        return httpx.post(url + path, json=body, timeout=TIMEOUT_S).status_code
    with httpx.stream("POST", url + path, json=body, timeout=TIMEOUT_S) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code != 200 or lines[-1] == "data: [DONE]", lines[-3:]
    return r.status_code


def one_round(url: str) -> Counter:
    statuses = Counter()
    for i in range(2):
        statuses[completion(url, f"round {i} packs", 8)] += 1
        statuses[completion(url, f"round {i} streams", 12, stream=True)] += 1
        statuses[chat(url, f"hello {i}", stream=False)] += 1
        statuses[chat(url, f"stream {i}", stream=True)] += 1
        statuses[completion(url, f"adapter {i}", 6, stream=i == 1, model=LORA)] += 1
        texts = ["short", "a somewhat longer input to embed " * (3 + i), "mid length text"]
        statuses[httpx.post(f"{url}/v1/embeddings", json={"model": EMBED, "input": texts},
                            timeout=TIMEOUT_S).status_code] += 1
    statuses[completion(url, "zero tokens", 0)] += 1  # 400: max_tokens 0 without echo
    statuses[completion(url, "who?", 4, model="no-such-model")] += 1  # 404
    with cf.ThreadPoolExecutor(BURST) as pool:
        statuses.update(pool.map(lambda i: completion(url, f"burst {i}", BURST_TOKENS),
                                 range(BURST)))
    return statuses


class Traffic(threading.Thread):
    """``one_round`` after ``one_round`` until ``finish``; the statuses they got."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.statuses, self.error = url, Counter(), None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self.statuses.update(one_round(self.url))
        except BaseException as exc:  # noqa: BLE001 - raised again by finish()
            self.error = exc

    def finish(self) -> Counter:
        self._stop_event.set()
        self.join(2 * TIMEOUT_S)
        if self.error is not None:
            raise self.error
        assert not self.is_alive(), "the load thread hangs"
        return self.statuses


# ---- the test ---------------------------------------------------------------------------


def ray_targets() -> list[str]:
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
            if n["Alive"] and n.get("MetricsExportPort")]


def check_panels(prom: PrometheusServer) -> dict:
    """(panel id, ref) -> what is wrong, for every query whose rule fails."""
    failures = {}
    for q in queries.queries(queries.load()):
        expr = queries.as_promql(queries.render(q.expr, model=SELECTED_MODELS))
        series = [(r["metric"], float(r["value"][1])) for r in prom.query(expr)]
        problem = RULES[(q.panel_id, q.ref)](series)
        if problem:
            failures[(q.panel_id, q.ref)] = f"{q.title}: {problem} <- {expr}"
    return failures


def test_the_rules_cover_every_query():
    keys = [(q.panel_id, q.ref) for q in queries.queries(queries.load())]
    assert sorted(map(str, keys)) == sorted(map(str, RULES))


def test_every_panel_returns_plausible_data_from_a_real_prometheus(serve_url, tmp_path):
    with running_app(app_args(tmp_path / "adapter")), PrometheusServer(targets=ray_targets()) as prom:
        prom.wait_for("up == 1")
        traffic = Traffic(serve_url)
        traffic.start()
        try:
            deadline = time.monotonic() + PANELS_DEADLINE_S
            while (failures := check_panels(prom)) and time.monotonic() < deadline:
                time.sleep(1)
        finally:
            statuses = traffic.finish()
        assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
        assert set(statuses) == {200, 400, 404, 429}, statuses
        wait_drained(serve_url, [GEN, EMBED])
