"""One local Ray cluster per test run, shared by every test that needs Ray.

Started with ``ray.init(address="local")`` (never joins a cluster it finds), auth off,
no dashboard, four fake GPUs (``num_gpus=4`` is bookkeeping only: replicas that ask for a
GPU are placed by it and run on the CPU), and its own temp dir. It never stops Ray by name: the
fixture shuts down only what it started.
"""

from __future__ import annotations

import os
import socket
import tempfile

NUM_FAKE_GPUS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(num_cpus: int = 8, num_gpus: int = NUM_FAKE_GPUS):
    """Start (or reuse, within this process) the test run's Ray cluster."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # every process exports its metrics each second (default 10 s): the Prometheus tests
    # wait on scrapes, not on Ray's export period (Ray floors it at 1 s)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    os.environ.setdefault("PACKSERVE_CACHE_DIR", tempfile.mkdtemp(prefix="ps-models-"))
    temp_dir = tempfile.mkdtemp(prefix="psray-", dir="/tmp")  # short: socket paths are capped
    return ray.init(
        address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, object_store_memory=1 << 30,
        _temp_dir=temp_dir, logging_level="WARNING", log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                  "RAY_AUTH_MODE": "disabled"}},
    )
