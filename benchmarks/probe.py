"""The budget report (``python -m worker.budget.cli``) for a benchmark shape's random
weights, built once by ``benchmarks/_common.py``:

    python -m benchmarks.probe --shape qwen2.5-7b --dtype bfloat16 [probe flags...]

Every flag but ``--shape`` goes to the worker's CLI unchanged.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import _common


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, help=f"one of {', '.join(_common.SHAPES)}")
    args, rest = p.parse_known_args(argv)
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--dtype", default="auto")
    known.add_argument("--device", default=None)
    flags, _ = known.parse_known_args(rest)
    import torch

    from worker.budget.cli import main as probe_main

    device = flags.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = flags.dtype if flags.dtype != "auto" else _common.default_dtype(device)
    path = _common.ensure_checkpoint(args.shape, dtype, device)
    return probe_main(["--model", str(path), *rest])


if __name__ == "__main__":
    sys.exit(main())
