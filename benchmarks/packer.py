"""Packer benchmark: ms per 1M sequences (Cython and Python), bins against the lower bound.

    python -m benchmarks.packer [--n 1000000] [--budget 16384] [--align 16]
                                [--lengths FILE] [--out benchmarks/results/packer.json]

Workloads: the Azure conversation trace's prompt lengths resampled to ``--n`` sequences,
plus uniform, heavy-tailed and bimodal synthetic lengths (or one ``--lengths`` file).
Each timing is the public ``pack`` (FFD plus the list of bins) of one implementation,
on one core; the Cython figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from packing_cy import _ffd, _ffd_py, lower_bound

from . import workloads
from ._env import machine_info


def _time_pack(impl, lengths, budget, align) -> tuple[float, list]:
    start = time.perf_counter()
    bins = impl.split(*impl.pack_flat(lengths, budget, align, 0))
    return time.perf_counter() - start, bins


def measure(name: str, lengths: np.ndarray, budget: int, align: int, repeat: int) -> dict:
    per_million = 1e6 / lengths.shape[0] * 1e3  # seconds for n -> ms per 1M
    cy_times = []
    for _ in range(repeat):
        seconds, bins = _time_pack(_ffd, lengths, budget, align)
        cy_times.append(seconds)
    py_seconds, py_bins = _time_pack(_ffd_py, lengths, budget, align)
    if len(py_bins) != len(bins) or not all(np.array_equal(a, b) for a, b in zip(bins, py_bins)):
        raise AssertionError(f"{name}: Cython and Python bins differ")

    aligned = (lengths + align - 1) // align * align
    bound = lower_bound(lengths, budget, align=align)
    cy_ms = statistics.median(cy_times) * per_million
    return {
        "workload": name,
        "num_seqs": int(lengths.shape[0]),
        "mean_len": float(lengths.mean()),
        "cython_ms_per_1m": round(cy_ms, 1),
        "cython_ms_per_1m_min": round(min(cy_times) * per_million, 1),
        "python_ms_per_1m": round(py_seconds * per_million, 1),
        "speedup": round(py_seconds * per_million / cy_ms, 1),
        "bins": len(bins),
        "lower_bound": bound,
        "bins_over_lower_bound": round(len(bins) / bound, 5),
        "fill_ratio_aligned": round(float(aligned.sum()) / (len(bins) * budget), 4),
        "fill_ratio_real": round(float(lengths.sum()) / (len(bins) * budget), 4),
    }


def build_workloads(args) -> dict[str, np.ndarray]:
    if args.lengths:
        return {args.lengths: workloads.read_lengths(args.lengths)}
    max_len = args.budget
    azure = np.clip(workloads.azure_context_lengths(), 1, max_len)
    return {
        "azure_conv": workloads.resample(azure, args.n, seed=0),
        "uniform": workloads.synthetic_lengths("uniform", args.n, max_len=4096, seed=1),
        "heavy_tailed": workloads.synthetic_lengths(
            "heavy_tailed", args.n, max_len=max_len, seed=2
        ),
        "bimodal": workloads.synthetic_lengths("bimodal", args.n, max_len=max_len, seed=3),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="sequences per workload")
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--align", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="Cython runs per workload")
    parser.add_argument("--lengths", help="file with one length per line, instead of the workloads")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    rows = [
        measure(name, lengths, args.budget, args.align, args.repeat)
        for name, lengths in build_workloads(args).items()
    ]
    result = {
        "benchmark": "packer",
        "budget": args.budget,
        "align": args.align,
        "machine": machine_info(),
        "results": rows,
    }
    header = (
        f"{'workload':14} {'cy ms/1M':>9} {'py ms/1M':>9} {'speedup':>8} {'bins':>8} "
        f"{'LB':>8} {'bins/LB':>8} {'fill':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['workload'][:14]:14} {r['cython_ms_per_1m']:9.1f} {r['python_ms_per_1m']:9.1f} "
            f"{r['speedup']:7.1f}x {r['bins']:8d} {r['lower_bound']:8d} "
            f"{r['bins_over_lower_bound']:8.4f} {r['fill_ratio_aligned']:6.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
