"""Workloads shared by every benchmark: the Azure conversation trace and synthetic lengths."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

AZURE_CSV = Path(__file__).parent / "data" / "azure_llm_conv_2023.csv"


@dataclass(frozen=True)
class Trace:
    arrival_s: np.ndarray  # [n] float64, seconds since the first request
    context_tokens: np.ndarray  # [n] int64, prompt length
    generated_tokens: np.ndarray  # [n] int64, output length


def azure_trace(path: Path = AZURE_CSV) -> Trace:
    """The Azure LLM conversation trace (CC-BY-4.0, see benchmarks/data/README.md)."""
    stamps, ctx, gen = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # Seven fractional digits: trim to the six that datetime parses.
            stamps.append(datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp())
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    t = np.asarray(stamps)
    return Trace(t - t[0], np.asarray(ctx, np.int64), np.asarray(gen, np.int64))


def azure_context_lengths() -> np.ndarray:
    """Prompt lengths of the Azure trace in arrival order."""
    return azure_trace().context_tokens


def read_lengths(path: str | Path) -> np.ndarray:
    """One positive integer length per line (blank lines and # comments skipped)."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            value = int(line)
            if value <= 0:
                raise ValueError(f"{path}:{number}: length must be >= 1, got {value}")
            out.append(value)
    return np.asarray(out, np.int64)


def synthetic_lengths(kind: str, n: int, *, max_len: int, seed: int = 0) -> np.ndarray:
    """Synthetic prompt lengths in [1, max_len]: uniform, heavy_tailed (lognormal) or bimodal."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        lengths = rng.integers(1, max_len + 1, n)
    elif kind == "heavy_tailed":
        lengths = np.rint(rng.lognormal(mean=6.0, sigma=1.2, size=n))
    elif kind == "bimodal":
        short = rng.normal(120, 40, n)
        long = rng.normal(3000, 600, n)
        lengths = np.where(rng.random(n) < 0.7, short, long)
    else:
        raise ValueError(
            f"unknown synthetic workload {kind!r}; use uniform, heavy_tailed or bimodal"
        )
    return np.clip(lengths, 1, max_len).astype(np.int64)


def resample(lengths: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` lengths drawn with replacement from an empirical distribution."""
    return np.random.default_rng(seed).choice(lengths, size=n, replace=True)
