"""Multi-LoRA serving cost: generation throughput and TTFT with 0, 1, 8 and 32 adapters
(rank 16, on q/v and on every linear layer) against the base model, on the same
Azure-shaped workload (``benchmarks/generate.py``'s sample), in one process.

Configurations, each one ``Engine.generate`` over every request at once (arrival
together, greedy, EOS ignored), requests assigned to adapters round robin:

- ``base``: an engine without LoRA (the reference);
- ``lora0``: an engine with ``enable_lora`` serving base rows only (the wrapping's cost);
- ``<targets>_<n>``: ``n`` adapters (``max_loras = max(8, n)``, so all are resident and
  every step mixes them), ``targets`` ``qv`` or ``all``.

Runs alternate (every configuration once per round, in turn; a first, untimed round
warms every engine up) and the median is reported with every run, so drift on a shared
machine hits all alike. ``--kernels``
also times the grouped shrink/expand against the slot loop for growing row counts and
widths (the measurement behind grouped_mm in ``worker.lora.layers``).

    python -m benchmarks.lora --device cpu            # benchmarks/results/lora_cpu.json
    python -m benchmarks.lora --device cuda --shape qwen2.5-1.5b --num-requests 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common
from benchmarks.adapters import ALL_LINEAR, QV, write_adapter
from benchmarks.generate import resolve_defaults, run_ours, sample_workload, workload_parser

CPU_DEFAULTS = {"context_scale": 0.125, "max_context": 256, "generated_scale": 0.125,
                "max_generated": 32, "num_requests": 256, "step_tokens": 2048}
CUDA_DEFAULTS = {"context_scale": 1.0, "max_context": 4096, "generated_scale": 0.5,
                 "max_generated": 256, "num_requests": 256, "step_tokens": None}
TARGETS = {"qv": QV, "all": ALL_LINEAR}


def parse_args(argv=None) -> argparse.Namespace:
    p = workload_parser(__doc__.split("\n\n")[0], "small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", default="1,8,32", help="adapter counts")
    p.add_argument("--targets", default="qv,all")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one "
                   "untimed round that warms every engine up)")
    p.add_argument("--kernels", action="store_true", help="also time grouped_mm vs the loop")
    p.add_argument("--out")
    args = resolve_defaults(p.parse_args(argv), CPU_DEFAULTS, CUDA_DEFAULTS)
    args.adapters = [int(n) for n in args.adapters.split(",") if n]
    args.targets = [t for t in args.targets.split(",") if t]
    dev = args.device.split(":")[0]
    args.out = Path(args.out or _common.REPO_ROOT / f"benchmarks/results/lora_{dev}.json")
    return args


def kernel_times(device: str, dtype: str, hidden: int = 1024, rank: int = 16,
                 slots: int = 8, rows=(8, 32, 128, 512, 1024, 2048), reps: int = 20) -> list:
    """Seconds per shrink + expand of ``rows`` adapter rows over ``slots`` adapters."""
    import numpy as np
    import torch

    from worker.lora.layers import LoRARows, lora_delta

    dt = getattr(torch, dtype)
    a = torch.randn(slots, hidden, rank, device=device, dtype=dt) * 0.01
    b = torch.randn(slots, rank, hidden, device=device, dtype=dt) * 0.01
    out = []
    for n in rows:  # per row count
        x = torch.randn(n, hidden, device=device, dtype=dt)
        slot_of = np.arange(n) % slots
        entry = {"rows": n}
        for name, grouped in (("grouped_mm", True), ("loop", False)):  # alternate below
            entry[name] = []
        for _ in range(3):  # alternating rounds
            for name, grouped in (("grouped_mm", True), ("loop", False)):
                batch = LoRARows.of(slot_of, slots, device, grouped)
                lora_delta(x, a, b, batch)
                _common.synchronize(device)
                t = time.perf_counter()
                for _ in range(reps):
                    lora_delta(x, a, b, batch)
                _common.synchronize(device)
                entry[name].append((time.perf_counter() - t) / reps)
        entry = {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in entry.items()}
        entry["loop_vs_grouped"] = entry["loop"] / entry["grouped_mm"]
        out.append(entry)
    return out


def main(argv=None) -> dict:
    import torch

    from worker import Engine, EngineConfig

    args = parse_args(argv)
    path = _common.ensure_checkpoint(args.shape, args.dtype, args.device)
    config = _common.shape_config(args.shape)
    prompts, gens, workload = sample_workload(args, config.vocab_size)
    max_len = max(len(p) + g for p, g in zip(prompts, gens))
    root = Path(tempfile.mkdtemp(prefix="packserve-lora-bench-"))
    most = max(args.adapters)
    adapters = {t: [str(write_adapter(path, root / f"{t}{i}", r=args.rank, targets=TARGETS[t],
                                      seed=i)) for i in range(most)] for t in args.targets}

    def engine(targets: str | None, n: int):
        kw = {}
        if targets is not None:
            kw = {"enable_lora": True, "max_loras": max(8, n), "max_lora_rank": args.rank,
                  "lora_modules": tuple((f"{targets}{i}", adapters[targets][i])
                                        for i in range(n))}
        return Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                   max_num_batched_tokens=args.step_tokens,
                                   max_model_len=max_len, **kw))

    configs = {"base": (None, 0), "lora0": (args.targets[0], 0)}
    configs |= {f"{t}_{n}": (t, n) for t in args.targets for n in args.adapters}
    engines = {name: engine(*c) for name, c in configs.items()}
    loras = {name: None if not n else [f"{t}{i % n}" for i in range(len(prompts))]
             for name, (t, n) in configs.items()}
    for name, e in engines.items():  # warm-up: every adapter read and resident
        warm = min(len(prompts), max(4, configs[name][1]))
        run_ours(e, prompts[:warm], [2] * warm, lora=None if loras[name] is None
                 else loras[name][:warm])
    runs = {name: [] for name in configs}
    for round_ in range(args.repeats + 1):  # alternating: each configuration once per round
        for name, e in engines.items():  # round 0 warms every engine up and is dropped
            start = time.perf_counter()
            _, extra = run_ours(e, prompts, gens, latency=True, lora=loras[name])
            if round_:
                runs[name].append({"time_s": time.perf_counter() - start,
                                   "ttft_p50_s": extra["ttft_s"]["p50"],
                                   "ttft_p99_s": extra["ttft_s"]["p99"]})
    systems = {}
    for name, entries in runs.items():
        t = statistics.median(r["time_s"] for r in entries)
        systems[name] = {"adapters": configs[name][1], "targets": configs[name][0],
                         "time_s": t, "generated_tokens_per_s": sum(gens) / t,
                         "ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in entries),
                         "runs": entries}
    base = systems["base"]["generated_tokens_per_s"]
    for entry in systems.values():
        entry["throughput_vs_base"] = entry["generated_tokens_per_s"] / base
    e0 = engines[next(n for n in configs if configs[n][1])]
    result = {"benchmark": "lora", "shape": args.shape, "dtype": args.dtype, "rank": args.rank,
              "environment": _common.environment(args.device),
              "torch_threads": torch.get_num_threads(), "workload": workload,
              "repeats": args.repeats, "grouped_mm": e0.loras.grouped, "systems": systems}
    if args.kernels:
        result["kernels"] = [dict(k, hidden=h) for h in (256, 1024, 4096)
                             for k in kernel_times(args.device, args.dtype, hidden=h)]
    for e in engines.values():
        e.shutdown()
    _common.write_json(args.out, result)
    print(f"\n{args.shape} {args.dtype} rank {args.rank} on "
          f"{result['environment']['device_name']}")
    print(f"{'config':<10}{'gen tok/s':>12}{'vs base':>10}{'TTFT p50 s':>12}")
    for name, e in systems.items():
        print(f"{name:<10}{e['generated_tokens_per_s']:>12,.0f}{e['throughput_vs_base']:>10.3f}"
              f"{e['ttft_p50_s']:>12.3f}")
    for k in result.get("kernels", ()):
        print(f"kernel hidden {k['hidden']:>5} rows {k['rows']:>5}: grouped {k['grouped_mm'] * 1e6:8.0f} us, loop "
              f"{k['loop'] * 1e6:8.0f} us")
    return result


if __name__ == "__main__":
    main()
