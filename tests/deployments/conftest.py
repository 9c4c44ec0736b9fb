"""Helpers for the Serve tests: apps deployed per module on the run's one Serve instance
(the ``serve_url`` fixture, in tests/conftest.py: tests/dashboards deploys apps too), the
session's shared OpenAI app (``shared_url``: the real all-MiniLM-L6-v2 and the smoke
decoder behind an API key, at ``/shared``, deployed once for every module that uses it),
and the invariant every test can check: no leaked lease, no request or KV block still
held once the load has drained."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

APP = "packserve"
DRAIN_TIMEOUT_S = 60.0

# The shared app. Its model names differ from the module apps' so that their metrics
# (tests/dashboards reads them by model) never mix.
SHARED_APP, SHARED_PREFIX, KEY = "openai", "/shared", "test-key"
EMBED, GEN = "minilm", "smoke"
SHARED_MODELS = [EMBED, GEN]
MAX_PROMPT_CHARS = 2 << 20
EMBED_ENGINE = {"max_num_batched_tokens": 4096}
GEN_ENGINE = {"max_num_batched_tokens": 1024, "num_kv_blocks": 512, "max_model_len": 512}
SHARED_ARGS = {
    "models": [
        {"name": EMBED, "model": "packaged:all-MiniLM-L6-v2", "engine": EMBED_ENGINE},
        {"name": GEN, "model": "smoke:decoder", "engine": GEN_ENGINE},
    ],
    "http": {"api_key": KEY, "max_prompt_chars": MAX_PROMPT_CHARS},  # 4 MiB bodies
}


@contextlib.contextmanager
def running_app(args: dict, name: str = APP, route_prefix: str = "/"):
    """Deploy ``build_app(args)`` at ``route_prefix`` and delete it afterwards."""
    from ray import serve

    from deployments import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    try:
        yield
    finally:
        serve.delete(name)


def decoder_args(name: str) -> dict:
    """A smoke decoder with a 2,048-token context: room for tool definitions (two cost
    about 500 tokens) and the replies; the API key on."""
    return {"models": [{"name": name, "model": "smoke:decoder",
                        "engine": {"max_model_len": 2048, "num_kv_blocks": 1024,
                                   "max_num_batched_tokens": 2048}}],
            "http": {"api_key": KEY}}


@contextlib.contextmanager
def drained_app(serve_url: str, args: dict, name: str, route_prefix: str):
    """``running_app`` at ``route_prefix``, yielding its URL; after the module's tests,
    check that it holds no lease, request, token or KV block."""
    url = serve_url + route_prefix
    with running_app(args, name, route_prefix):
        yield url
        wait_drained(url, [m["name"] for m in args["models"]],
                     args.get("http", {}).get("api_key"), app=name)


@pytest.fixture(scope="session")
def shared_url(serve_url):
    """The shared app's base URL (``.../shared``); drained and deleted at the end."""
    with running_app(SHARED_ARGS, SHARED_APP, SHARED_PREFIX):
        url = serve_url + SHARED_PREFIX
        yield url
        wait_drained(url, SHARED_MODELS, KEY, app=SHARED_APP)


def replica_handle(model_name: str, app: str = APP):
    from ray import serve

    from deployments.app.builder import deployment_name

    return serve.get_deployment_handle(deployment_name(model_name), app)


def ingress_handle(app: str = APP):
    from ray import serve

    return serve.get_deployment_handle("OpenAIIngress", app)


def admission(url: str, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{url}/v1/admission", headers=headers, timeout=30).json()


def wait_drained(url: str, models: list[str], api_key: str | None = None,
                 timeout: float = DRAIN_TIMEOUT_S, app: str = APP) -> dict:
    """Wait until admission holds no lease and the (single) replica of each model holds no
    request, token or KV block; fail naming what is still held."""
    deadline = time.monotonic() + timeout
    while True:
        snap = admission(url, api_key)
        states = {m: replica_handle(m, app).state.remote().result(timeout_s=30)
                  for m in models}
        held = {m: s for m, s in snap.items() if s["reserved"] or s["num_leases"]}
        busy = {m: s for m, s in states.items()
                if s["used_tokens"] or s["num_requests"] or s["kv_used_blocks"]}
        if not held and not busy:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"still held after {timeout:.0f} s: admission {held}, "
                                 f"replicas {busy}")
        time.sleep(0.2)
