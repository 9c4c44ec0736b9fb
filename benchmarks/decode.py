"""Decode-step benchmark: the time of one decode step next to its bandwidth floor (GPU),
and the host's share of a step (CPU).

A batch of B sequences with C cached tokens each is set up directly in the engine (KV
blocks allocated, the cache left as it is: attention costs the same whatever the
values), so a configuration takes seconds instead of a prefill of B x C tokens. Then
the engine steps (schedule, run, postprocess) for ``--steps`` decode steps after two
warm-up steps; every step ends by reading the sampled tokens back, so wall time per
step is the step's real time. The modes of a configuration run one after another on
the same batch, so each starts a few tokens (``steps + 2``) further on.

GPU, per shape, per (B, C), per mode: ``triton+graphs`` (the default engine),
``triton`` (eager), ``gather`` (the old path: the context copied to a scratch, K/V
repeated for GQA, ``varlen_attn``), plus each backend's attention alone for one layer.
The floor is (weight bytes read + KV bytes read) / the GPU's nominal bandwidth:
weights once per step (an untied input embedding reads only B rows), and every cached
token's K and V in every layer.

CPU (``--device cpu``, tiny shape): host time per step split into schedule, stage
(rows, staging, copy), postprocess, and the forward + sampler it excludes; medians over
the timed steps.

    python -m benchmarks.decode --device cuda --out benchmarks/results/h200/decode_h200.json
    python -m benchmarks.decode --device cpu --out benchmarks/results/decode_cpu.json
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

NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, HBM, SXM
GPU_MODES = ("triton+graphs", "triton", "gather")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", help="comma list (default: qwen2.5-1.5b,qwen2.5-7b on CUDA, "
                   "tiny on CPU)")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES)
    p.add_argument("--batches", default="1,16,64,128,256")
    p.add_argument("--contexts", help="cached tokens per sequence (default 1024,8192 on "
                   "CUDA, 1024 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per config")
    p.add_argument("--modes", default=",".join(GPU_MODES), help="CUDA only")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shapes = (args.shapes or ("qwen2.5-1.5b,qwen2.5-7b" if cuda else "tiny")).split(",")
    args.dtype = args.dtype or _common.default_dtype(args.device)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in (args.contexts or ("1024,8192" if cuda else "1024"))
                     .split(",")]
    args.modes = [m for m in args.modes.split(",") if m] if cuda else ["eager"]
    return args


# ---- a decode batch, set up in place -----------------------------------------------------

def fake_running(gen, batch: int, context: int, max_tokens: int, vocab: int, seed: int = 0):
    """``batch`` running sequences whose first ``context - 1`` tokens are "cached" (blocks
    allocated, nothing computed): the next step is a decode of token ``context - 1``.
    Benchmark-only: it reaches into the scheduler to skip the prefill."""
    from worker.generate.sampling import SamplingParams
    from worker.generate.sequence import SeqStatus

    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    seqs = []
    for _ in range(batch):  # setup, once per configuration
        seq = gen.make_sequence(rng.integers(3, vocab, size=context).tolist(), params)
        gen.submit(seq)
        seqs.append(seq)
    gen._drain_intake()
    sched = gen.scheduler
    for seq in seqs:
        sched.waiting.remove(seq)
        gen.blocks.allocate(seq.seq_id, context - 1)
        seq.num_computed, seq.status = context - 1, SeqStatus.RUNNING
        sched.running.append(seq)
    return seqs


def clear(gen, seqs) -> None:
    for seq in seqs:
        gen.abort(seq.seq_id)


class Timers:
    """Wall time spent in wrapped callables, by name (host time: a CUDA call returns once
    its kernels are queued)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()


def time_steps(engine, gen, steps: int, timers: Timers) -> dict:
    """Two warm-up steps, then ``steps`` timed ones -> ms per step (mean) and the host
    split (medians over the steps: robust to another process taking the CPU)."""
    for _ in range(2):
        engine.step()
    _common.synchronize(str(gen.device.device))
    per_step = []
    start = time.perf_counter()
    for _ in range(steps):  # per timed step: its own breakdown
        timers.reset()
        engine.step()
        per_step.append(dict(timers.seconds))
    total = (time.perf_counter() - start) / steps

    def median(key):
        return float(np.median([t.get(key, 0.0) for t in per_step])) * 1e3

    inside = [t.get("forward", 0.0) + t.get("sample", 0.0) + t.get("graph", 0.0)
              for t in per_step]
    stage = [max(0.0, t.get("run", 0.0) - x) for t, x in zip(per_step, inside)]
    host = [t.get("schedule", 0.0) + st + t.get("postprocess", 0.0)
            for t, st in zip(per_step, stage)]
    return {"ms_per_step": total * 1e3,
            "host_ms": {"schedule": median("schedule"), "stage": float(np.median(stage)) * 1e3,
                        "postprocess": median("postprocess")},
            "host_ms_total": float(np.median(host)) * 1e3,
            "host_ms_min": float(np.min(host)) * 1e3,
            "forward_and_sample_ms": float(np.median(inside)) * 1e3}


