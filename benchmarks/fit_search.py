"""The probe's token budget against the largest packed bin that really fits.

Runs the engine's Phase-0 probe (the engine's own settings: cap 0.90, 1 GiB margin,
clamp 65,536), then searches with real forwards (the probe's own synthetic packed
forward, ``ModelRunner.run_synthetic``) for the largest bin that runs without
out-of-memory: first the probe's unclamped estimate, growing by 25% while it fits,
then bisection between the largest fit and the smallest OOM until they are within
``--resolution`` or ``--time-limit`` runs out (the bracket is reported either way).
The probe should land below the largest fit by about the cap and margin it keeps.

    python benchmarks/fit_search.py --shape qwen2.5-7b --device cuda --dtype bfloat16 --out fit.json

``--device cpu`` is a dry run of the search loop (no memory to measure, no OOM: it stops
at ``--max-tokens``); the probe is then the configured budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(_common.SHAPES), default=None)
    src.add_argument("--model", help="a local checkpoint directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES)
    p.add_argument("--max-tokens", type=int, default=1 << 20, help="largest bin tried")
    p.add_argument("--resolution", type=float, default=0.02, help="stop when hi/lo - 1 <= this")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds for the search")
    p.add_argument("--out", default=str(_common.REPO_ROOT / "benchmarks/results/fit_search.json"))
    args = p.parse_args(argv)
    args.shape = args.shape or (None if args.model else "tiny")
    args.dtype = args.dtype or _common.default_dtype(args.device)
    return args


class Search:
    """Largest fitting size by growth then bisection; every attempt is recorded."""

    def __init__(self, run, align: int, max_tokens: int, resolution: float, deadline: float):
        self.run, self.align, self.max_tokens = run, align, max_tokens
        self.resolution, self.deadline = resolution, deadline
        self.lo, self.hi, self.attempts, self.stop = 0, None, [], None

    def try_size(self, n: int) -> bool:
        n = max(self.align, min(self.max_tokens, n // self.align * self.align))
        attempt = self.run(n)
        self.attempts.append(attempt)
        print(f"[fit] {n:>9} tokens: {'fits' if attempt['fits'] else 'OOM '} "
              f"{attempt['seconds']:.1f}s", file=sys.stderr)
        if attempt["fits"]:
            self.lo = max(self.lo, n)
        else:
            self.hi = n if self.hi is None else min(self.hi, n)
        return attempt["fits"]

    def search(self, start: int) -> None:
        n = start
        while self.hi is None:  # grow while it fits
            if self.lo >= self.max_tokens:
                self.stop = "reached --max-tokens"
                return
            if self._out_of_time():
                return
            self.try_size(n if self.lo < n else int(self.lo * 1.25) + self.align)
            n = 0
        while self.hi - self.lo > max(self.align, self.resolution * max(self.lo, 1)):
            if self._out_of_time():
                return
            self.try_size((self.lo + self.hi) // 2)
        self.stop = "resolution reached"

    def _out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            self.stop = "time limit"
            return True
        return False


def make_runner(engine, device: str):
    """``run(n) -> attempt``: one synthetic packed forward, OOM caught, peak recorded."""
    import torch

    from worker.core.memory import is_out_of_memory

    max_len = engine.config.max_model_len
    cuda = device.startswith("cuda")

    def run(n: int) -> dict:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start, fits = time.perf_counter(), True
        try:
            engine.runner.run_synthetic(n, min(max_len, n))
        except Exception as exc:  # anything but OOM is re-raised
            if not is_out_of_memory(exc):
                raise
            fits = False
        attempt = {"tokens": n, "fits": fits, "seconds": time.perf_counter() - start}
        if cuda:
            if fits:
                attempt["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            torch.cuda.empty_cache()
        return attempt

    return run


def probe(engine, args):
    """The engine's own probe settings, run over this engine (which has big staging)."""
    from worker.budget.cli import measure_engine
    from worker.budget.limits import probe_settings
    from worker.budget.probe import config_budget

    if not args.device.startswith("cuda"):
        from worker.core.config import CPU_DEFAULT_BUDGET

        return config_budget(CPU_DEFAULT_BUDGET, align=engine.config.align)
    base = dataclasses.replace(engine.config, max_num_batched_tokens=None)
    return measure_engine(engine, probe_settings(base, engine.config.max_model_len))


def main(argv=None) -> int:
    args = parse_args(argv)
    from worker import Engine, EngineConfig

    path = Path(args.model) if args.model else _common.ensure_checkpoint(
        args.shape, args.dtype, args.device)
    max_tokens = args.max_tokens // 16 * 16
    engine = Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                 max_num_batched_tokens=max_tokens))
    report = probe(engine, args)
    search = Search(make_runner(engine, args.device), engine.config.align, max_tokens,
                    args.resolution, time.monotonic() + args.time_limit)
    start = report.raw_budget_tokens or report.budget_tokens
    fitted = [p.num_tokens for p in report.warmup]
    search.lo = max(fitted, default=0)
    search.search(start)
    result = {
        "benchmark": "fit_search", "environment": _common.environment(args.device),
        "model": args.model or args.shape, "dtype": args.dtype,
        "probe": dataclasses.asdict(report) | {"lines": report.to_log_lines()},
        "probe_budget_tokens": report.budget_tokens,
        "probe_raw_budget_tokens": report.raw_budget_tokens,
        "largest_fit_tokens": search.lo, "smallest_oom_tokens": search.hi,
        "stop": search.stop, "attempts": search.attempts, "max_tokens": max_tokens,
    }
    if search.lo:
        if report.raw_budget_tokens is not None:
            result["raw_budget_over_largest_fit"] = report.raw_budget_tokens / search.lo
        result["budget_over_largest_fit"] = report.budget_tokens / search.lo
        if report.activation_bytes_per_token is not None:  # the fit's prediction, checked
            fit = [a for a in search.attempts if a["tokens"] == search.lo and a["fits"]]
            predicted = (report.weights_allocated_bytes + report.activation_fixed_bytes
                         + report.activation_bytes_per_token * search.lo)
            result["predicted_peak_bytes_at_largest_fit"] = predicted
            result["measured_peak_bytes_at_largest_fit"] = fit[0].get("peak_allocated_bytes") \
                if fit else None
    engine.shutdown()
    _common.write_json(args.out, result)
    print(f"probe budget {report.budget_tokens} (raw {report.raw_budget_tokens}); largest fit "
          f"{search.lo}; smallest OOM {search.hi}; stop: {search.stop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
