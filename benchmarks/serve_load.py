"""Serving overhead: the same streamed completions through Ray Serve over HTTP and on the
engine in-process, same model, same machine, one path after the other.

Two modes:

| mode      | model                                   | workload                                  |
|-----------|-----------------------------------------|-------------------------------------------|
| ``trace`` | ``smoke:decoder`` (4 layers, hidden 256) | the Azure trace's first requests, scaled  |
| ``ceiling``| the smoke decoder at its smallest shape (1 layer, hidden 32): the model costs almost nothing, so what is left is the serving path | ``--num-streams`` streams of ``--stream-tokens`` tokens, 16-token prompts |

Each mode runs every rate in ``--rates``: 0 sends everything at once (saturation:
throughput), r > 0 offers r requests/s (trace: the trace's gaps, time-compressed;
ceiling: ``--light-requests`` requests at even gaps) to measure added latency.

Per request: TTFT (send to the first streamed text), the gaps between streamed
messages (ITL: what a reader sees as the stream's stutter), TPOT ((end - first) /
(tokens - 1)), messages and tokens (the usage chunk says how many tokens came). Per
run: generated tokens/s over the run's wall time, messages per token, p50/p99, and the
429 rate. Ratios: HTTP tokens/s / in-process tokens/s, the added TTFT p50, and TTFT p50 and
p99 as HTTP / in-process (the target for streams sent at once, e.g. ``--mode ceiling
--rates 0 --num-streams 200``: p50 <= 1.3x).

HTTP clients: ``trace`` uses the official ``openai`` client; ``ceiling`` a lean
aiohttp reader that parses only the usage chunk, because at 256 streams on two cores the
``openai`` client's per-chunk parsing would take the CPU the server is measured on;
``--client`` picks either for either mode (at saturation in the trace mode the ``openai``
client alone took 1.4 CPU seconds of a 5-second run on this VM's two cores). Each run also
records the engine steps it took (``engine_steps``), which tells a slower step from more
steps.

    python -m benchmarks.serve_load --mode trace --out benchmarks/results/serve_load_cpu.json
    python -m benchmarks.serve_load --mode ceiling --out benchmarks/results/serve_ceiling_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import write_json
from benchmarks._env import machine_info
from benchmarks._proc_cpu import Profiler, cpu_delta, tree
from benchmarks._serve_clients import Req, engine_sender, http_sender, lean_sender, summarize
from benchmarks.workloads import azure_trace

MODEL = "packserve-smoke"
TTFT_RATIO_TARGET = 1.3  # Serve's TTFT p50 / in-process, streams sent at once (DESIGN.md)
CEILING_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "num_key_value_heads": 1}


def trace_workload(args, vocab: int) -> list[Req]:
    trace = azure_trace()
    n = args.num_requests
    rng = np.random.default_rng(args.seed)
    ctx = np.clip(np.ceil(trace.context_tokens[:n] * args.context_scale), 1, args.max_context)
    gen = np.clip(np.ceil(trace.generated_tokens[:n] * args.generated_scale), 1, args.max_generated)
    arrivals = trace.arrival_s[:n] - trace.arrival_s[0]
    return [Req(float(a), rng.integers(3, vocab, int(c)).tolist(), int(g))
            for a, c, g in zip(arrivals, ctx, gen)]


def ceiling_workload(args, vocab: int, n: int) -> list[Req]:
    rng = np.random.default_rng(args.seed)
    return [Req(float(i), rng.integers(3, vocab, 16).tolist(), args.stream_tokens)
            for i in range(n)]


def schedule(reqs: list[Req], rate: float) -> list[float]:
    """Send times: the requests' gaps scaled to ``rate`` requests/s (0: all at once)."""
    if rate <= 0:
        return [0.0] * len(reqs)
    natural = len(reqs) / max(reqs[-1].arrival_s, 1e-9)
    return [r.arrival_s * natural / rate for r in reqs]


def measured(run, label: str, profile_dir: str | None):
    """``run()``'s summary with the CPU seconds each process spent (and, with
    ``profile_dir``, a py-spy profile of each Ray process)."""
    before = tree()
    profiler = Profiler(profile_dir, label) if profile_dir else None
    if profiler:
        with profiler:
            results, wall = run()
    else:
        results, wall = run()
    out = {**summarize(results, wall), "cpu_s": cpu_delta(before, tree())}
    if profiler:
        out["profile"] = profiler.summary()
    print(f"{label}: {out}", flush=True)
    return out


async def replay(reqs, times, send):
    t0 = time.perf_counter()

    async def one(req, at):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await send(req)

    results = await asyncio.gather(*(one(r, t) for r, t in zip(reqs, times)))
    return list(results), time.perf_counter() - t0


