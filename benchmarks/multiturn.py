"""Multi-turn chat traffic: what prefix caching and prefix-aware routing buy.

Workload: ``--conversations`` synthetic conversations, all opening with one shared system
prompt (``--system-tokens``; ``--own-system``: one per conversation), each ``--turns``
turns long or up to the last turn that fits ``--max-model-len``; every turn's user message and
answer lengths are drawn (seeded) from the Azure trace's context and generated lengths,
scaled by ``--scale``. A turn's prompt is the whole conversation so far (system prompt,
earlier user turns and answers, the new user turn), as chat clients send it; its answer
(random token ids standing in for the model's text) is appended before the next turn.
Conversations run concurrently; the turns of one run one after another.

Modes:

- ``inprocess``: ``Engine.generate_stream`` with prefix caching on and off (TTFT p50/p99,
  generated tokens/s, tokens computed, the process's CPU seconds); plus the same work with
  every prompt replaced by random tokens of its length (``unique``: a 0% hit rate, where
  caching can only cost; its cost is best read in CPU seconds, which other processes'
  load hardly moves).
- ``serve``: the Serve app with ``--replicas`` CPU replicas of ``--serve-model`` (the
  smoke decoder: the ingress needs a tokenizer), ``prefix_aware`` vs ``free_budget``
  routing: the hit rate (``usage.prompt_tokens_details.cached_tokens`` over prompt
  tokens), TTFT and throughput, through the ``openai`` client.

    python -m benchmarks.multiturn --modes inprocess --out benchmarks/results/multiturn_cpu.json
    python -m benchmarks.multiturn --modes serve --replicas 4 --system-tokens 300 \
        --max-model-len 2048 --out benchmarks/results/multiturn_serve_cpu.json
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

from benchmarks import _common
from benchmarks.workloads import azure_trace


@dataclass(frozen=True)
class Conversation:
    system: list[int]
    users: list[list[int]]  # [turns][tokens]
    answers: list[int]  # [turns] answer lengths

    def prompt(self, turn: int, said: list[list[int]]) -> list[int]:
        """The prompt of ``turn``: the system prompt and every earlier turn."""
        out = list(self.system)
        for k in range(turn):
            out += self.users[k] + said[k]
        return out + self.users[turn]


def conversations(args, vocab: int) -> list[Conversation]:
    trace, rng = azure_trace(), np.random.default_rng(args.seed)
    system = rng.integers(3, vocab, size=args.system_tokens).tolist()
    out = []
    for c in range(args.conversations):  # per conversation
        picks = rng.choice(len(trace.context_tokens), size=args.turns)
        users = [rng.integers(3, vocab, size=max(1, int(n * args.scale))).tolist()
                 for n in trace.context_tokens[picks]]
        answers = [max(1, min(args.max_answer, int(n * args.scale)))
                   for n in trace.generated_tokens[picks]]
        if getattr(args, "own_system", False):  # every conversation its own system prompt
            system = rng.integers(3, vocab, size=args.system_tokens).tolist()
        # A conversation ends at the last turn whose prompt and answer fit max_model_len.
        size, turns = len(system), 0
        for user, answer in zip(users, answers):
            size += len(user) + answer
            if size > args.max_model_len:
                break
            turns += 1
        out.append(Conversation(system, users[:turns], answers[:turns]))
    return out


def _answer(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(3, vocab, size=n).tolist()


async def run_conversations(convs, send, vocab: int, seed: int, fresh: bool = False):
    """Every conversation concurrently, its turns in order; -> per-turn results, wall s.
    ``fresh``: each prompt replaced by random tokens of the same length (nothing shared:
    a 0% hit rate, the same work otherwise)."""
    results = []

    async def talk(i, conv):
        rng, said = np.random.default_rng((seed, i, 7)), []  # apart from conversations()
        for turn in range(len(conv.users)):  # per turn of this conversation
            prompt = conv.prompt(turn, said)
            if fresh:
                prompt = rng.integers(3, vocab, size=len(prompt)).tolist()
            results.append(await send(prompt, conv.answers[turn]))
            said.append(_answer(rng, conv.answers[turn], vocab))

    start = time.perf_counter()
    await asyncio.gather(*(talk(i, c) for i, c in enumerate(convs)))
    return results, time.perf_counter() - start


def attainable(convs, vocab: int, seed: int, block: int = 16) -> dict:
    """The most prompt tokens any router could find cached, replaying
    ``run_conversations``'s seeded answers: a turn can reuse the full blocks of its
    conversation's previous prompt (the answer it appends is not what the engine
    generated, so never cached), and a conversation's first turn the full blocks of a
    system prompt another conversation already sent."""
    total = cached = 0
    systems = set()
    for i, conv in enumerate(convs):
        rng, said, previous = np.random.default_rng((seed, i, 7)), [], None
        for turn in range(len(conv.users)):
            prompt = conv.prompt(turn, said)
            total += len(prompt)
            reusable = (len(previous) if previous is not None else
                        len(conv.system) if tuple(conv.system) in systems else 0)
            cached += min(reusable, len(prompt) - 1) // block * block
            systems.add(tuple(conv.system))
            previous = prompt
            said.append(_answer(rng, conv.answers[turn], vocab))
    return {"prompt_tokens": total, "cached_tokens": cached,
            "hit_rate": cached / total if total else 0.0}


def timed_run(convs, send, vocab: int, seed: int, fresh: bool = False):
    """``run_conversations`` -> (results, wall s, CPU s of this process: every thread,
    the engine's included; unlike wall time it hardly moves with other processes' load)."""
    cpu = time.process_time()
    results, wall = asyncio.run(run_conversations(convs, send, vocab, seed, fresh))
    return results, wall, time.process_time() - cpu


def summarize(results: list[dict], wall_s: float, cpu_s: float | None = None) -> dict:
    ttft = np.array([r["ttft_s"] for r in results])
    prompt = sum(r["prompt_tokens"] for r in results)
    cached = sum(r["cached_tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall_s, "cpu_s": cpu_s,
            "generated_tokens_per_s": sum(r["generated"] for r in results) / wall_s,
            "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3,
            "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
            "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0}


# ---- in-process ------------------------------------------------------------------------------

def engine_sender(engine):
    from worker.generate.sampling import SamplingParams

    async def send(prompt, answer_len):
        params = SamplingParams(temperature=0, max_tokens=answer_len, ignore_eos=True)
        start, first, n, cached = time.perf_counter(), None, 0, 0
        async for delta in engine.generate_stream(prompt, params):
            first = first or time.perf_counter()
            n += len(delta.token_ids)
            cached = delta.num_cached_tokens
        return {"ttft_s": first - start, "generated": n, "prompt_tokens": len(prompt),
                "cached_tokens": cached}

    return send


def cache_work_timer(engine) -> _common.CallTimer:
    """Times the prefix cache's own work (hashing blocks, looking prompts up, registering
    blocks) by wrapping those three calls of one engine."""
    gen, timer = engine.generation, _common.CallTimer()
    for obj, name in ((gen.scheduler, "_hashes"), (gen.blocks, "take_prefix"),
                      (gen.blocks, "register")):
        setattr(obj, name, timer.wrap(getattr(obj, name), name))
    return timer


def run_inprocess(args) -> dict:
    """Two engines, prefix caching on and off, alternating over ``--repeats`` rounds of
    both workloads (a new seed each round, so nothing is cached from an earlier round);
    each figure is the median over rounds (the machine's other load moves single runs)."""
    from worker import Engine, EngineConfig

    path = _common.ensure_checkpoint(args.shape, args.dtype, args.device)
    engines = {caching: Engine(EngineConfig(
        model=str(path), device=args.device, dtype=args.dtype,
        max_num_batched_tokens=args.step_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=caching))
        for caching in (True, False)}
    vocab = engines[True].spec.vocab_size
    cache_work = cache_work_timer(engines[True])
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):  # per round: every configuration once
        seed = args.seed + 1000 * rep
        for fresh in (False, True):
            convs = conversations(argparse.Namespace(**{**vars(args), "seed": seed}), vocab)
            for caching, engine in engines.items():
                name = ("unique_" if fresh else "") + ("cache_on" if caching else "cache_off")
                send = engine_sender(engine)
                asyncio.run(run_conversations(convs[:1], send, vocab, seed + 99, fresh=True))
                before, work = engine.stats.num_tokens, cache_work.total()
                results, wall, cpu = timed_run(convs, send, vocab, seed, fresh)
                run = summarize(results, wall, cpu) | {
                    "computed_tokens": engine.stats.num_tokens - before,
                    "cache_work_s": cache_work.total() - work if caching else 0.0}
                runs.setdefault(name, []).append(run)
                print(f"[inprocess {name} round {rep}] {run}", file=sys.stderr, flush=True)
    for engine in engines.values():
        engine.shutdown()
    out = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
           for name, rs in runs.items()}
    on, off = out["cache_on"], out["cache_off"]
    out["ratios"] = {
        "throughput_on_vs_off": on["generated_tokens_per_s"] / off["generated_tokens_per_s"],
        "ttft_p50_off_vs_on": off["ttft_p50_ms"] / on["ttft_p50_ms"],
        "unique_throughput_on_vs_off": (out["unique_cache_on"]["generated_tokens_per_s"]
                                        / out["unique_cache_off"]["generated_tokens_per_s"]),
        "unique_cpu_s_on_vs_off": (out["unique_cache_on"]["cpu_s"]
                                   / out["unique_cache_off"]["cpu_s"]),
        "unique_cache_work_share": (out["unique_cache_on"]["cache_work_s"]
                                    / out["unique_cache_on"]["wall_s"])}
    return out