def instrument(gen) -> Timers:
    timers = Timers()
    timers.wrap(gen, "schedule", "schedule")
    timers.wrap(gen, "run", "run")
    timers.wrap(gen, "postprocess", "postprocess")
    timers.wrap(gen.runner, "forward", "forward")
    timers.wrap(gen.runner.sampler, "sample_rows", "sample")
    if gen.runner.graphs is not None:
        timers.wrap(gen.runner.graphs, "run", "graph")
    return timers


# ---- floors --------------------------------------------------------------------------------

def weight_bytes_read(model, batch: int) -> int:
    """Parameter bytes a decode step reads: all of them, except that an untied input
    embedding is read only at the batch's rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if emb is not model.get_output_embeddings().weight:
        total -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    return total


def nominal_bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in device_name), None)


def measured_bandwidth(device: str) -> float:
    """Device-to-device copy of 2 GiB, best of 5: bytes read + written per second."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * (2 << 30) / best


def attention_alone(gen, backend: str, batch: int, context: int, iters: int = 20) -> float:
    """ms of one layer's paged attention for a decode step of the running batch."""
    import torch

    from worker.attention import paged as pa

    seqs = gen.scheduler.running
    meta = pa.build_metadata([gen.blocks.block_table(s.seq_id) for s in seqs],
                             [s.num_computed for s in seqs], [1] * len(seqs),
                             gen.blocks.block_size, gen.device.device,
                             with_context_slots=backend == "gather")
    cfg = gen.runner.model.config
    spec = gen.cache.spec
    q = torch.randn(len(seqs), cfg.num_attention_heads, spec.head_dim, dtype=spec.dtype,
                    device=gen.device.device)
    fn = pa._BACKENDS[backend]
    scale = spec.head_dim ** -0.5
    for _ in range(2):
        fn(q, gen.cache.key(0), gen.cache.value(0), meta, scale, None)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(q, gen.cache.key(0), gen.cache.value(0), meta, scale, None)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


# ---- runs ------------------------------------------------------------------------------------

