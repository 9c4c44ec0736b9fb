"""FP8 weights against the model dtype: prefill and decode throughput and weight bytes, on
the same Azure-shaped workload (``benchmarks/generate.py``'s sample), in one process.

Configurations: ``base`` (the checkpoint in ``--dtype``) and ``fp8`` (``quantization=
"fp8"``: per-channel e4m3 weights, per-token activations, ``torch._scaled_mm``). Each
round runs, per configuration, a prefill pass (every prompt, one generated token: prompt
tokens/s) and a generation pass (every request at once, EOS ignored: generated tokens/s);
rounds alternate the configurations, the first warms up and is dropped, medians reported.

On CPU this measures only that the path runs (torch's CPU ``_scaled_mm`` is a reference
implementation, slower than fp32 GEMMs); the figures that matter are the GPU's
(``benchmarks/gpu_suite.sh`` step ``fp8``).

    python -m benchmarks.fp8 --device cpu          # benchmarks/results/fp8_cpu.json
    python -m benchmarks.fp8 --device cuda --shape qwen2.5-1.5b --num-requests 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common
from benchmarks.generate import resolve_defaults, run_ours, sample_workload, workload_parser

CPU_DEFAULTS = {"context_scale": 0.125, "max_context": 256, "generated_scale": 0.125,
                "max_generated": 32, "num_requests": 64, "step_tokens": 2048}
CUDA_DEFAULTS = {"context_scale": 1.0, "max_context": 2048, "generated_scale": 0.5,
                 "max_generated": 128, "num_requests": 128, "step_tokens": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = workload_parser(__doc__.split("\n\n")[0], "small")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    return resolve_defaults(args, CPU_DEFAULTS, CUDA_DEFAULTS)


def weight_bytes(engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def main(argv=None) -> dict:
    import torch

    from worker import Engine, EngineConfig
    from worker.quant.fp8 import fp8_layers

    args = parse_args(argv)
    path = _common.ensure_checkpoint(args.shape, args.dtype, args.device)
    config = _common.shape_config(args.shape)
    prompts, gens, workload = sample_workload(args, config.vocab_size)
    max_len = max(len(p) + g for p, g in zip(prompts, gens))
    configs = {"base": None, "fp8": "fp8"}
    engines = {name: Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                         max_num_batched_tokens=args.step_tokens,
                                         max_model_len=max_len, quantization=q))
               for name, q in configs.items()}
    for e in engines.values():
        run_ours(e, prompts[:4], [2] * 4)
    runs = {name: [] for name in configs}
    ones = [1] * len(prompts)
    for round_ in range(args.repeats + 1):
        for name, e in engines.items():
            start = time.perf_counter()
            run_ours(e, prompts, ones)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            run_ours(e, prompts, gens)
            gen = time.perf_counter() - start
            if round_:
                runs[name].append({"prefill_s": prefill, "generate_s": gen})
    prompt_tokens = sum(len(p) for p in prompts)
    systems = {}
    for name, entries in runs.items():
        prefill = statistics.median(r["prefill_s"] for r in entries)
        gen = statistics.median(r["generate_s"] for r in entries)
        layers = fp8_layers(engines[name].runner.model)
        systems[name] = {"prefill_tokens_per_s": prompt_tokens / prefill,
                         "generated_tokens_per_s": sum(gens) / gen,
                         "weight_bytes": weight_bytes(engines[name]),
                         "fp8_layers": len(layers),
                         "fp8_mode": layers[0].mode if layers else None, "runs": entries}
    base = systems["base"]
    for entry in systems.values():
        entry["prefill_vs_base"] = entry["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        entry["generate_vs_base"] = (entry["generated_tokens_per_s"]
                                     / base["generated_tokens_per_s"])
        entry["weight_bytes_vs_base"] = entry["weight_bytes"] / base["weight_bytes"]
    for e in engines.values():
        e.shutdown()
    result = {"benchmark": "fp8", "shape": args.shape, "dtype": args.dtype,
              "environment": _common.environment(args.device),
              "torch_threads": torch.get_num_threads(), "workload": workload,
              "repeats": args.repeats, "systems": systems}
    if args.out:
        _common.write_json(args.out, result)
    print(f"\n{args.shape} {args.dtype} on {result['environment']['device_name']}")
    print(f"{'config':<6}{'prefill tok/s':>15}{'x':>7}{'gen tok/s':>12}{'x':>7}{'weights':>9}")
    for name, e in systems.items():
        print(f"{name:<6}{e['prefill_tokens_per_s']:>15,.0f}{e['prefill_vs_base']:>7.2f}"
              f"{e['generated_tokens_per_s']:>12,.0f}{e['generate_vs_base']:>7.2f}"
              f"{e['weight_bytes_vs_base']:>9.2f}")
    return result


if __name__ == "__main__":
    main()
