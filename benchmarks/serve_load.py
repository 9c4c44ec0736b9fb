"""Serving overhead: the Azure trace's arrivals over HTTP (Ray Serve, the official
``openai`` client, streamed completions) against the same schedule on the engine
in-process, same model, same machine, one after the other.

Workload: the first ``--num-requests`` requests of the Azure conversation trace in
arrival order; prompts are random token ids of each request's context length, outputs
exactly its generated length (EOS ignored, greedy). Lengths are scaled and clipped on
CPU (the JSON says how). Arrivals keep the trace's gaps, time-compressed to each
``--rates`` value (mean requests/s offered); a rate of 0 sends everything at once, which
saturates both paths and so measures throughput.

Per request: TTFT (send to the first streamed token), TPOT (then per further token),
end-to-end; per run: requests/s and generated tokens/s over the run's wall time, p50/p99,
and the 429 rate. Ratios: HTTP throughput / in-process throughput, and HTTP TTFT p50 -
in-process TTFT p50 (the added time to first token).

    python -m benchmarks.serve_load --out benchmarks/results/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import write_json
from benchmarks._env import machine_info
from benchmarks.workloads import azure_trace

MODEL = "packserve-smoke"


@dataclass(frozen=True)
class Req:
    arrival_s: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    status: int = 0
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    num_tokens: int = 0


def workload(args, vocab: int) -> list[Req]:
    trace = azure_trace()
    n = args.num_requests
    rng = np.random.default_rng(args.seed)
    ctx = np.clip(np.ceil(trace.context_tokens[:n] * args.context_scale), 1, args.max_context)
    gen = np.clip(np.ceil(trace.generated_tokens[:n] * args.generated_scale), 1, args.max_generated)
    arrivals = trace.arrival_s[:n] - trace.arrival_s[0]
    return [Req(float(a), rng.integers(3, vocab, int(c)).tolist(), int(g))
            for a, c, g in zip(arrivals, ctx, gen)]


def schedule(reqs: list[Req], rate: float) -> list[float]:
    """Send times: the trace's gaps scaled to ``rate`` requests/s (0: all at once)."""
    if rate <= 0:
        return [0.0] * len(reqs)
    natural = len(reqs) / max(reqs[-1].arrival_s, 1e-9)
    return [r.arrival_s * natural / rate for r in reqs]


async def replay(reqs, times, send) -> tuple[list[Result], float]:
    t0 = time.perf_counter()

    async def one(req, at):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await send(req)

    results = await asyncio.gather(*(one(r, t) for r, t in zip(reqs, times)))
    return list(results), time.perf_counter() - t0


def http_sender(client):
    import openai

    async def send(req: Req) -> Result:
        res, start = Result(), time.perf_counter()
        try:
            stream = await client.completions.create(
                model=MODEL, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and res.num_tokens == 0:
                    res.ttft_s = time.perf_counter() - start
                res.num_tokens += 1 if chunk.choices and chunk.choices[0].text is not None else 0
            res.status = 200
        except openai.RateLimitError:
            res.status = 429
        except openai.APIStatusError as exc:
            res.status = exc.status_code
        res.e2e_s = time.perf_counter() - start
        return res

    return send


def engine_sender(engine):
    from worker.sampling import SamplingParams

    async def send(req: Req) -> Result:
        res, start = Result(), time.perf_counter()
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True)
        async for delta in engine.generate_stream(req.prompt, params):
            if res.num_tokens == 0:
                res.ttft_s = time.perf_counter() - start
            res.num_tokens += len(delta.token_ids)
        res.status, res.e2e_s = 200, time.perf_counter() - start
        return res

    return send


