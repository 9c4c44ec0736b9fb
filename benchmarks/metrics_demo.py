"""A load run watched by a real Prometheus, drawn as the dashboard's main panels.

    python -m benchmarks.metrics_demo --out dashboards/packserve_panels.png

Starts its own local Ray (``address="local"``: it never joins a running cluster; every
process exports metrics each second), Ray Serve on a free port, the packserve app (the
smoke decoder with a 256-token KV cache, so the overload phase gets 429s, and the
packaged all-MiniLM-L6-v2), and a Prometheus (``make prometheus``) scraping the node's
metrics export port. Then closed-loop clients run phases of rising and falling
concurrency; each client loops over streamed and non-streamed completions and chat
completions, and embeddings of inputs of different lengths. Finally
``dashboards.snapshot`` draws the panels over the run. Everything it started is stopped
through its own handle.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

GEN, EMBED = "packserve-smoke", "all-MiniLM-L6-v2"
APP_ARGS = {
    "models": [
        {"name": GEN, "model": "smoke:decoder",  # 16 blocks x 16 tokens: 256 tokens
         "engine": {"max_num_batched_tokens": 512, "num_kv_blocks": 16, "max_model_len": 256}},
        {"name": EMBED, "model": "packaged:all-MiniLM-L6-v2",
         "engine": {"max_num_batched_tokens": 256}},
    ],
    "admission": {"heartbeat_s": 0.5},
}
PHASES = ((2, 0.25), (4, 0.25), (16, 0.25), (3, 0.25))  # (clients, share of the run)
WORDS = ("packing", "tokens", "into", "bins", "without", "padding", "keeps", "the", "device",
         "busy")


def one_request(client: httpx.Client, rng: random.Random) -> int:
    """One request of a random kind; its HTTP status."""
    kind = rng.choice(("completion", "completion", "chat", "embeddings"))
    text = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
    stream = rng.random() < 0.5
    if kind == "embeddings":
        inputs = [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(4)]
        return client.post("/v1/embeddings", json={"model": EMBED, "input": inputs}).status_code
    if kind == "chat":
        path = "/v1/chat/completions"
        body = {"model": GEN, "messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"model": GEN, "prompt": text, "ignore_eos": True}
    body.update(max_tokens=rng.randint(8, 32), temperature=0, stream=stream)
    if not stream:
        return client.post(path, json=body).status_code
    with client.stream("POST", path, json=body) as r:
        for _ in r.iter_lines():
            pass
    return r.status_code


def run_phase(url: str, num_clients: int, seconds: float, seed: int) -> Counter:
    statuses: Counter = Counter()
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                status = one_request(client, rng)
                with lock:
                    statuses[status] += 1
                if status == 429:
                    time.sleep(0.2)  # back off, as a client honouring Retry-After would

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(num_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="load duration")
    p.add_argument("--out", default="dashboards/packserve_panels.png")
    p.add_argument("--rate-interval", default="15s", help="$__rate_interval in the PNG")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # read by every Ray process
    import ray
    from ray import serve

    from dashboards.snapshot import draw
    from deployments import build_app
    from tests.prometheus_server import PrometheusServer
    from tests.ray_cluster import free_port

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="psdemo-", dir="/tmp"),
             object_store_memory=1 << 30,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(APP_ARGS), name="packserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
                   for n in ray.nodes() if n["Alive"]]
        with PrometheusServer(targets=targets) as prom:
            prom.wait_for("up == 1")
            started = time.time()
            for i, (clients, share) in enumerate(PHASES):
                statuses = run_phase(url, clients, args.seconds * share, seed=i)
                print(f"phase {i}: {clients} clients: {dict(statuses)}", flush=True)
            time.sleep(10)  # the last exports and scrapes land
            minutes = (time.time() - started) / 60 + 0.25
            path = draw(prom.url, Path(args.out), minutes=minutes, step=1.0,
                        rate_interval=args.rate_interval)
            print(f"wrote {path}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