def run_shape(args, shape: str) -> dict:
    import torch

    from worker import Engine, EngineConfig

    cuda = args.device.startswith("cuda")
    path = _common.ensure_checkpoint(shape, args.dtype, args.device)
    max_ctx, max_batch = max(args.contexts), max(args.batches)
    grow = len(args.modes) * (args.steps + 2) + 2  # tokens each sequence gains in a config
    max_len = max_ctx + grow + 8
    engine = Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                 max_num_batched_tokens=max(2048, max_batch),
                                 max_num_running_seqs=max_batch, max_model_len=max_len))
    gen = engine.generation
    timers = instrument(gen)
    graphs = gen.runner.graphs
    model = gen.runner.model
    spec = gen.cache.spec
    entry = {"shape": shape, "paged_backend": gen.backend, "kv_blocks": gen.blocks.num_blocks,
             "graphs": None if gen.graph_report is None else vars(gen.graph_report),
             "kv_bytes_per_token": spec.bytes_per_token, "configs": []}
    bandwidth = None
    if cuda:
        name = torch.cuda.get_device_name(torch.device(args.device))
        bandwidth = nominal_bandwidth(name)
        entry.update(nominal_bandwidth=bandwidth, measured_copy_bandwidth=measured_bandwidth(
            args.device))
    for context in args.contexts:
        for batch in args.batches:  # per configuration
            cfg = {"batch": batch, "context": context}
            need = batch * -(-(context + grow) // gen.blocks.block_size)
            if need > gen.blocks.num_blocks:
                cfg["status"] = f"skipped: needs {need} KV blocks, the cache has " \
                                f"{gen.blocks.num_blocks}"
                entry["configs"].append(cfg)
                print(f"[{shape}] b={batch} ctx={context}: {cfg['status']}", file=sys.stderr)
                continue
            seqs = fake_running(gen, batch, context, grow, model.config.vocab_size)
            if cuda:
                read = weight_bytes_read(model, batch) + batch * context * spec.bytes_per_token
                cfg["bytes_read"] = read
                if bandwidth:
                    cfg["floor_ms"] = read / bandwidth * 1e3
            cfg["modes"] = {}
            for mode in args.modes:
                cfg["modes"][mode] = run_mode(engine, gen, mode, graphs, timers, args)
                if cuda and cfg.get("floor_ms") and "ms_per_step" in cfg["modes"][mode]:
                    cfg["modes"][mode]["x_floor"] = (cfg["modes"][mode]["ms_per_step"]
                                                     / cfg["floor_ms"])
            if cuda:
                cfg["attention_ms"] = {}
                for backend in ("triton", "gather"):
                    try:
                        cfg["attention_ms"][backend] = attention_alone(gen, backend, batch,
                                                                       context)
                    except Exception as exc:  # noqa: BLE001 - an OOM here loses one figure
                        cfg["attention_ms"][backend] = repr(exc)[:200]
                        torch.cuda.empty_cache()
            clear(gen, seqs)
            entry["configs"].append(cfg)
            print(f"[{shape}] b={batch} ctx={context}: " + ", ".join(
                f"{m} {r.get('ms_per_step', float('nan')):.2f} ms"
                for m, r in cfg["modes"].items()), file=sys.stderr)
    engine.shutdown()
    del engine, gen, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return entry


def run_mode(engine, gen, mode: str, graphs, timers: Timers, args) -> dict:
    """Set the runner to ``mode`` and time decode steps of the running batch."""
    import torch

    runner = gen.runner
    if mode.startswith("triton") and gen.backend != "triton":
        return {"status": f"skipped: the engine's paged backend is {gen.backend}"}
    if mode == "triton+graphs" and graphs is None:
        return {"status": "skipped: no CUDA graphs (capture failed or disabled)"}
    runner.backend = "gather" if mode == "gather" else gen.backend
    runner.graphs = graphs if mode == "triton+graphs" else None
    try:
        return time_steps(engine, gen, args.steps, timers)
    except Exception as exc:  # noqa: BLE001 - out of memory for one mode must not end the run
        traceback.print_exc()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"status": "error", "error": repr(exc)[:300]}
    finally:
        runner.backend, runner.graphs = gen.backend, graphs


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    result = {"benchmark": "decode", "dtype": args.dtype, "steps": args.steps,
              "environment": _common.environment(args.device),
              "torch_threads": torch.get_num_threads(), "shapes": []}
    for shape in args.shapes:
        try:
            result["shapes"].append(run_shape(args, shape))
        except Exception as exc:  # noqa: BLE001 - one shape failing must not lose the other
            traceback.print_exc()
            result["shapes"].append({"shape": shape, "status": "error", "error": repr(exc)[:500]})
        _common.write_json(args.out, result)
    print_table(result)
    return result


def print_table(result: dict) -> None:
    print(f"\ndecode steps on {result['environment']['device_name']}")
    for entry in result["shapes"]:
        if "configs" not in entry:
            print(f"{entry['shape']}: {entry.get('error')}")
            continue
        print(f"{entry['shape']} (paged attention: {entry['paged_backend']})")
        for cfg in entry["configs"]:
            if "modes" not in cfg:
                print(f"  b={cfg['batch']:<4} ctx={cfg['context']:<6} {cfg['status']}")
                continue
            floor = cfg.get("floor_ms")
            parts = [f"floor {floor:.2f} ms" if floor else ""]
            for mode, r in cfg["modes"].items():
                if "ms_per_step" in r:
                    x = f" ({r['x_floor']:.1f}x)" if "x_floor" in r else ""
                    parts.append(f"{mode} {r['ms_per_step']:.2f} ms{x}, host "
                                 f"{r['host_ms_total']:.2f} ms")
                else:
                    parts.append(f"{mode} {r.get('status')}")
            for backend, ms in cfg.get("attention_ms", {}).items():
                if isinstance(ms, float):
                    parts.append(f"attn[{backend}] {ms:.3f} ms")
            print(f"  b={cfg['batch']:<4} ctx={cfg['context']:<6} " + "; ".join(p for p in parts
                                                                             if p))


if __name__ == "__main__":
    main()
