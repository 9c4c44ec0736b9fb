"""The drain ``packserve serve`` runs on Ctrl-C / SIGTERM, before it deletes anything.

Each ingress replica watches Ray's internal KV (``deployments/http/draining.py``,
``watch_for_drain``); ``drain`` sets the application's key, so every ingress replica,
however many, stops admitting (503 + Retry-After, ``/health`` 503 "draining") and lets
its requests run for ``timeout_s``; at that deadline it ends what is left (streams with
an error event and ``[DONE]``). Each draining replica publishes its in-flight count;
``drain`` returns once every replica reports none (or the deadline and a margin for the
ended streams to flush have passed). Then the CLI deletes the application as before:
Serve's own graceful shutdown has nothing left to wait for.

Serve stopping an ingress by itself (a KubeRay rolling upgrade, a scale-down) reaches the
same drain from inside the replica (``draining._replica_stopping``), bounded by the ingress
deployment's ``graceful_shutdown_timeout_s`` (``builder.py``: the drain timeout + 10 s).
"""

from __future__ import annotations

import json
import sys
import time

from deployments.http.draining import DRAIN_KV_NAMESPACE, drain_key, in_flight_key

FLUSH_MARGIN_S = 5.0  # after the deadline: the ingresses' last events reach the clients
POLL_S = 0.2
INGRESS = "OpenAIIngress"


def _ingress_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    deployment = status.deployments.get(INGRESS) if status else None
    if deployment is None:
        return 0
    return sum(n for state, n in deployment.replica_states.items() if str(state) in (
        "RUNNING", "ReplicaState.RUNNING"))


def _in_flight(app: str) -> dict[bytes, int]:
    from ray.experimental import internal_kv as kv

    prefix = in_flight_key(app, "")
    out = {}
    for key in kv._internal_kv_list(prefix, namespace=DRAIN_KV_NAMESPACE):
        value = kv._internal_kv_get(key, namespace=DRAIN_KV_NAMESPACE)
        if value is not None:
            out[key] = int(value)
    return out


def drain(apps: list[str], timeout_s: float) -> float:
    """Drain ``apps``' ingresses; returns the seconds it took."""
    from ray.experimental import internal_kv as kv

    t0 = time.monotonic()
    expected = {app: _ingress_replicas(app) for app in apps}
    apps = [a for a in apps if expected[a]]
    if not apps:
        return 0.0
    print(f"packserve: draining: new requests get 503, in-flight ones get up to "
          f"{timeout_s:g} s (--drain-timeout; Ctrl-C again to stop at once)",
          file=sys.stderr, flush=True)
    for app in apps:
        kv._internal_kv_put(drain_key(app), json.dumps({"timeout_s": timeout_s}).encode(),
                            overwrite=True, namespace=DRAIN_KV_NAMESPACE)
    deadline = t0 + timeout_s + FLUSH_MARGIN_S
    left: dict = {}
    while time.monotonic() < deadline:
        left = {app: _in_flight(app) for app in apps}
        if all(len(left[a]) >= expected[a] and not any(left[a].values()) for a in apps):
            break
        time.sleep(POLL_S)
    took = time.monotonic() - t0
    busy = sum(sum(v.values()) for v in left.values())
    print(f"packserve: drained in {took:.1f} s"
          + (f" ({busy} requests still open)" if busy else ""), file=sys.stderr, flush=True)
    return took


def clear(apps: list[str]) -> None:
    """Remove the drain keys of ``apps`` (a redeployed app must not find them)."""
    try:
        from ray.experimental import internal_kv as kv

        for app in apps:
            kv._internal_kv_del(drain_key(app), namespace=DRAIN_KV_NAMESPACE)
            kv._internal_kv_del(in_flight_key(app, ""), del_by_prefix=True,
                                namespace=DRAIN_KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - Ray already gone
        pass
