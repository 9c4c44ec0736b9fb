"""FP8 KV cache benchmark: KV capacity (blocks, tokens) with ``kv_cache_dtype`` auto vs
fp8 under the same memory budget, and (CUDA) decode tokens/s of one generation workload
with each.

Capacity: an engine per dtype plans its memory as it would serve (CUDA: the Phase-0
probe and the KV plan; CPU: the 1 GiB CPU cache cap), with ``max_model_len`` (the
shape's positions) x ``max_num_running_seqs`` (1,024) large enough that memory, not the
sequences, binds; nothing is allocated but the probe's. The
ratio should be the model dtype's itemsize (2 for bf16, 4 for fp32): the target is 2x
at the same budget (docs/DESIGN targets, "FP8").

Decode (CUDA only): ``--batch`` prompts of ``--context`` random tokens each, greedy,
``ignore_eos``; once with ``max_tokens=1`` (the prefill) and once with
``max_tokens=--steps``; decode tokens/s = batch x (steps - 1) / (the difference in time).
Both dtypes run on the same engine configuration, one after another.

    python -m benchmarks.kv_fp8 --device cuda --out benchmarks/results/h200/kv_fp8.json
    python -m benchmarks.kv_fp8 --device cpu --out /tmp/kv_fp8_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common

KV_DTYPES = ("auto", "fp8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", help="default qwen2.5-1.5b on CUDA, tiny on CPU")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES)
    p.add_argument("--batch", type=int, default=128, help="decode batch (CUDA)")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens (CUDA)")
    p.add_argument("--steps", type=int, default=64, help="tokens generated per request (CUDA)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("qwen2.5-1.5b" if args.cuda else "tiny")
    args.dtype = args.dtype or _common.default_dtype(args.device)
    return args


def _engine(args, path, kv_dtype: str, *, workload: bool):
    """The capacity engine (memory binds), or the decode workload's (``workload``)."""
    from worker import Engine, EngineConfig

    common = dict(model=str(path), device=args.device, dtype=args.dtype,
                  kv_cache_dtype=kv_dtype)
    if workload:
        return Engine(EngineConfig(**common, max_num_running_seqs=args.batch,
                                   max_model_len=args.context + args.steps + 16))
    longest = _common.SHAPES[args.shape]["max_position_embeddings"]
    budget = None if args.cuda else 4096  # CUDA: the probe's
    return Engine(EngineConfig(**common, max_num_batched_tokens=budget,
                               max_num_running_seqs=1024, max_model_len=longest))


def capacity(engine) -> dict:
    kv = engine.memory.kv
    return {"num_kv_blocks": kv.num_blocks, "capacity_tokens": engine.capacity_tokens,
            "kv_bytes_per_token": kv.spec.bytes_per_token,
            "storage_dtype": str(kv.spec.storage_dtype).removeprefix("torch."),
            "cache_gib": kv.cache_bytes / 2**30}


def decode_rate(engine, args) -> dict:
    """Decode tokens/s of the workload (module docstring); the backend that served it."""
    import numpy as np
    import torch

    from worker.generate.sampling import SamplingParams

    vocab = engine.spec.vocab_size
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab, (args.batch, args.context)).tolist()
    times = {}
    engine.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    for n in (1, args.steps):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        times[n] = time.perf_counter() - start
        assert all(len(o.token_ids) == n for o in outs)
    decode_s = times[args.steps] - times[1]
    gen = engine.generation
    return {"paged_backend": gen.backend, "graphs": gen.graph_report is not None,
            "kv_scales": gen.kv_scales_source, "prefill_s": times[1], "total_s": times[args.steps],
            "decode_tokens_per_s": args.batch * (args.steps - 1) / decode_s}


def _with_engine(args, path, kv_dtype: str, workload: bool, measure) -> dict:
    import torch

    engine = _engine(args, path, kv_dtype, workload=workload)
    try:
        return measure(engine)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if args.cuda:
            torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = _common.ensure_checkpoint(args.shape, args.dtype, args.device)
    result = {"benchmark": "kv_fp8", "shape": args.shape, "dtype": args.dtype,
              "environment": _common.environment(args.device), "runs": {}}
    for kv_dtype in KV_DTYPES:
        run = _with_engine(args, path, kv_dtype, False, capacity)
        if args.cuda:
            run |= {"workload_" + k: v for k, v in _with_engine(
                args, path, kv_dtype, True, lambda e: capacity(e) | decode_rate(e, args)
            ).items()}
        result["runs"][kv_dtype] = run
        print(f"[kv_fp8] {kv_dtype}: " + ", ".join(f"{k}={v}" for k, v in run.items()),
              file=sys.stderr)
    auto, fp8 = result["runs"]["auto"], result["runs"]["fp8"]
    result["block_ratio"] = fp8["num_kv_blocks"] / auto["num_kv_blocks"]
    if args.cuda:
        result["decode_speedup"] = (fp8["workload_decode_tokens_per_s"]
                                    / auto["workload_decode_tokens_per_s"])
    _common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
