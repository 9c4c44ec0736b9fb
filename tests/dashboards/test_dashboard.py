"""The dashboard: valid structure, only declared metrics (ours or Ray Serve's standard
series, each of those found in the installed Ray), and provisioning through
grafana-client against a local HTTP server that answers like Grafana's API and records
every call (no Grafana server can be installed here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dashboards import provision, queries
from deployments.app.metrics import METRICS, MetricKind, exported_names

# Ray Serve's standard series the dashboard may query (Ray exports them with these
# names; each must appear in the installed Ray, so a typo fails).
RAY_SERVE_SERIES = frozenset({
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_num_ongoing_http_requests",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_processing_latency_ms_bucket",
})
ROWS = ("Traffic", "Latency", "Packing", "Memory", "Admission", "Speculative decoding")


@pytest.fixture(scope="module")
def dashboard():
    return queries.load()


def undeclared(names: set[str]) -> set[str]:
    return names - set(exported_names()) - RAY_SERVE_SERIES


def test_structure(dashboard):
    assert dashboard["uid"] == "packserve-main" and dashboard["title"]
    panels = list(queries.iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p for p in panels if p["type"] == "row"]
    assert [r["title"] for r in rows[: len(ROWS)]] == list(ROWS)
    assert any(r.get("repeat") == "replica" for r in rows)  # the per-replica row
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["replica"]["includeAll"] and variables["replica"]["multi"]
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for target in [p] + p["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_metric_the_dashboard_names_is_declared(dashboard):
    for q in queries.queries(dashboard):
        names = queries.metric_names(q.expr)
        assert names, f"{q.title}/{q.ref}: no metric in {q.expr!r}"
        assert not undeclared(names), f"{q.title}/{q.ref}: undeclared {undeclared(names)}"


def test_the_check_catches_a_typo():
    names = queries.metric_names('sum(rate(ray_packserve_real_token_total{kind="x"}[1m]))')
    assert undeclared(names) == {"ray_packserve_real_token_total"}
    assert undeclared(queries.metric_names("ray_serve_num_http_request_total")) != set()


def test_ray_serve_series_exist_in_the_installed_ray():
    import ray

    root = Path(ray.__file__).parent
    sources = [p for d in ("dashboard/modules/metrics/dashboards", "serve")
               for p in (root / d).rglob("*") if p.suffix in (".py", ".json")]
    text = "\n".join(p.read_text(errors="replace") for p in sources)
    missing = {name for name in RAY_SERVE_SERIES if name not in text}
    assert not missing, f"not in Ray {ray.__version__}: {missing}"


def test_every_declared_metric_is_on_the_dashboard(dashboard):
    shown = set().union(*(queries.metric_names(q.expr) for q in queries.queries(dashboard)))
    hidden = [spec.name for spec in METRICS.values()
              if not shown.intersection(spec.exported_names)]
    assert not hidden, f"declared but on no panel: {hidden}"


def test_labels_are_declared_tag_keys(dashboard):
    by_series = exported_names()
    for q in queries.queries(dashboard):
        ours = {n: by_series[n] for n in queries.metric_names(q.expr) if n in by_series}
        for metric, labels in queries.selectors(q.expr):
            if metric in ours:
                allowed = set(ours[metric].tag_keys) | {"le"}
                assert labels <= allowed, f"{q.title}: {metric} has no {labels - allowed}"
        if ours and not queries.metric_names(q.expr) & RAY_SERVE_SERIES:
            allowed = set().union(*(s.tag_keys for s in ours.values())) | {"le"}
            grouped = queries.grouping_labels(q.expr)
            assert grouped <= allowed, f"{q.title}: groups by {grouped - allowed}"


def test_variables_match_all_values(dashboard):
    """Variables sit in ``=~`` matchers (so "All" = ``.*`` works) and render away."""
    for q in queries.queries(dashboard):
        assert '="$' not in q.expr.replace('=~"$', ""), q.expr
        rendered = queries.render(queries.as_promql(q.expr))
        assert "$" not in rendered and "label_values" not in rendered, rendered


def test_histogram_queries_use_buckets_with_le(dashboard):
    for q in queries.queries(dashboard):
        if "histogram_quantile" in q.expr:
            assert "_bucket" in q.expr and "le" in queries.grouping_labels(q.expr), q.expr


def test_registry_is_well_formed():
    for name, spec in METRICS.items():
        assert name == spec.name and name.startswith("packserve_")
        assert not name.endswith("_total"), "Ray appends _total to counters"
        assert spec.description and spec.tag_keys
        if spec.kind is MetricKind.HISTOGRAM:
            b = spec.boundaries
            assert b and all(x > 0 for x in b) and list(b) == sorted(set(b)), name
        else:
            assert not spec.boundaries, name


# ---- provisioning against a recording server ---------------------------------------

class FakeGrafana:
    """Enough of Grafana's HTTP API for provisioning; records every call."""

    def __init__(self, api_key: str):
        self.api_key = api_key
        self.calls: list[tuple[str, str, dict | None, str | None]] = []
        self.folders: list[dict] = []
        self.dashboards: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = json.loads(req.rfile.read(length)) if length else None
        path = urlsplit(req.path).path
        auth = req.headers.get("Authorization")
        self.calls.append((method, path, body, auth))
        if auth != f"Bearer {self.api_key}":
            return self.reply(req, 401, {"message": "Unauthorized"})
        route = {("GET", "/api/folders"): self.get_folders,
                 ("POST", "/api/folders"): self.create_folder,
                 ("POST", "/api/dashboards/db"): self.post_dashboard}.get((method, path))
        if route is None:
            return self.reply(req, 404, {"message": "Not found"})
        self.reply(req, *route(body))

    def get_folders(self, _):
        return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders]

    def create_folder(self, body):
        if any(f["uid"] == body.get("uid") or f["title"] == body["title"] for f in self.folders):
            return 409, {"message": "a folder with the same name or uid already exists"}
        folder = {"id": len(self.folders) + 1, "uid": body.get("uid") or "generated",
                  "title": body["title"]}
        self.folders.append(folder)
        return 200, folder

    def post_dashboard(self, body):
        dash, uid = body["dashboard"], body["dashboard"]["uid"]
        if uid in self.dashboards and not body.get("overwrite"):
            return 412, {"status": "name-exists", "message": "dashboard exists"}
        version = self.dashboards.get(uid, {}).get("version", 0) + 1
        self.dashboards[uid] = {"dashboard": dash, "folderUid": body.get("folderUid"),
                                "version": version}
        return 200, {"id": 1, "uid": uid, "url": f"/d/{uid}/packserve", "status": "success",
                     "version": version, "slug": "packserve"}

    @staticmethod
    def reply(req, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_provisioning_is_idempotent(dashboard):
    with FakeGrafana("s3cret") as grafana:
        first = provision.provision(grafana.url, "s3cret")
        assert [(m, p) for m, p, _, _ in grafana.calls] == [
            ("GET", "/api/folders"), ("POST", "/api/folders"), ("POST", "/api/dashboards/db")]
        assert grafana.folders == [{"id": 1, "uid": "packserve", "title": "packserve"}]
        posted = grafana.calls[-1][2]
        assert posted["overwrite"] is True and posted["folderUid"] == "packserve"
        assert posted["dashboard"]["uid"] == "packserve-main"
        assert posted["dashboard"]["id"] is None
        assert posted["dashboard"]["panels"] == dashboard["panels"]
        assert first["version"] == 1

        grafana.calls.clear()
        second = provision.provision(grafana.url, "s3cret")
        assert [(m, p) for m, p, _, _ in grafana.calls] == [
            ("GET", "/api/folders"), ("POST", "/api/dashboards/db")]  # no second folder
        assert len(grafana.folders) == 1 and list(grafana.dashboards) == ["packserve-main"]
        assert second["version"] == 2 and grafana.calls[-1][2]["overwrite"] is True
        assert {auth for *_, auth in grafana.calls} == {"Bearer s3cret"}


def test_an_existing_folder_is_found_by_title():
    with FakeGrafana("k") as grafana:
        grafana.folders.append({"id": 7, "uid": "abc123", "title": "Serving"})
        provision.provision(grafana.url, "k", folder="Serving")
        assert len(grafana.folders) == 1
        assert grafana.dashboards["packserve-main"]["folderUid"] == "abc123"


def test_the_command_line_uploads_and_reports_errors(capsys):
    with FakeGrafana("good") as grafana:
        assert provision.main(["--url", grafana.url + "/", "--api-key", "bad"]) == 1
        assert "401" in capsys.readouterr().err and not grafana.dashboards
        run = subprocess.run([sys.executable, "-m", "dashboards.provision", "--url", grafana.url,
                              "--api-key", "good", "--folder", "packserve"],
                             capture_output=True, text=True, timeout=60, check=False,
                             cwd=Path(__file__).resolve().parents[2])
        assert run.returncode == 0, run.stderr
        assert "packserve-main" in run.stdout and "/d/packserve-main" in run.stdout
        assert list(grafana.dashboards) == ["packserve-main"]


def test_a_path_prefix_is_kept():
    api = provision.connect("http://grafana.example:3000/grafana", "k")
    assert api.client.url == "http://grafana.example:3000/grafana/api"
    assert provision.connect("http://g:3000/", "k").client.url == "http://g:3000/api"


def test_the_observability_page_lists_every_metric():
    page = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    missing = [spec.exported_names[0].removesuffix("_bucket") for spec in METRICS.values()
               if f"`{spec.exported_names[0].removesuffix('_bucket')}`" not in page]
    assert not missing, f"docs/observability.md's metrics table lacks {missing}"


def test_the_local_prometheus_config_scrapes_packserve_serve_metrics_port():
    """``dashboards/prometheus.yml`` targets the port ``packserve serve`` fixes, and
    Prometheus' own checker accepts it."""
    import yaml

    from deployments.app.serve_cli import DEFAULT_METRICS_PORT
    from tests.prometheus_server import prometheus_binary

    path = Path(__file__).resolve().parents[2] / "dashboards/prometheus.yml"
    config = yaml.safe_load(path.read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"127.0.0.1:{DEFAULT_METRICS_PORT}"]}]
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("no Prometheus: `make prometheus`")
    out = subprocess.run([str(binary.parent / "promtool"), "check", "config", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
