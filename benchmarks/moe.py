"""MoE layer benchmark: transformers' per-expert loop vs grouped_mm experts, one
Mixtral-shaped sparse-MoE block (router + experts) over the packed ``[T, hidden]`` rows.

| shape          | hidden | ffn    | experts | top-k | weights (bf16 / fp32)   |
|----------------|-------:|-------:|--------:|------:|-------------------------|
| ``mixtral-8x7b`` | 4,096 | 14,336 | 8       | 2     | 2.63 GiB bf16 (one layer) |
| ``cpu``        | 512    | 1,792  | 8       | 2     | 84 MiB fp32 (1/8 of each dim) |
| ``tiny``       | 64     | 224    | 4       | 2     | dry runs and tests      |

Weights and the router are N(0, 0.02), so routing is near-uniform (every expert is hit
from about 16 tokens on). Per token count T the two implementations alternate in one
run (two warm-up rounds, then ``--repeats`` rounds of loop, grouped), each call timed on
the wall clock to a synchronize; the result holds medians, the ratio loop / grouped, the
grouped output's relative L2 error against the loop's, and the start-up check
(``worker.models.moe.install_grouped_experts``) on a tiny Mixtral in the same device
and dtype. On the shared 2-vCPU VM the CPU run uses one thread: with two, an op waits
for its slower thread whenever another process holds a core, and medians swing 4x.

    python -m benchmarks.moe --device cpu --threads 1 --repeats 15 \
        --out benchmarks/results/moe_cpu.json
    python -m benchmarks.moe --device cuda --out benchmarks/results/h200/moe_h200.json
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

SHAPES = {
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8),
    "cpu": dict(hidden_size=512, intermediate_size=1792, num_local_experts=8),
    "tiny": dict(hidden_size=64, intermediate_size=224, num_local_experts=4),
}
TOP_K = 2
IMPLS = ("eager", "grouped_mm")  # transformers' names: the loop, grouped_mm
WARMUP_ROUNDS = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N]")
    p.add_argument("--shape", choices=SHAPES, help="default: mixtral-8x7b on CUDA, cpu on CPU")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", default="1,16,256,2048", help="comma list of T")
    p.add_argument("--repeats", type=int, help="timed rounds per T (default 20 CUDA, 5 CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("mixtral-8x7b" if cuda else "cpu")
    args.dtype = args.dtype or _common.default_dtype(args.device)
    args.repeats = args.repeats or (20 if cuda else 5)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if args.repeats < 1 or min(args.tokens) < 1:
        p.error(f"need --repeats >= 1 and every --tokens >= 1, got {args.repeats}, "
                f"{args.tokens}")
    return args


def build_block(shape: str, dtype, device: str):
    """A ``MixtralSparseMoeBlock`` of ``shape`` on ``device``; returns (block, config)."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(**SHAPES[shape], num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    with torch.device(device):
        block = MixtralSparseMoeBlock(config).to(dtype).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block, config


def time_tokens(block, config, num_tokens: int, repeats: int, device: str) -> dict:
    """Both implementations, alternating, over the same ``[1, T, hidden]`` input."""
    import torch

    weight = block.experts.gate_up_proj
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    hidden = torch.randn(1, num_tokens, config.hidden_size, generator=gen, device=device,
                         dtype=weight.dtype)
    seconds = {name: [] for name in IMPLS}
    outputs = {}
    with torch.inference_mode():
        _, _, index = block.gate(hidden[0])
        for rnd in range(WARMUP_ROUNDS + repeats):
            for name in IMPLS:
                config._experts_implementation = name
                _common.synchronize(device)
                start = time.perf_counter()
                outputs[name] = block(hidden)
                _common.synchronize(device)
                if rnd >= WARMUP_ROUNDS:
                    seconds[name].append(time.perf_counter() - start)
    want, got = outputs["eager"].float(), outputs["grouped_mm"].float()
    loop_ms, grouped_ms = (statistics.median(seconds[n]) * 1e3 for n in IMPLS)
    return {"tokens": num_tokens, "experts_hit": int(index.unique().numel()),
            "loop_ms": loop_ms, "grouped_ms": grouped_ms, "speedup": loop_ms / grouped_ms,
            "rel_error": float((got - want).norm() / want.norm()),
            "loop_ms_all": [s * 1e3 for s in seconds["eager"]],
            "grouped_ms_all": [s * 1e3 for s in seconds["grouped_mm"]]}


def startup_check(dtype, device: str) -> dict:
    """``install_grouped_experts`` on a tiny 2-layer Mixtral on this device and dtype."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from worker.models.moe import fused_kernel, install_grouped_experts

    config = MixtralConfig(**SHAPES["tiny"], num_experts_per_tok=TOP_K, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    num_layers = install_grouped_experts(model)
    return {"layers_on_grouped_mm": num_layers, "of_layers": config.num_hidden_layers,
            "fused_kernel": fused_kernel(torch.device(device), dtype)}


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    block, config = build_block(args.shape, dtype, args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in block.experts.parameters())
    result = {"benchmark": "moe", "shape": args.shape, **SHAPES[args.shape], "top_k": TOP_K,
              "dtype": args.dtype, "repeats": args.repeats,
              "expert_weights_gib": weight_bytes / 2**30,
              "environment": _common.environment(args.device),
              "torch_threads": torch.get_num_threads(),
              "check": startup_check(dtype, args.device), "configs": []}
    for num_tokens in args.tokens:
        result["configs"].append(time_tokens(block, config, num_tokens, args.repeats,
                                             args.device))
        _common.write_json(args.out, result)
    print_table(result)
    return result


def print_table(result: dict) -> None:
    check = result["check"]
    print(f"\nMoE block {result['shape']} ({result['dtype']}) on "
          f"{result['environment']['device_name']}; start-up check: "
          f"{check['layers_on_grouped_mm']}/{check['of_layers']} layers on grouped_mm, "
          f"fused kernel {check['fused_kernel']}")
    print(f"{'T':>6} {'hit':>4} {'loop ms':>9} {'grouped ms':>11} {'ratio':>7} {'rel err':>9}")
    for c in result["configs"]:
        print(f"{c['tokens']:>6} {c['experts_hit']:>4} {c['loop_ms']:>9.3f} "
              f"{c['grouped_ms']:>11.3f} {c['speedup']:>6.2f}x {c['rel_error']:>9.1e}")


if __name__ == "__main__":
    main()
