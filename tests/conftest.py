"""Shared fixtures and the ``gpu`` marker hook for the whole suite."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: never download
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _interpret_triton_without_cuda() -> None:
    """Triton kernels run under its interpreter on CPU; the switch is read when a kernel
    is decorated, so it must be set before anything imports ``worker.attention.triton_paged``."""
    import torch

    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_without_cuda()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(kind) -> Path``: a tiny random checkpoint, built once per session."""
    from tests.factories import make_tiny_checkpoint

    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = make_tiny_checkpoint(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """The run's one local Ray cluster (see tests/ray_cluster.py); shut down at the end."""
    import ray

    from tests.ray_cluster import start_local_ray

    context = start_local_ray()
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Ray Serve on the run's cluster, HTTP on a free loopback port (the Serve tests of
    tests/deployments and tests/dashboards share it: one Serve instance per cluster)."""
    from ray import serve

    from tests.ray_cluster import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
