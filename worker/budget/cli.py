"""``python -m worker.budget.cli``: print the token budget report for a model on this machine.

    python -m worker.budget.cli --model PATH [--dtype bfloat16] [--device cuda]
    python -m benchmarks.probe --shape qwen2.5-7b --dtype bfloat16       # random weights

On CUDA without probe flags this is exactly what the engine does at start-up: it builds
``Engine(EngineConfig(...))`` and prints ``engine.budget_report``. With ``--cap``,
``--margin-gib``, ``--override``, ``--reserve-kv`` or ``--max-budget-tokens`` (which
``EngineConfig`` does not carry) it starts the engine with a fixed budget (no probe)
and runs ``measure_budget`` itself over the engine's synthetic packed forward.
On CPU nothing is measured: the budget comes from configuration. With
``--tensor-parallel-size N`` (CUDA) the engine starts its N ranks and reports the probe
that rank 0 drove and every rank measured (``worker.parallel.probe``).

Random weights of a benchmark shape: ``python -m benchmarks.probe --shape NAME`` builds
the checkpoint (``benchmarks/_common.py``) and runs this CLI on it (``worker/`` imports
nothing from ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from worker.budget.probe import ProbeSettings, config_budget, kv_bytes_per_token
from worker.budget.report import GIB, BudgetReport
from worker.core.config import CPU_DEFAULT_BUDGET, EngineConfig

_PROBE_FLAGS = ("cap", "margin_gib", "override", "reserve_kv", "max_budget_tokens")


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.budget.cli",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda if available)")
    p.add_argument("--align", type=int, default=16)
    p.add_argument("--budget", type=int, default=None,
                   help=f"the configured budget on CPU (default {CPU_DEFAULT_BUDGET})")
    p.add_argument("--cap", type=float, default=None, help="utilization cap (default 0.90)")
    p.add_argument("--margin-gib", type=float, default=None, help="margin (default 1 GiB)")
    p.add_argument("--override", type=int, default=None, help="skip measuring; use this budget")
    p.add_argument("--reserve-kv", action="store_true", default=None,
                   help="add KV bytes per token (generation)")
    p.add_argument("--max-budget-tokens", type=int, default=None)
    p.add_argument("--allow-untested-model", action="store_true",
                   help="probe a family the family matrix has not proven (docs/models.md)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks (one GPU each): the engine's own probe, measured on every rank")
    p.add_argument("--json", help="also write the report's fields to this file")
    return p.parse_args(argv)


def settings_from_args(args, base: ProbeSettings) -> ProbeSettings:
    """``base`` (the engine's settings) with the flags that were given."""
    changes = {"utilization_cap": args.cap, "override_tokens": args.override,
               "reserve_kv": args.reserve_kv, "max_budget_tokens": args.max_budget_tokens,
               "margin_bytes": None if args.margin_gib is None else int(args.margin_gib * GIB)}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def measure_engine(engine, settings: ProbeSettings, *, nvml=None, memory=None) -> BudgetReport:
    """The probe over an engine's loaded model, with ``settings`` instead of the engine's.

    The engine must have staging for ``settings.max_budget_tokens`` tokens (start it
    with ``max_num_batched_tokens`` at least that). ``nvml`` and ``memory`` default to
    the real readers of the engine's CUDA device (tests pass fakes).
    """
    from worker.budget.nvml import default_reader
    from worker.budget.probe import TorchCudaMemory, measure_budget

    index = engine.device.device.index or 0
    model, max_len = engine.runner.model, engine.config.max_model_len
    return measure_budget(
        lambda n: engine.runner.run_synthetic(n, min(max_len, n)),
        model_config=model.config, dtype_bytes=engine.spec.dtype.itemsize,
        nvml=nvml or default_reader(), memory=memory or TorchCudaMemory(index),
        device_index=index,
        settings=settings,
        parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )


def cpu_report(args, model: str) -> BudgetReport:
    from transformers import AutoConfig

    budget = args.budget or max(args.align, CPU_DEFAULT_BUDGET // args.align * args.align)
    cfg = AutoConfig.from_pretrained(model)
    dtype_bytes = {"float16": 2, "bfloat16": 2}.get(args.dtype, 4)
    print(f"device cpu: nothing is measured; the budget comes from configuration "
          f"(EngineConfig.max_num_batched_tokens, default {CPU_DEFAULT_BUDGET}): {budget} tokens")
    return config_budget(budget, align=args.align, kv_bytes=kv_bytes_per_token(cfg, dtype_bytes))


def cuda_report(args, model: str, device: str) -> BudgetReport:
    from worker.budget.limits import probe_settings
    from worker.engine.engine import Engine

    tp = getattr(args, "tensor_parallel_size", 1)
    config = EngineConfig(model=model, device=device, dtype=args.dtype, align=args.align,
                          allow_untested_model=args.allow_untested_model,
                          tensor_parallel_size=tp)
    if all(getattr(args, flag) is None for flag in _PROBE_FLAGS):
        with Engine(config) as engine:  # the engine's own start-up probe (every rank's)
            return engine.budget_report
    if tp > 1:
        raise SystemExit("--cap, --margin-gib, --override, --reserve-kv and --max-budget-tokens "
                         "probe one device; drop them, or --tensor-parallel-size")
    from transformers import AutoConfig

    max_len = AutoConfig.from_pretrained(model).max_position_embeddings
    settings = settings_from_args(args, probe_settings(config, max_len))
    staging = -(-settings.max_budget_tokens // args.align) * args.align  # a multiple of align
    fixed = dataclasses.replace(config, max_num_batched_tokens=staging)
    with Engine(fixed) as engine:
        return measure_engine(engine, settings)


def main(argv=None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model
    from transformers import AutoConfig

    from worker.models.families import describe

    print(describe(AutoConfig.from_pretrained(model)))
    if device == "cpu":
        report = cpu_report(args, model)
    else:
        report = cuda_report(args, model, device)
    print(f"model: {model}, dtype {args.dtype}, device {device}")
    print("\n".join(report.to_log_lines()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report) | {"lines": report.to_log_lines()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