def ceiling_model(root: str) -> str:
    """The smoke decoder's tokenizer over a random Qwen2 of ``CEILING_SHAPE``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    from worker.models.sources import resolve_model

    smoke = resolve_model("smoke:decoder")
    base = AutoConfig.from_pretrained(smoke).to_dict()
    for key in ("layer_types", "head_dim", "architectures", "transformers_version"):
        base.pop(key, None)
    config = type(AutoConfig.from_pretrained(smoke))(**{**base, **CEILING_SHAPE})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    path = Path(root) / "smoke-ceiling"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smoke).save_pretrained(path)
    return str(path)


def engine_config(args, model: str):
    from worker import EngineConfig

    return EngineConfig(model=model, max_num_batched_tokens=args.budget,
                        num_kv_blocks=args.num_kv_blocks, max_model_len=2048)


def app_args(args, model: str) -> dict:
    cfg = engine_config(args, model)
    return {"models": [{"name": MODEL, "model": cfg.model, "engine": {
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "num_kv_blocks": cfg.num_kv_blocks, "max_model_len": cfg.max_model_len}}],
        "admission": {"max_wait_s": args.max_wait_s},
        "http": {"stream_transport": args.stream_transport}}


def runs(args, reqs_for) -> list[tuple[str, list[Req], list[float]]]:
    out = []
    for rate in [float(r) for r in args.rates.split(",")]:
        reqs = reqs_for(rate)
        out.append((str(rate), reqs, schedule(reqs, rate)))
    return out


def run_inprocess(args, model: str, plan) -> dict:
    from worker import Engine

    out = {}
    with Engine(engine_config(args, model)) as engine:
        send = engine_sender(engine)
        asyncio.run(replay(plan[0][1][:8], [0.0] * 8, send))  # warm-up
        for rate, reqs, times in plan:
            steps = engine.stats.num_steps
            out[rate] = measured(lambda r=reqs, t=times: asyncio.run(replay(r, t, send)),
                                 f"inprocess-rate{rate}", None)
            out[rate]["engine_steps"] = engine.stats.num_steps - steps
    return out


def run_http(args, model: str, plan) -> dict:
    if args.ray_mode == "throughput":  # what `packserve serve` runs (deployments/app/ray_env.py)
        from deployments.app import ray_env

        ray_env.apply(ray_env.throughput_env(local=True))  # before Ray is imported
    import ray
    from ray import serve

    from deployments import build_app
    from deployments.app.builder import deployment_name
    from tests.ray_cluster import free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="psbench-", dir="/tmp"),
             object_store_memory=1 << 30)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(args, model)), name="packserve", route_prefix="/")
    base = f"http://127.0.0.1:{port}/v1"
    client = args.client or ("lean" if args.mode == "ceiling" else "openai")
    make_sender = lean_sender if client == "lean" else http_sender
    out = {}
    loop = asyncio.new_event_loop()  # one loop for every call: Serve's handles bind to theirs
    try:
        async def go(batch, times):
            async with make_sender(base, MODEL, len(batch)) as send:
                return await replay(batch, times, send)

        async def replica_steps() -> int:
            replica = serve.get_deployment_handle(deployment_name(MODEL), "packserve")
            return (await replica.state.remote())["num_engine_steps"]

        loop.run_until_complete(go(plan[0][1][:8], [0.0] * 8))  # warm-up
        for rate, reqs, times in plan:
            steps = loop.run_until_complete(replica_steps())
            out[rate] = measured(lambda r=reqs, t=times: loop.run_until_complete(go(r, t)),
                                 f"http-rate{rate}", args.profile)
            out[rate]["engine_steps"] = loop.run_until_complete(replica_steps()) - steps
    finally:
        loop.run_until_complete(serve.shutdown_async())  # the handles' routers live on it
        loop.close()
        ray.shutdown()
    return out


def ratio_row(http: dict, inproc: dict) -> dict:
    """Serve against in-process for one rate: throughput, added TTFT p50, and TTFT p50 /
    p99 as ratios (the 200-streams target: ``ttft_p50_ratio`` <= ``TTFT_RATIO_TARGET`` at
    rate 0, ``--mode ceiling --num-streams 200``)."""

    def ratio(key):
        a, b = http.get(key), inproc.get(key)
        return a / b if a is not None and b else None

    row = {"throughput_ratio": ratio("generated_tokens_per_s"),
           "added_ttft_ms_p50": (http["ttft_ms_p50"] - inproc["ttft_ms_p50"]
                                 if http.get("ttft_ms_p50") is not None
                                 and inproc.get("ttft_ms_p50") is not None else None),
           "ttft_p50_ratio": ratio("ttft_ms_p50"), "ttft_p99_ratio": ratio("ttft_ms_p99")}
    row["ttft_ratio_target_met"] = (row["ttft_p50_ratio"] is not None
                                    and row["ttft_p50_ratio"] <= TTFT_RATIO_TARGET)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("trace", "ceiling"), default="trace")
    p.add_argument("--rates", default="2,0", help="offered requests/s, comma-separated; 0 = all at once")
    p.add_argument("--paths", default="inprocess,http", help="which paths to run")
    p.add_argument("--client", choices=("openai", "lean"), default=None,
                   help="the HTTP client (default: openai for trace, lean for ceiling)")
    p.add_argument("--stream-transport", choices=("channel", "serve_handle"), default="channel",
                   help="http.stream_transport of the app (serve_handle: one Ray object per "
                   "delta, the transport before the stream channel)")
    p.add_argument("--max-wait-s", type=float, default=0.0,
                   help="admission.max_wait_s (0: a full pool answers 429 at once)")
    p.add_argument("--ray-mode", choices=("default", "throughput"), default="default",
                   help="Ray Serve's settings for the HTTP path (throughput: what "
                   "`packserve serve` runs, deployments/app/ray_env.py)")
    p.add_argument("--num-requests", type=int, default=200, help="trace: requests")
    p.add_argument("--context-scale", type=float, default=0.125)
    p.add_argument("--max-context", type=int, default=256)
    p.add_argument("--generated-scale", type=float, default=0.125)
    p.add_argument("--max-generated", type=int, default=32)
    p.add_argument("--num-streams", type=int, default=256, help="ceiling: streams at rate 0")
    p.add_argument("--stream-tokens", type=int, default=128, help="ceiling: tokens per stream")
    p.add_argument("--light-requests", type=int, default=40, help="ceiling: requests at rate > 0")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", help="write py-spy profiles of every Ray process here")
    args = p.parse_args(argv)
    load_before = os.getloadavg()  # 1, 5, 15 min: other jobs on the machine show here
    from worker.models.smoke import DECODER_VOCAB_SIZE

    with tempfile.TemporaryDirectory(prefix="ps-ceiling-") as root:
        if args.mode == "ceiling":
            model = ceiling_model(root)
            n = {True: args.num_streams, False: args.light_requests}
            plan = runs(args, lambda r: ceiling_workload(args, DECODER_VOCAB_SIZE, n[r <= 0]))
        else:
            model, reqs = "smoke:decoder", trace_workload(args, DECODER_VOCAB_SIZE)
            plan = runs(args, lambda r: reqs)
        paths = args.paths.split(",")
        inproc = run_inprocess(args, model, plan) if "inprocess" in paths else {}
        http = run_http(args, model, plan) if "http" in paths else {}
    ratios = {rate: ratio_row(http[rate], inproc[rate]) for rate in inproc if rate in http}
    workload = ({"source": "azure_llm_conv_2023 (first requests, arrival order)",
                 "context_transform": f"ceil(context * {args.context_scale}) "
                                      f"clipped to [1, {args.max_context}]",
                 "generated_transform": f"ceil(generated * {args.generated_scale}) "
                                        f"clipped to [1, {args.max_generated}]",
                 "model": "smoke:decoder (random weights)"} if args.mode == "trace" else
                {"streams_at_saturation": args.num_streams, "prompt_tokens": 16,
                 "tokens_per_stream": args.stream_tokens,
                 "light_load_requests": args.light_requests,
                 "model": f"smoke decoder tokenizer, random Qwen2 {CEILING_SHAPE}"})
    payload = {"benchmark": f"serve_load/{args.mode}", "machine": machine_info(),
               "load_before": load_before, "args": vars(args), "workload": workload,
               "in_process": inproc, "http": http, "ratios": ratios}
    if args.out:
        write_json(args.out, payload)
    for rate, row in ratios.items():
        if None in (row["ttft_p50_ratio"], row["ttft_p99_ratio"], row["throughput_ratio"]):
            continue
        print(f"rate {rate}: TTFT p50 Serve {http[rate]['ttft_ms_p50']:.1f} ms / in-process "
              f"{inproc[rate]['ttft_ms_p50']:.1f} ms = {row['ttft_p50_ratio']:.2f}x "
              f"(p99 {http[rate]['ttft_ms_p99']:.1f} / {inproc[rate]['ttft_ms_p99']:.1f} ms = "
              f"{row['ttft_p99_ratio']:.2f}x; target p50 <= {TTFT_RATIO_TARGET}x), "
              f"throughput {row['throughput_ratio']:.0%}", flush=True)
    print(ratios)


if __name__ == "__main__":
    main()
