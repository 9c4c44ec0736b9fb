"""Admission under chat load without ``max_tokens``: the lease rule before (prompt +
max_tokens up front: a chat without max_tokens leases its whole context) against leases
that follow use (prompt + a first allotment, grown in blocks as it generates), side by
side in one run, over real Serve and HTTP.

Workload: streamed chats that send no ``max_tokens`` (what most chat clients send).
Their prompt and output lengths are the Azure conversation trace's (long-tailed: p50 129,
p90 424, p99 601 output tokens), scaled by ``--scale`` to the smoke decoder's context.
The server does not know an output's length in advance: each chat holds EOS back with
``min_tokens`` and then forces it with a logit bias, so it ends at its drawn length as a
model's chat would at its own EOS.

Load: ``--loads`` x the replica's capacity in clients, closed loop for ``--seconds``.
Capacity = the KV cache's tokens / the mean request's tokens (prompt + output): the
chats that fit at once by what they really use. A client sends a chat, reads it to the
end, and sends the next; on a 429 it waits the Retry-After the server named (as the
OpenAI SDKs do) and draws a new chat.

Per rule and load: goodput (output tokens of completed chats per second), the 429 rate,
TTFT p50/p99 of completed chats, how long a 429 took to come back (p50/p99) beside the
edge's floor under the same load (``GET /v1/models`` every 0.25 s, p50/p99), peak and
mean KV use (the replica's used blocks after its last step / its blocks, sampled every
0.25 s), engine
preemptions, 5xx and out-of-memory counts.

    python -m benchmarks.admission --out benchmarks/results/admission_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import write_json
from benchmarks._env import machine_info
from benchmarks.workloads import azure_trace

MODEL = "packserve-smoke"
APP = "admission-bench"


def app_args(args, rule: str, first: int) -> dict:
    return {"models": [{"name": MODEL, "model": "smoke:decoder",
                        "engine": {"max_num_batched_tokens": 1024,
                                   "num_kv_blocks": args.kv_blocks,
                                   "max_model_len": args.context}}],
            "admission": {"heartbeat_s": 0.5, "lease_rule": rule,
                          "first_output_tokens": first, "lease_block_tokens": args.block}}


def chat_lengths(args) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, output tokens) per chat, the trace's scaled; prompt + output fit."""
    trace = azure_trace()
    prompt = np.clip(np.ceil(trace.context_tokens * args.scale), 4, args.context // 2)
    output = np.clip(np.ceil(trace.generated_tokens * args.scale), 1,
                     args.context - prompt - 32)
    return prompt.astype(int), output.astype(int)


def prompt_texts(tok, lengths: np.ndarray, rng) -> dict[int, str]:
    """A text of about ``n`` tokens for every length, of random letters: no two prompts
    share a prefix (the prefix cache would otherwise hold one copy of them all)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = {}
    for n in sorted(set(lengths.tolist())):
        words = []
        while (have := len(tok(" ".join(words))["input_ids"])) < n:
            words += ["".join(rng.choice(letters, 5)) for _ in range(max(1, (n - have) // 6))]
        texts[n] = " ".join(words)
    return texts


class Client:
    """One closed-loop chat client; results go to the shared lists."""

    def __init__(self, session, base: str, eos: int, draws, out: dict):
        self.session, self.base, self.eos, self.draws, self.out = session, base, eos, draws, out

    async def run(self, until: float) -> None:
        while time.perf_counter() < until:
            text, length = next(self.draws)
            body = {"model": MODEL, "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": text}],
                    "min_tokens": int(length), "logit_bias": {str(self.eos): 100}}
            start = time.perf_counter()
            async with self.session.post(f"{self.base}/chat/completions", json=body) as r:
                if r.status == 429:
                    await r.read()
                    self.out["refused_s"].append(time.perf_counter() - start)
                    wait = float(r.headers.get("Retry-After", 1))
                    self.out["retry_after"].append(wait)
                    await asyncio.sleep(min(wait, max(0.0, until - time.perf_counter())))
                    continue
                if r.status != 200:
                    self.out["errors"].append(r.status)
                    await r.read()
                    continue
                ttft, tokens = None, 0
                async for line in r.content:  # one SSE line per iteration
                    if not line.startswith(b"data: {"):
                        continue
                    if ttft is None or b'"usage"' in line:
                        chunk = json.loads(line[6:])
                        if ttft is None and any(c["delta"].get("content")
                                                for c in chunk.get("choices", ())):
                            ttft = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                if time.perf_counter() <= until:  # goodput counts what ended in the window
                    self.out["ttft_s"].append(ttft if ttft is not None else float("nan"))
                    self.out["tokens"].append(tokens)


def sample_kv(handle, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            samples.append(handle.record_routing_stats.remote().result(timeout_s=10))
        except Exception:  # noqa: BLE001 - a missed sample is a gap, not a failure
            pass
        stop.wait(0.25)


def run_level(base: str, eos: int, clients: int, seconds: float, lengths, texts, seed: int,
              handle, num_blocks: int) -> dict:
    import aiohttp

    prompt, output = lengths
    rng = np.random.default_rng(seed)
    out = {"ttft_s": [], "tokens": [], "refused_s": [], "retry_after": [], "errors": []}
    samples: list[dict] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_kv, args=(handle, stop, samples), daemon=True)
    before = handle.record_routing_stats.remote().result(timeout_s=30)

    def draws():
        while True:
            i = int(rng.integers(len(prompt)))
            salt = "".join(rng.choice(list("abcdefghij"), 6))  # unique per chat
            yield f"{salt} {texts[int(prompt[i])]}", int(output[i])

    floor: list[float] = []

    async def probe(s, until: float) -> None:
        """The edge's floor under the same load: GET /v1/models, which admits nothing."""
        while time.perf_counter() < until:
            start = time.perf_counter()
            async with s.get(f"{base}/models") as r:
                await r.read()
            floor.append(time.perf_counter() - start)
            await asyncio.sleep(0.25)

    async def go():
        conn = aiohttp.TCPConnector(limit=clients + 8)
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=600)) as s:
            gen = draws()
            until = time.perf_counter() + seconds
            await asyncio.gather(probe(s, until), *(Client(s, base, eos, gen, out).run(until)
                                                    for _ in range(clients)))

    sampler.start()
    t0 = time.perf_counter()
    asyncio.run(go())
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    after = handle.record_routing_stats.remote().result(timeout_s=30)
    kv = np.array([s["kv_used_blocks"] for s in samples] or [0]) / num_blocks
    ttft = np.array(out["ttft_s"])
    ttft = ttft[~np.isnan(ttft)]
    attempts = len(out["tokens"]) + len(out["refused_s"]) + len(out["errors"])

    def pct(a, q, scale=1000.0):
        return round(float(np.percentile(a, q)) * scale, 1) if len(a) else None

    return {"clients": clients, "wall_s": round(wall, 1), "completed": len(out["tokens"]),
            "goodput_tokens_per_s": round(sum(out["tokens"]) / seconds, 1),
            "rate_429": round(len(out["refused_s"]) / max(1, attempts), 3),
            "errors": sorted(set(out["errors"])),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "refusal_ms_p50": pct(out["refused_s"], 50),
            "refusal_ms_p99": pct(out["refused_s"], 99),
            "models_get_ms_p50": pct(floor, 50), "models_get_ms_p99": pct(floor, 99),
            "retry_after_s_p50": pct(out["retry_after"], 50, 1.0),
            "kv_use_peak": round(float(kv.max()), 3), "kv_use_mean": round(float(kv.mean()), 3),
            "preemptions": after["num_preemptions"] - before["num_preemptions"],
            "oom": after["num_oom"] - before["num_oom"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--kv-blocks", type=int, default=256)  # x 16 tokens on CPU
    p.add_argument("--scale", type=float, default=0.25)  # of the trace's lengths
    p.add_argument("--loads", default="1,2,5")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--block", type=int, default=16)  # lease blocks, scaled like --first
    p.add_argument("--first", default="64")  # first allotments to run the new rule with
    p.add_argument("--sweep-first", default="16,256")  # more allotments, at the 2x load
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from deployments import build_app
    from deployments.app.builder import deployment_name
    from tests.ray_cluster import free_port
    from worker.models.sources import resolve_model

    lengths = chat_lengths(args)
    tok = AutoTokenizer.from_pretrained(resolve_model("smoke:decoder"))
    texts = prompt_texts(tok, lengths[0], np.random.default_rng(args.seed))
    eos = tok.eos_token_id
    block_tokens = 16
    kv_tokens = args.kv_blocks * block_tokens
    mean_request = float(np.mean(lengths[0] + lengths[1]))
    capacity = max(1, int(kv_tokens / mean_request))
    loads = [float(x) for x in args.loads.split(",")]
    runs = [("ceiling", 0, loads)] + [("use", int(f), loads) for f in args.first.split(",")]
    runs += [("use", int(f), [2.0]) for f in args.sweep_first.split(",") if f]

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="psbench-", dir="/tmp"),
             object_store_memory=1 << 30)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}/v1"
    results = []
    try:
        for rule, first, levels in runs:
            serve.run(build_app(app_args(args, rule, first or 256)), name=APP,
                      route_prefix="/")
            handle = serve.get_deployment_handle(deployment_name(MODEL), APP)
            run_level(base, eos, 4, 3.0, lengths, texts, args.seed + 99, handle,
                      args.kv_blocks)
            for load in levels:
                r = run_level(base, eos, max(1, int(round(load * capacity))), args.seconds,
                              lengths, texts, args.seed, handle, args.kv_blocks)
                r.update(rule="ceiling (before)" if rule == "ceiling" else f"use, first {first}",
                         load=load)
                print(json.dumps(r), flush=True)
                results.append(r)
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {"machine": machine_info(), "args": vars(args), "capacity_clients": capacity,
           "kv_tokens": kv_tokens, "mean_request_tokens": round(mean_request, 1),
           "output_tokens_p50_p90_p99": [int(np.percentile(lengths[1], q))
                                         for q in (50, 90, 99)],
           "results": results}
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