# ---- over Serve --------------------------------------------------------------------------------

def http_sender(client, model: str):
    async def send(prompt, answer_len):
        start, first, n, usage = time.perf_counter(), None, 0, None
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=answer_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                first = first or time.perf_counter()
                n += 1
            if chunk.usage is not None:
                usage = chunk.usage
        cached = usage.prompt_tokens_details.cached_tokens if usage else 0
        return {"ttft_s": (first or time.perf_counter()) - start,
                "generated": usage.completion_tokens if usage else n,
                "prompt_tokens": len(prompt), "cached_tokens": cached}

    return send


def run_serve(args) -> dict:
    import openai
    import ray
    from ray import serve

    from deployments import build_app
    from tests.ray_cluster import free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.replicas + 2, num_gpus=args.replicas,
             include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="psbench-", dir="/tmp"),
             object_store_memory=1 << 30)
    from transformers import AutoConfig

    from worker.models.sources import resolve_model

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    path = resolve_model(args.serve_model)  # the ingress needs a tokenizer: the smoke decoder
    vocab = AutoConfig.from_pretrained(path).vocab_size
    out = {}
    try:
        for policy in ("prefix_aware", "free_budget"):
            app = {"models": [{"name": "m", "model": args.serve_model,
                               "num_replicas": args.replicas,
                               "num_gpus": 1, "engine": {
                                   "device": "cpu", "max_num_batched_tokens": args.step_tokens,
                                   "max_model_len": args.max_model_len,
                                   "num_kv_blocks": args.num_kv_blocks}}],
                   "router": {"policy": policy, "stats_period_s": 0.2}}
            serve.run(build_app(app), name="packserve", route_prefix="/")

            async def go(convs, seed):
                client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                            api_key="x", max_retries=0, timeout=600)
                async with client:
                    return await run_conversations(convs, http_sender(client, "m"), vocab,
                                                   seed)

            convs = conversations(args, vocab)
            results, wall = asyncio.run(go(convs, args.seed))
            out[policy] = summarize(results, wall)
            print(f"[serve {policy}] {out[policy]}", file=sys.stderr, flush=True)
            serve.delete("packserve")
    finally:
        serve.shutdown()
        ray.shutdown()
    out["attainable"] = best = attainable(convs, vocab, args.seed)
    if out.get("free_budget", {}).get("hit_rate"):
        missed = {p: out[p]["prompt_tokens"] - out[p]["cached_tokens"] for p in out
                  if p != "attainable"}
        out["ratios"] = {
            "hit_rate_prefix_aware_vs_free_budget":
                out["prefix_aware"]["hit_rate"] / out["free_budget"]["hit_rate"],
            "attainable_vs_free_budget": best["hit_rate"] / out["free_budget"]["hit_rate"],
            "prefix_aware_of_attainable": out["prefix_aware"]["cached_tokens"]
                / best["cached_tokens"],
            "free_budget_of_attainable": out["free_budget"]["cached_tokens"]
                / best["cached_tokens"],
            "uncached_tokens_free_budget_vs_prefix_aware":
                missed["free_budget"] / max(1, missed["prefix_aware"])}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="inprocess,serve")
    p.add_argument("--shape", default="small", choices=sorted(_common.SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--scale", type=float, default=0.125, help="Azure lengths x this (CPU)")
    p.add_argument("--max-answer", type=int, default=64)
    p.add_argument("--step-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--serve-model", default="smoke:decoder", help="serve mode's model spec")
    p.add_argument("--own-system", action="store_true", help="a system prompt per "
                   "conversation instead of one shared by all")
    p.add_argument("--repeats", type=int, default=3, help="in-process rounds (medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.dtype = args.dtype or _common.default_dtype(args.device)
    result = {"benchmark": "multiturn", "shape": args.shape, "dtype": args.dtype,
              "environment": _common.environment(args.device),
              "workload": {k: getattr(args, k) for k in (
                  "conversations", "turns", "system_tokens", "scale", "max_answer", "seed",
                  "own_system")}}
    for mode in args.modes.split(","):
        result[mode] = run_inprocess(args) if mode == "inprocess" else run_serve(args)
        _common.write_json(args.out, result)
    print_table(result)
    return result


def print_table(result: dict) -> None:
    for mode in ("inprocess", "serve"):
        if mode not in result:
            continue
        print(f"\n{mode} ({result['shape']}, {result['environment']['device_name']})")
        print(f"{'run':<18}{'gen tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'hit rate':>10}")
        for name, r in result[mode].items():
            if name == "ratios":
                continue
            if name == "attainable":
                print(f"{'attainable':<18}{'':>11}{'':>10}{'':>10}{r['hit_rate']:>10.1%}")
                continue
            print(f"{name:<18}{r['generated_tokens_per_s']:>11,.0f}{r['ttft_p50_ms']:>9.0f}ms"
                  f"{r['ttft_p99_ms']:>9.0f}ms{r['hit_rate']:>10.1%}")
        for key, value in result[mode].get("ratios", {}).items():
            print(f"{key}: {value:.2f}x")


if __name__ == "__main__":
    main()
