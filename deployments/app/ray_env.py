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

import os
import socket
import tempfile

THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


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


def apply(env: dict[str, str]) -> None:
    os.environ.update(env)
