"""A real Prometheus for tests: Debian's binary (``make prometheus`` unpacks it into
``.tools/``), on a free loopback port, scraping the given targets every second.

    with PrometheusServer(targets=["127.0.0.1:8080"]) as prom:
        prom.wait_for("up == 1")
        prom.query('sum(rate(ray_packserve_real_tokens_total[30s]))')

Its config and storage live in a temp dir removed on ``stop()``; the process is stopped
through its own handle (terminate, then kill), never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Self

BINARY_ENV = "PACKSERVE_PROMETHEUS"  # overrides the path below
DEFAULT_BINARY = Path(__file__).resolve().parents[1] / ".tools/prometheus/usr/bin/prometheus"


def prometheus_binary() -> Path | None:
    """The Prometheus binary to run, or None when neither the env var nor ``.tools``
    has one (run ``make prometheus``)."""
    path = Path(os.environ.get(BINARY_ENV) or DEFAULT_BINARY)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """One Prometheus process. ``targets``: ``host:port`` scraped at ``/metrics``;
    ``sd_files``: file-based service discovery (Ray writes
    ``<session dir>/prom_metrics_service_discovery.json``); ``scrape_self``: scrape this
    Prometheus's own ``/metrics`` too."""

    def __init__(self, targets: list[str] = (), sd_files: list[str | Path] = (), *,
                 scrape_self: bool = False, scrape_interval: str = "1s",
                 binary: Path | None = None, ready_timeout_s: float = 30.0):
        self.binary = binary or prometheus_binary()
        if self.binary is None:
            raise PrometheusError(f"no Prometheus binary: run `make prometheus` or set "
                                  f"{BINARY_ENV} (looked at {DEFAULT_BINARY})")
        self.targets, self.sd_files = list(targets), [str(p) for p in sd_files]
        self.scrape_self = scrape_self
        self.scrape_interval, self.ready_timeout_s = scrape_interval, ready_timeout_s
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._dir = Path(tempfile.mkdtemp(prefix="psprom-"))
        self.port = free_port()
        config = self._dir / "prometheus.yml"
        config.write_text(json.dumps(self._config()))  # JSON is YAML
        self._log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115 - lives with the process
        self._proc = subprocess.Popen(
            [str(self.binary), f"--config.file={config}",
             f"--storage.tsdb.path={self._dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process this object started (by its PID) and remove its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP API ---------------------------------------------------------------------

    def query(self, expr: str) -> list[dict]:
        """An instant query -> Prometheus' ``result`` list (``metric``, ``value``)."""
        data = self._get("/api/v1/query", query=expr)
        if data.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: {data}")
        return data["data"]["result"]

    def values(self, expr: str) -> list[float]:
        """The query's sample values, as floats (NaN kept)."""
        return [float(r["value"][1]) for r in self.query(expr)]

    def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[dict]:
        """Poll ``expr`` until it returns at least one series; the last result."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                if not result:
                    raise PrometheusError(f"{expr!r} returned nothing within {timeout_s} s; "
                                          f"targets: {self.targets_health()}")
                return result
            time.sleep(0.5)

    def targets_health(self) -> list[tuple[str, str, str]]:
        """(scrape URL, health, last error) of every active target."""
        data = self._get("/api/v1/targets")["data"]["activeTargets"]
        return [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in data]

    def log(self) -> str:
        return (self._dir / "prometheus.log").read_text() if self._dir else ""

    # ---- helpers ----------------------------------------------------------------------

    def _config(self) -> dict:
        job = {"job_name": "packserve-test", "scrape_interval": self.scrape_interval,
               "scrape_timeout": self.scrape_interval}
        targets = self.targets + ([f"127.0.0.1:{self.port}"] if self.scrape_self else [])
        if targets:
            job["static_configs"] = [{"targets": targets}]
        if self.sd_files:
            job["file_sd_configs"] = [{"files": self.sd_files, "refresh_interval": "1s"}]
        return {"global": {"scrape_interval": self.scrape_interval,
                           "evaluation_interval": self.scrape_interval},
                "scrape_configs": [job]}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}: "
                                      f"{self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {self.ready_timeout_s} s: "
                              f"{self.log()[-2000:]}")

    def _get(self, path: str, **params) -> dict:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = exc.read().decode(errors="replace")
            raise PrometheusError(f"GET {path} {params}: {exc.code} {body}") from None
