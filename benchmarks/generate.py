"""Offline generation throughput: ours vs HF ``generate`` (static padded batches) vs
transformers' continuous batching (``generate_batch``), same model, same device.

Workload: N requests drawn (seeded) from the Azure conversation trace, each with its
context length and its generated length; prompts are random token ids. Every system
generates exactly each request's generated length (EOS is ignored) greedily:

- ``ours``: ``Engine.generate`` over all requests at once (continuous batching, paged
  KV cache, chunked prefill packed with decodes);
- ``hf_static_b<B>``: ``model.generate`` on batches of B (each of ``--batch-sizes``) in
  arrival order, left padding, each batch running to its longest generated length
  (what a static batch must do); only the requested tokens count as generated;
- ``generate_batch``: transformers' continuous batching manager, every request added
  with its own ``max_new_tokens`` (so it does no more work than ours).

Timing is wall clock around each system's whole run, after a warm-up, device synced.
Generated tokens/s counts requested tokens only; total tokens/s adds the prompts. On CPU
with the ``tiny`` shape, context lengths are scaled by 1/8 and clipped to 256 tokens,
generated lengths scaled by 1/8 and clipped to 32 (the JSON says so), so a run takes a
few minutes on two cores.

    python -m benchmarks.generate --shape tiny --device cpu --num-requests 1024
    python -m benchmarks.generate --shape qwen2.5-1.5b --device cuda --num-requests 256 \
        --out benchmarks/results/generate_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common
from benchmarks.workloads import azure_trace

SYSTEMS = ("ours", "hf_static", "generate_batch")
CPU_DEFAULTS = {"context_scale": 0.125, "max_context": 256, "generated_scale": 0.125,
                "max_generated": 32, "num_requests": 1024, "step_tokens": 2048}
CUDA_DEFAULTS = {"context_scale": 1.0, "max_context": 4096, "generated_scale": 1.0,
                 "max_generated": 1024, "num_requests": 256, "step_tokens": None}


def workload_parser(description: str, shape: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark over the Azure sample takes (unset ones
    resolved by ``resolve_defaults``); generate, lora and fp8 add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", choices=sorted(_common.SHAPES), default=shape)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES)
    p.add_argument("--num-requests", type=int)
    p.add_argument("--context-scale", type=float)
    p.add_argument("--max-context", type=int)
    p.add_argument("--generated-scale", type=float)
    p.add_argument("--max-generated", type=int)
    p.add_argument("--step-tokens", type=int, help="our tokens per step (default: 2048 CPU; "
                   "CUDA: the probe's budget, capped at 8192 for generation)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = workload_parser(__doc__.split("\n\n")[0], "tiny")
    p.add_argument("--batch-sizes", default="8,32", help="hf_static batch sizes")
    p.add_argument("--max-running", type=int, default=256, help="our max_num_running_seqs")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--lower-bound", action="store_true", help="also measure the run's lower "
                   "bound (longest request's decode at the batch-1 step time + the prefill)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/generate_<device>.json)")
    args = resolve_defaults(p.parse_args(argv), CPU_DEFAULTS, CUDA_DEFAULTS)
    args.systems = [s for s in args.systems.split(",") if s]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if set(args.systems) - set(SYSTEMS) or not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error(f"--systems: choose from {', '.join(SYSTEMS)}; --batch-sizes: integers >= 1")
    dev = args.device.split(":")[0]
    args.out = Path(args.out or _common.REPO_ROOT / f"benchmarks/results/generate_{dev}.json")
    return args


def resolve_defaults(args: argparse.Namespace, cpu: dict, cuda: dict) -> argparse.Namespace:
    """``args`` with each unset workload option from ``cpu`` or ``cuda`` (by the device),
    and the device's default dtype."""
    for key, value in (cuda if args.device.startswith("cuda") else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or _common.default_dtype(args.device)
    return args


def sample_workload(args, vocab_size: int):
    """(prompts, generated lengths, description): seeded sample, arrival order kept."""
    trace = azure_trace()
    rng = np.random.default_rng(args.seed)
    picked = np.sort(rng.choice(len(trace.context_tokens), size=args.num_requests,
                                replace=False))
    ctx = np.clip(np.ceil(trace.context_tokens[picked] * args.context_scale), 1,
                  args.max_context).astype(np.int64)
    gen = np.clip(np.ceil(trace.generated_tokens[picked] * args.generated_scale), 1,
                  args.max_generated).astype(np.int64)
    prompts = [rng.integers(3, vocab_size, size=int(n)).tolist() for n in ctx]
    info = {"trace": "azure_llm_conv_2023", "num_requests": args.num_requests,
            "sample": f"seed {args.seed}, arrival order kept",
            "context_transform": f"ceil(context * {args.context_scale}) clipped to "
                                 f"[1, {args.max_context}]",
            "generated_transform": f"ceil(generated * {args.generated_scale}) clipped to "
                                   f"[1, {args.max_generated}]",
            "context_tokens": _stats(ctx), "generated_tokens": _stats(gen)}
    return prompts, gen.tolist(), info


def _stats(a: np.ndarray) -> dict:
    return {"sum": int(a.sum()), "mean": float(a.mean()), "p50": float(np.median(a)),
            "p99": float(np.percentile(a, 99)), "max": int(a.max())}


# ---- the three systems: each returns (outputs, extra info) --------------------------

def run_ours(engine, prompts, gens, *, latency: bool = False, lora=None):
    """``engine.generate`` over every request at once; with ``latency``, each request's
    TTFT (from the start of the run: all requests arrive at once) and TPOT percentiles,
    read from the time each sampled token is appended (a wrapper on the output processor,
    a dictionary update per token). ``lora``: each request's adapter (``Engine.generate``'s)."""
    from worker.generate.sampling import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=g, ignore_eos=True) for g in gens]
    processor = engine.generation.processor
    marks: dict[int, list[float]] = {}
    if latency:
        append = processor.append

        def timed_append(seq, sampled, i):  # per generated token: first and last times
            now = time.perf_counter()
            marks.setdefault(seq.seq_id, [now, now])[1] = now
            return append(seq, sampled, i)

        processor.append = timed_append
    start = time.perf_counter()
    try:
        outs = engine.generate(prompts, params, lora=lora)
    finally:
        processor.__dict__.pop("append", None)
    extra = {}
    if latency:
        ttft = np.array([marks[o.request_id][0] - start for o in outs])
        tpot = np.array([(marks[o.request_id][1] - marks[o.request_id][0])
                         / (len(o.token_ids) - 1) for o in outs if len(o.token_ids) > 1])
        extra = {"ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot)}
    return [o.token_ids for o in outs], extra


def _percentiles(a: np.ndarray) -> dict:
    if a.size == 0:
        return {}
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def lower_bound(engine, prompts, gens, device: str) -> dict:
    """A short run is bounded by its tail: the longest request's decode steps at the
    batch-1 step time, plus the whole prefill at the prefill rate, each measured here
    (prefill: every prompt with max_tokens 1; batch-1 step: one request generating 65
    tokens minus one generating 1, over 64)."""
    from worker.generate.sampling import SamplingParams

    def timed(token_lists, max_tokens):
        _common.synchronize(device)
        start = time.perf_counter()
        engine.generate(token_lists, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                    ignore_eos=True))
        return time.perf_counter() - start

    prefill_s = timed(prompts, 1)
    probe = [prompts[int(np.argsort([len(p) for p in prompts])[len(prompts) // 2])]]
    step_s = (timed(probe, 65) - timed(probe, 1)) / 64
    prompt_tokens = sum(map(len, prompts))
    bound = max(gens) * step_s + prefill_s
    return {"prefill_s": prefill_s, "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "batch1_step_ms": step_s * 1e3, "longest_generated": max(gens),
            "probe_context": len(probe[0]), "lower_bound_s": bound}


def run_hf_static(model, prompts, gens, batch_size: int, device: str):
    """Left-padded static batches in arrival order; each runs to its longest request."""
    import torch

    outs, padded_prompt, steps = [], 0, 0
    for i in range(0, len(prompts), batch_size):  # per static batch
        batch, want = prompts[i:i + batch_size], gens[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device),
                                 do_sample=False, max_new_tokens=max(want), pad_token_id=0)
        gen = out[:, width:].cpu().tolist()
        outs += [g[:n] for g, n in zip(gen, want)]
        padded_prompt += width * len(batch)
        steps += max(want)
    return outs, {"batch_size": batch_size, "padded_prompt_tokens": padded_prompt,
                  "generated_slots": steps * batch_size, "decode_steps": steps}


def run_generate_batch(model, prompts, gens, cb_kwargs: dict):
    """transformers' continuous batching, one ``max_new_tokens`` per request."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(gens), eos_token_id=-1,
                              pad_token_id=0)
    kwargs = _cb_config(cb_kwargs)
    results = {}
    with model.continuous_batching_context_manager(generation_config=config, block=True,
                                                   timeout=30, warmup=False, **kwargs) as cbm:
        for i, (p, g) in enumerate(zip(prompts, gens)):
            cbm.add_request(p, request_id=f"r{i}", max_new_tokens=int(g), eos_token_id=-1)
        while len(results) < len(prompts):
            result = cbm.get_result(timeout=5)
            if result is None:
                if not cbm.is_running():
                    raise RuntimeError("generate_batch's thread stopped early")
                continue
            if result.is_finished():
                results[result.request_id] = result.generated_tokens
    return [results[f"r{i}"] for i in range(len(prompts))], {"config": cb_kwargs}


def _cb_config(cb_kwargs: dict) -> dict:
    if not cb_kwargs:
        return {}
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return {"continuous_batching_config": ContinuousBatchingConfig(**cb_kwargs)}


# ---- harness ---------------------------------------------------------------------------

def timed(name: str, fn, warmup, device: str) -> tuple[dict, list | None]:
    """Warm up, then one timed run; an error is recorded, not raised."""
    entry, outputs = {"status": "ok"}, None
    try:
        warmup()
        _common.synchronize(device)
        start = time.perf_counter()
        outputs, extra = fn()
        _common.synchronize(device)
        entry.update(time_s=time.perf_counter() - start, **extra)
    except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others
        traceback.print_exc()
        entry = {"status": "error", "error": repr(exc)[:500]}
    print(f"[{name}] {entry['status']} {entry.get('time_s', 0):.2f}s", file=sys.stderr)
    return entry, outputs


def agreement(a: list | None, b: list | None) -> float | None:
    """Fraction of requests whose generated tokens are identical."""
    if a is None or b is None:
        return None
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main(argv=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from worker import Engine, EngineConfig

    args = parse_args(argv)
    path = _common.ensure_checkpoint(args.shape, args.dtype, args.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    model.generation_config.eos_token_id = None  # every system ignores EOS
    prompts, gens, workload = sample_workload(args, model.config.vocab_size)
    max_len = max(len(p) + g for p, g in zip(prompts, gens))
    engine = Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                 max_num_batched_tokens=args.step_tokens,
                                 max_num_running_seqs=args.max_running, max_model_len=max_len))
    cb_kwargs = {}
    if not args.device.startswith("cuda"):  # CPU: their memory sizing would take minutes
        gen = engine.generation  # same step budget and KV capacity as ours
        cb_kwargs = {"max_batch_tokens": gen.settings.max_num_batched_tokens,
                         "num_blocks": max(16, gen.cache.num_slots // 256), "page_size": 256}
    warm_p, warm_g = prompts[:4], [min(g, 4) for g in gens[:4]]
    result = {"benchmark": "generate", "shape": args.shape, "dtype": args.dtype,
              "environment": _common.environment(args.device),
              "torch_threads": torch.get_num_threads(), "workload": workload, "systems": {}}
    outputs = {}
    runs = {}
    if "hf_static" in args.systems:
        for b in args.batch_sizes:
            runs[f"hf_static_b{b}"] = (
                lambda b=b: run_hf_static(model, prompts, gens, b, args.device),
                lambda: run_hf_static(model, warm_p, warm_g, 4, args.device))
    runs |= {
        "generate_batch": (lambda: run_generate_batch(model, prompts, gens, cb_kwargs),
                           lambda: run_generate_batch(model, warm_p, warm_g, cb_kwargs)),
        "ours": (lambda: run_ours(engine, prompts, gens, latency=True),
                 lambda: run_ours(engine, warm_p, warm_g)),
    }
    # Ours last: on CUDA its KV cache takes what the probe found free, so the baselines
    # run (and release their caches) first.
    runs = {n: r for n, r in runs.items() if n in args.systems or n.startswith("hf_static")}
    for name in runs:  # per system, once
        entry, outputs[name] = timed(name, *runs[name], args.device)
        if entry["status"] == "ok":
            entry["generated_tokens_per_s"] = sum(gens) / entry["time_s"]
            entry["total_tokens_per_s"] = (sum(gens) + sum(map(len, prompts))) / entry["time_s"]
        result["systems"][name] = entry
        _common.write_json(args.out, result)  # partial results survive a time-out
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.lower_bound and result["systems"].get("ours", {}).get("status") == "ok":
        bound = lower_bound(engine, prompts, gens, args.device)
        bound["ours_vs_lower_bound"] = result["systems"]["ours"]["time_s"] / bound["lower_bound_s"]
        result["lower_bound"] = bound
    if engine._gen is not None:
        gen = engine._gen
        result["ours_settings"] = {**vars(gen.settings), "kv_blocks": gen.blocks.num_blocks,
                                   "paged_attention": gen.backend,
                                   "attention": engine.config.attention_backend,
                                   "cuda_graphs": None if gen.graph_report is None
                                   else vars(gen.graph_report),
                                   "graph_steps": gen.runner.num_graph_steps}
    result["steps_ours"] = engine.stats.num_steps
    result["ratios"] = ratios(result["systems"])
    result["agreement_with_ours"] = {n: agreement(outputs.get("ours"), outputs.get(n))
                                     for n in outputs if n != "ours"}
    engine.shutdown()
    _common.write_json(args.out, result)
    print_table(result)
    return result


def ratios(systems: dict) -> dict:
    ours = systems.get("ours", {}).get("generated_tokens_per_s")
    return {f"ours_vs_{name}": ours / entry["generated_tokens_per_s"]
            for name, entry in systems.items()
            if name != "ours" and ours and entry.get("generated_tokens_per_s")}


def print_table(result: dict) -> None:
    print(f"\n{result['shape']} {result['dtype']} on {result['environment']['device_name']}")
    print(f"{'system':<16}{'time s':>10}{'gen tok/s':>14}{'total tok/s':>14}")
    for name, e in result["systems"].items():
        if e["status"] != "ok":
            print(f"{name:<16}{e['status']:>10}")
            continue
        print(f"{name:<16}{e['time_s']:>10.2f}{e['generated_tokens_per_s']:>14,.0f}"
              f"{e['total_tokens_per_s']:>14,.0f}")
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.2f}x")
    ours = result["systems"].get("ours", {})
    for key in ("ttft_s", "tpot_s"):
        if ours.get(key):
            print(f"ours {key}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in ours[key].items()))
    if "lower_bound" in result:
        b = result["lower_bound"]
        print(f"lower bound {b['lower_bound_s']:.2f} s (prefill {b['prefill_s']:.2f} s, batch-1 "
              f"step {b['batch1_step_ms']:.2f} ms x {b['longest_generated']}): ours is "
              f"{b['ours_vs_lower_bound']:.2f}x it")
    print(f"agreement with ours (identical requests): {result['agreement_with_ours']}")


if __name__ == "__main__":
    main()