def summarize(results: list[Result], wall_s: float, reqs: list[Req]) -> dict:
    ok = [r for r in results if r.status == 200]
    ttft = np.array([r.ttft_s for r in ok])
    generated = sum(req.max_tokens for req, r in zip(reqs, results) if r.status == 200)
    tpot = np.array([(r.e2e_s - r.ttft_s) / (req.max_tokens - 1)
                     for req, r in zip(reqs, results) if r.status == 200 and req.max_tokens > 1])

    def pct(a, q):
        return float(np.percentile(a, q)) * 1000 if len(a) else None

    return {"num_requests": len(results), "num_ok": len(ok),
            "rate_429": sum(r.status == 429 for r in results) / len(results),
            "other_errors": sorted({r.status for r in results} - {200, 429}),
            "wall_s": wall_s, "requests_per_s": len(ok) / wall_s,
            "generated_tokens_per_s": generated / wall_s,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99)}


def engine_config(args):
    from worker import EngineConfig

    return EngineConfig(model="smoke:decoder", max_num_batched_tokens=args.budget,
                        num_kv_blocks=args.num_kv_blocks, max_model_len=2048)


def app_args(args) -> dict:
    cfg = engine_config(args)
    return {"models": [{"name": MODEL, "model": cfg.model, "engine": {
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "num_kv_blocks": cfg.num_kv_blocks, "max_model_len": cfg.max_model_len}}],
        "admission": {"max_wait_s": 60}}


def run_inprocess(args, reqs, rates) -> dict:
    from worker import Engine

    out = {}
    with Engine(engine_config(args)) as engine:
        send = engine_sender(engine)
        asyncio.run(replay(reqs[:8], [0.0] * 8, send))  # warm-up
        for rate in rates:
            results, wall = asyncio.run(replay(reqs, schedule(reqs, rate), send))
            out[str(rate)] = summarize(results, wall, reqs)
            print(f"in-process rate={rate}: {out[str(rate)]}", flush=True)
    return out


def run_http(args, reqs, rates) -> dict:
    import openai
    import ray
    from ray import serve

    from deployments import build_app
    from tests.ray_cluster import free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="psbench-", dir="/tmp"),
             object_store_memory=1 << 30)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(args)), name="packserve", route_prefix="/")
    out = {}
    try:
        async def go(batch, times):
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                        max_retries=0, timeout=600)
            async with client:
                return await replay(batch, times, http_sender(client))

        asyncio.run(go(reqs[:8], [0.0] * 8))  # warm-up
        for rate in rates:
            results, wall = asyncio.run(go(reqs, schedule(reqs, rate)))
            out[str(rate)] = summarize(results, wall, reqs)
            print(f"http rate={rate}: {out[str(rate)]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--rates", default="2,0", help="offered requests/s, comma-separated; 0 = all at once")
    p.add_argument("--context-scale", type=float, default=0.125)
    p.add_argument("--max-context", type=int, default=256)
    p.add_argument("--generated-scale", type=float, default=0.125)
    p.add_argument("--max-generated", type=int, default=32)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve_load_cpu.json")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    from worker.smoke import DECODER_VOCAB_SIZE

    reqs = workload(args, DECODER_VOCAB_SIZE)
    inproc = run_inprocess(args, reqs, rates)
    http = run_http(args, reqs, rates)
    ratios = {}
    for rate in map(str, rates):
        a, b = http[rate], inproc[rate]
        ratios[rate] = {
            "throughput_ratio": a["generated_tokens_per_s"] / b["generated_tokens_per_s"],
            "added_ttft_ms_p50": (a["ttft_ms_p50"] or 0) - (b["ttft_ms_p50"] or 0)}
    payload = {"benchmark": "serve_load", "machine": machine_info(), "args": vars(args),
               "workload": {"source": "azure_llm_conv_2023 (first requests, arrival order)",
                            "context_transform": f"ceil(context * {args.context_scale}) "
                                                 f"clipped to [1, {args.max_context}]",
                            "generated_transform": f"ceil(generated * {args.generated_scale}) "
                                                   f"clipped to [1, {args.max_generated}]",
                            "model": "smoke:decoder (random weights)"},
               "in_process": inproc, "http": http, "ratios": ratios}
    write_json(args.out, payload)
    print(ratios)


if __name__ == "__main__":
    main()
