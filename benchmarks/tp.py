"""Tensor parallelism's cost per generation step: the same workload at 1 rank and at N,
in one run, and where rank 0's step time goes at N (issue 22).

    python -m benchmarks.tp --device cpu --out benchmarks/results/tp_cpu.json
    python -m benchmarks.tp --device cuda --tp 2 --shape qwen2.5-1.5b ...  # 2+ GPUs

The engine is the real one (``EngineConfig.tensor_parallel_size``): rank 0 schedules,
samples and broadcasts each step (``worker.parallel.steps``), the other ranks follow. The
workload: ``--num-seqs`` prompts of ``--prompt-len`` tokens, ``--max-tokens`` generated
each (greedy, EOS ignored), twice per rank count (the first is a warm-up). Rank 0's
time in the step broadcast and in the forward's collectives (all-reduces after the
attention and the MLP, the LM head's all-gather) is timed around each call, with a device
sync on CUDA, and reported per step. On a 2-core CPU the ranks share the cores, so no
speed-up is possible: what the CPU run measures is the overhead the design adds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks._common import environment


def _timed(fn, bucket: list, sync):
    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        bucket.append(time.perf_counter() - start)
        return out
    return wrapper


def run(model: str, device: str, tp: int, num_seqs: int, prompt_len: int, max_tokens: int,
        num_kv_blocks: int, budget: int) -> dict:
    import torch

    from worker import Engine, EngineConfig, SamplingParams
    from worker.parallel.group import TPGroup
    from worker.parallel.steps import StepSender

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list] = {"broadcast": [], "all_reduce": [], "all_gather": []}
    patched = [(StepSender, "send", "broadcast"), (TPGroup, "all_reduce_", "all_reduce"),
               (TPGroup, "all_gather_last", "all_gather")]
    originals = [(cls, name, getattr(cls, name)) for cls, name, _ in patched]
    for cls, name, key in patched:
        setattr(cls, name, _timed(getattr(cls, name), times[key], sync))
    try:
        engine = Engine(EngineConfig(model=model, device=device, tensor_parallel_size=tp,
                                     num_kv_blocks=num_kv_blocks, max_num_batched_tokens=budget,
                                     max_model_len=prompt_len + max_tokens + 16))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(10, 1000, prompt_len).tolist() for _ in range(num_seqs)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        rounds = []
        for _ in range(2):  # a warm-up, then the measured round
            for bucket in times.values():
                bucket.clear()
            steps0 = engine.stats.num_steps
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            wall = time.perf_counter() - start
            steps = engine.stats.num_steps - steps0
            rounds.append({"wall_s": wall, "steps": steps,
                           "tokens": sum(len(o.token_ids) for o in outs)})
        engine.shutdown()
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    last = rounds[-1]
    per_step = {k: 1e3 * sum(v) / last["steps"] for k, v in times.items()}
    return {"tp": tp, "wall_s": last["wall_s"], "steps": last["steps"],
            "ms_per_step": 1e3 * last["wall_s"] / last["steps"],
            "generated_tok_s": last["tokens"] / last["wall_s"],
            "rank0_ms_per_step": per_step,
            "collective_calls_per_step": {k: len(v) / last["steps"] for k, v in times.items()},
            "tokens": [o.token_ids for o in outs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smoke:decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < args.tp:
            print(f"SKIP: --tp {args.tp} needs {args.tp} GPUs, this machine has "
                  f"{torch.cuda.device_count()}")
            return 0
    runs = [run(args.model, args.device, tp, args.num_seqs, args.prompt_len, args.max_tokens,
                args.num_kv_blocks, args.budget) for tp in (1, args.tp)]
    one, many = runs
    result = {"benchmark": "tp", "environment": environment(args.device), "args": vars(args),
              "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
              "tokens_equal": one["tokens"] == many["tokens"],
              "step_ratio": many["ms_per_step"] / one["ms_per_step"]}
    for r in result["runs"]:
        comm = r["rank0_ms_per_step"]
        print(f"tp={r['tp']}: {r['steps']} steps, {r['ms_per_step']:.2f} ms/step, "
              f"{r['generated_tok_s']:,.0f} tok/s; rank 0 per step: broadcast "
              f"{comm['broadcast']:.2f} ms, all-reduce {comm['all_reduce']:.2f} ms "
              f"({r['collective_calls_per_step']['all_reduce']:.0f} calls), all-gather "
              f"{comm['all_gather']:.2f} ms")
    print(f"step time tp={args.tp} / tp=1: {result['step_ratio']:.2f}x; tokens equal: "
          f"{result['tokens_equal']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
