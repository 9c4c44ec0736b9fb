"""Host-to-device copy bandwidth, pinned vs pageable host memory, 1 MiB .. 256 MiB.

Why: staging copies each packed bin to the GPU in one ``non_blocking`` transfer from
pinned memory; this measures what that buys over pageable memory on the machine.
Each size is copied ``--repeats`` times after one warm-up copy, timed with CUDA events
(device time) and wall clock around a synchronize; GB/s = 1e9 bytes per second.

On a machine without CUDA (``--device cpu``) it times host-to-host ``copy_`` instead,
marked as such, so the script can be dry-run anywhere; pinned memory needs CUDA.

    python benchmarks/h2d.py --device cuda --out benchmarks/results/h2d_cuda.json
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

MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a dry run")
    p.add_argument("--min-mib", type=int, default=1)
    p.add_argument("--max-mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(_common.REPO_ROOT / "benchmarks/results/h2d.json"))
    args = p.parse_args(argv)
    if args.min_mib < 1 or args.max_mib < args.min_mib or args.repeats < 1:
        p.error(f"need 1 <= --min-mib <= --max-mib and --repeats >= 1, got "
                f"{args.min_mib}, {args.max_mib}, {args.repeats}")
    return args


def sizes_mib(lo: int, hi: int) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def measure(src, dst, repeats: int, cuda: bool) -> dict:
    """One warm-up copy, then ``repeats`` timed copies of ``src`` into ``dst``."""
    import torch

    dst.copy_(src, non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
    device_s, wall_s = [], []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            device_s.append(start.elapsed_time(end) / 1e3)
        wall_s.append(time.perf_counter() - t0)
    nbytes = src.numel() * src.element_size()
    med_wall = statistics.median(wall_s)
    entry = {"wall_s_median": med_wall, "gb_per_s_wall": nbytes / med_wall / 1e9}
    if device_s:
        med_dev = statistics.median(device_s)
        entry.update(device_s_median=med_dev, gb_per_s=nbytes / med_dev / 1e9)
    else:
        entry["gb_per_s"] = entry["gb_per_s_wall"]
    return entry


def run(args) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    rows = []
    for mib in sizes_mib(args.min_mib, args.max_mib):
        n = mib * MIB
        dst = torch.empty(n, dtype=torch.uint8, device=args.device)
        row = {"mib": mib}
        for kind in ("pageable", "pinned"):
            if kind == "pinned" and not cuda:
                continue  # pin_memory=True raises without CUDA
            src = torch.ones(n, dtype=torch.uint8, pin_memory=(kind == "pinned"))
            row[kind] = measure(src, dst, args.repeats, cuda)
            del src
        if "pinned" in row:
            row["pinned_over_pageable"] = row["pinned"]["gb_per_s"] / row["pageable"]["gb_per_s"]
        rows.append(row)
        print(_row(row), file=sys.stderr)
        del dst
    return {"benchmark": "h2d", "environment": _common.environment(args.device),
            "what": "host-to-device copy" if cuda else "host-to-host copy_ (no CUDA: dry run)",
            "gb": "1e9 bytes", "repeats": args.repeats, "sizes": rows}


def _row(row: dict) -> str:
    text = f"{row['mib']:>5} MiB  pageable {row['pageable']['gb_per_s']:7.2f} GB/s"
    if "pinned" in row:
        text += (f"  pinned {row['pinned']['gb_per_s']:7.2f} GB/s"
                 f"  x{row['pinned_over_pageable']:.2f}")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    _common.write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
