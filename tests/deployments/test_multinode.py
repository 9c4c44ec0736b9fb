"""A real multi-node Ray cluster on this machine (tests/ray_multinode.py): a head without
GPUs and two worker nodes with fake GPUs, each its own ``ray start`` process tree with its
own ports and temp dir. packserve is deployed the way docs/kubernetes.md says to on a cluster
(``serve run -a ADDRESS config.yaml``), four replicas of the smoke decoder at one GPU each.

Checked: replicas spread over both workers; admission is one pool over all of them;
killing a worker mid-load ends each of its requests with a 503 that says to retry (or the
request succeeds), none hangs; the dead replicas' leases are reclaimed, Serve brings the
replicas back to four on the surviving worker, and new requests succeed.

The ingress and the admission controller are pinned to the head (a custom resource) so
that the ledger under test survives the node loss; without the pin Serve restarts them
elsewhere with an empty ledger, which replicas refill within a heartbeat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.app.serve_config import validate_serve_config
from tests.deployments.openai_load import Load
from tests.ray_cluster import free_port
from tests.ray_multinode import LocalRayCluster, node_env

ROOT = Path(__file__).resolve().parents[2]
APP, MODEL = "packserve", "mn-smoke"
ENGINE = f"engine-{MODEL}"
NUM_REPLICAS = 4
CAPACITY = 64 * 16  # num_kv_blocks x kv_block_size, per replica


def serve_config(http_port: int, cache_dir: str) -> dict:
    head_only = {"num_cpus": 0, "resources": {"packserve_head": 1}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "deployments:build_app",
            "runtime_env": {"env_vars": {"PACKSERVE_CACHE_DIR": cache_dir,
                                         "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
            "deployments": [{"name": "OpenAIIngress", "ray_actor_options": head_only},
                            {"name": "AdmissionController", "ray_actor_options": head_only}],
            "args": {
                "models": [{"name": MODEL, "model": "smoke:decoder",
                            "num_replicas": NUM_REPLICAS, "num_gpus": 1,
                            "engine": {"device": "cpu", "max_num_batched_tokens": 512,
                                       "num_kv_blocks": 64, "max_model_len": 512}}],
                "admission": {"heartbeat_s": 0.5, "replica_timeout_s": 3,
                              "holder_timeout_s": 10},
            },
        }],
    }


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster()
    try:
        c.start_head(num_cpus=2, resources={"packserve_head": 100})
        # "wa" is the one removed mid-load: "wb" has the GPUs to take its replicas.
        workers = [c.add_worker("wa", num_gpus=2, wait=False),
                   c.add_worker("wb", num_gpus=4, wait=False)]
        for node in workers:
            c.wait_started(node)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def url(cluster):
    http_port = free_port()
    cache_dir = os.environ.get("PACKSERVE_CACHE_DIR") or os.path.join(cluster.root, "models")
    config = serve_config(http_port, cache_dir)
    assert validate_serve_config(config) == []
    path = Path(cluster.root) / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(ROOT / ".venv" / "bin" / "serve")
    subprocess.run([serve_cli, "run", "--non-blocking", "-a", cluster.address, str(path)],
                   cwd=ROOT, env=node_env(), check=True, timeout=240, capture_output=True)
    url = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: pool(url).get("num_replicas") == NUM_REPLICAS, 300,
             f"{NUM_REPLICAS} replicas reporting to admission")
    return url


def probe(cluster: LocalRayCluster) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.deployments.multinode_probe",
                          cluster.address, APP], cwd=ROOT,
                         env=node_env(), timeout=180, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, f"the probe failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_name(cluster: LocalRayCluster, state: dict, node_id: str) -> str:
    port = state["nodes"][node_id]["node_manager_port"]
    return next((n.name for n in cluster.nodes.values()
                 if n.ports.get("node-manager-port") == port), "head")


def engine_nodes(cluster: LocalRayCluster, state: dict) -> list[str]:
    return sorted(node_name(cluster, state, a["node_id"]) for a in state["actors"]
                  if f"#{ENGINE}#" in a["name"] and a["state"] == "ALIVE")


def pool(url: str) -> dict:
    try:
        return httpx.get(f"{url}/v1/admission", timeout=30).json().get(MODEL, {})
    except (httpx.HTTPError, ValueError):
        return {}


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def test_replicas_spread_over_nodes_and_admission_is_one_pool(cluster, url):
    state = probe(cluster)
    placed = engine_nodes(cluster, state)
    assert len(placed) == NUM_REPLICAS and set(placed) == {"wa", "wb"}, placed
    for infra in ("OpenAIIngress", "AdmissionController"):
        (actor,) = [a for a in state["actors"] if f"#{infra}#" in a["name"]]
        assert node_name(cluster, state, actor["node_id"]) == "head"
    snapshot = pool(url)
    assert snapshot["num_replicas"] == NUM_REPLICAS
    assert snapshot["capacity"] == NUM_REPLICAS * CAPACITY  # one pool, both nodes


def test_a_node_lost_mid_load_fails_cleanly_and_the_service_recovers(cluster, url):
    load = Load(url, MODEL, num_clients=8, max_tokens=200, allow_503=True)
    try:
        wait_for(lambda: load.outcomes["ok"] >= 8, 180, "load under way")
        peak = max(pool(url).get("reserved", 0) for _ in range(3))
        assert 0 < peak <= NUM_REPLICAS * CAPACITY
        killed = cluster.nodes["wa"].kill()
        assert killed, "worker wa had no processes to kill"
        ok_at_kill = load.outcomes["ok"]
        wait_for(lambda: pool(url).get("num_replicas", NUM_REPLICAS) < NUM_REPLICAS, 120,
                 "admission dropping the dead node's replicas")
        wait_for(lambda: load.outcomes["ok"] >= ok_at_kill + 8, 180,
                 "requests succeeding after the node loss")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    for message in load.errors_503:
        assert "retry" in message

    def recovered() -> bool:
        p = pool(url)
        return (p.get("num_replicas"), p.get("reserved"), p.get("num_leases")) == (
            NUM_REPLICAS, 0, 0)

    wait_for(recovered, 240, "four replicas back and every lease returned")
    state = probe(cluster)
    assert engine_nodes(cluster, state) == ["wb"] * NUM_REPLICAS
    assert state["deployments"][ENGINE]["replicas"] == {"RUNNING": NUM_REPLICAS}

    after = Load(url, MODEL, num_clients=2, max_tokens=32)
    try:
        wait_for(lambda: after.outcomes["ok"] >= 6, 120, "new requests after recovery")
    finally:
        after.stop()
    assert after.failures == [] and after.outcomes["429"] == 0
