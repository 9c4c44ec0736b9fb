"""Helpers for the Serve tests: apps deployed per module on the run's one Serve instance
(the ``serve_url`` fixture, in tests/conftest.py: tests/dashboards deploys apps too),
and the invariant every test can check: no leaked lease, no request or KV block still
held once the load has drained."""

from __future__ import annotations

import contextlib
import time

import httpx

APP = "packserve"
DRAIN_TIMEOUT_S = 60.0


@contextlib.contextmanager
def running_app(args: dict):
    """Deploy ``build_app(args)`` at / and delete it afterwards."""
    from ray import serve

    from deployments import build_app

    serve.run(build_app(args), name=APP, route_prefix="/")
    try:
        yield
    finally:
        serve.delete(APP)


def replica_handle(model_name: str):
    from ray import serve

    from deployments.builder import deployment_name

    return serve.get_deployment_handle(deployment_name(model_name), APP)


def admission(url: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{url}/v1/admission", headers=headers, timeout=30).json()


def wait_drained(url: str, models: list[str], api_key: str | None = None,
                 timeout: float = DRAIN_TIMEOUT_S) -> dict:
    """Wait until admission holds no lease and the (single) replica of each model holds no
    request, token or KV block; fail naming what is still held."""
    deadline = time.monotonic() + timeout
    while True:
        snap = admission(url, api_key)
        states = {m: replica_handle(m).state.remote().result(timeout_s=30) for m in models}
        held = {m: s for m, s in snap.items() if s["reserved"] or s["num_leases"]}
        busy = {m: s for m, s in states.items()
                if s["used_tokens"] or s["num_requests"] or s["kv_used_blocks"]}
        if not held and not busy:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after {timeout:.0f} s: admission {held}, "
                                 f"replicas {busy}")
        time.sleep(0.2)
