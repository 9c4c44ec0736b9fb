"""Fair steps: how long one heavy request holds up a 2-token probe, in-process.

The smoke decoder (``--model``) serves, one scenario at a time, a heavy request while
2-token probes (a 3-token prompt, ``max_tokens=2``, greedy) are sent one after another,
``--probe-gap`` seconds apart, until the heavy request is done:

- ``alone``: the probes only;
- ``echo_n16_logprobs20``: what ``/v1/completions`` with ``n=16, logprobs=20,
  echo=true`` asks of a replica (``deployments/http/openai_api.py``): the prompt scored
  (``score_async``: echo's prompt logprobs), then ``n`` streamed choices of the same
  prompt, each with ``logprobs=20`` (temperature 1);
- ``stops_10000``: one streamed request with 10,000 stop strings that never occur.

Reported per scenario: the probes' latency (median and max), the engine's step time
(median, p99, max, over the steps that ran while the heavy request did) and the heavy
request's own time; medians over ``--repeats`` runs. Then the sampler alone
(``sampler``): one greedy step of 256 rows over Qwen2.5's 151,936-token vocabulary with
0, 1, 16 or all rows asking ``logprobs=20`` (the fastest call of every repeat).

Each repeat runs in a fresh process. ``--baseline-commit C`` also runs commit C's code
(exported with ``git archive`` into a temporary folder, this file copied in), the two
code paths alternating repeat by repeat, so one run measures both side by side and a
load spike on this shared machine falls on both.

    python -m benchmarks.fair_steps --baseline-commit c9a0c0a \\
        --out benchmarks/results/fair_steps_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common
from benchmarks._env import machine_info

SCENARIOS = ("alone", "echo_n16_logprobs20", "stops_10000")
PROBE_PROMPT = [11, 12, 13]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class StepClock:
    """Wall time of every ``Engine.step`` (installed before the step loop starts)."""

    def __init__(self, engine):
        self.times: list[float] = []
        step = engine.step

        def timed():
            start = time.perf_counter()
            try:
                return step()
            finally:
                self.times.append(time.perf_counter() - start)

        engine.step = timed


async def _stream(engine, prompt, params) -> None:
    async for _ in engine.generate_stream(prompt, params):
        pass


async def _heavy(engine, scenario: str, args, repeat: int) -> None:
    from worker import SamplingParams

    # A new prompt each repeat: an earlier repeat's KV must not be in the prefix cache.
    prompt = [10 + (7 * i + 131 * repeat) % 4000 for i in range(args.prompt_len)]
    if scenario == "echo_n16_logprobs20":
        await engine.score_async([prompt])
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, logprobs=20,
                                ignore_eos=True)
        await asyncio.gather(*(_stream(engine, prompt, params) for _ in range(args.n)))
    elif scenario == "stops_10000":
        stops = tuple(f"<never {i}>" for i in range(10_000))
        params = SamplingParams(temperature=0, max_tokens=args.stop_max_tokens,
                                ignore_eos=True, stop=stops)
        await _stream(engine, prompt[:64], params)
    else:
        await asyncio.sleep(args.alone_s)


async def _scenario(engine, clock: StepClock, scenario: str, args, repeat: int) -> dict:
    from worker import SamplingParams

    probe = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    clock.times.clear()
    start = time.perf_counter()
    heavy = asyncio.ensure_future(_heavy(engine, scenario, args, repeat))
    latencies = []
    while not heavy.done():  # one probe at a time while the heavy request runs
        await asyncio.sleep(args.probe_gap)
        t = time.perf_counter()
        await engine.generate_async([PROBE_PROMPT], probe)
        latencies.append(time.perf_counter() - t)
    await heavy
    heavy_s = time.perf_counter() - start
    steps = list(clock.times)
    return {"probe_p50_s": statistics.median(latencies), "probe_max_s": max(latencies),
            "num_probes": len(latencies), "step_p50_s": _quantile(steps, 0.5),
            "step_p99_s": _quantile(steps, 0.99), "step_max_s": max(steps),
            "num_steps": len(steps), "heavy_s": heavy_s}


def measure_sampler(args) -> dict:
    """``Sampler.sample_rows`` on a greedy step of ``--sampler-rows`` rows over a
    ``--sampler-vocab`` vocabulary, with 0, 1, 16 and every row asking ``logprobs=20``:
    what one logprobs request adds to everyone's step (ms: the fastest of 5 calls, the
    figure a shared machine disturbs least, and their median)."""
    import numpy as np
    import torch

    from worker.generate.sampling import Sampler, SamplingParams, SamplingRows

    n = args.sampler_rows
    logits = torch.randn(n, args.sampler_vocab, generator=torch.Generator().manual_seed(0))
    sampler, rows, out = Sampler("cpu", n), np.arange(n, dtype=np.int64), {}
    for asking in sorted({0, 1, 16, n}):
        state = SamplingRows(n)
        for i in range(n):  # benchmark set-up
            state.set(i, SamplingParams(temperature=0, logprobs=20 if i < asking else None))
        sampler.sample_rows(logits, state, rows)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            sampler.sample_rows(logits, state, rows)
            times.append(time.perf_counter() - start)
        out[f"{asking}_asking_min_ms"] = min(times) * 1e3
        out[f"{asking}_asking_median_ms"] = statistics.median(times) * 1e3
    return out


def measure(args) -> dict:
    """The scenarios once (repeat ``--repeat``) on the ``worker`` this process imports."""
    from worker import Engine, EngineConfig, SamplingParams

    with Engine(EngineConfig(model=args.model)) as engine:
        clock = StepClock(engine)
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)

        async def run_all() -> dict:
            # Warm-up at the heavy request's sizes (a prompt no scenario shares).
            long = [4000 - (5 * i) % 3000 for i in range(args.prompt_len)]
            await engine.generate_async([[5, 6, 7], long], warm)
            await engine.score_async([long])
            return {s: await _scenario(engine, clock, s, args, args.repeat) for s in SCENARIOS}

        figures = asyncio.run(run_all())
    return {**figures, "sampler": measure_sampler(args)}


@contextlib.contextmanager
def _tree(commit: str | None):
    """The folder to run ``commit``'s code from: this checkout when None, else the
    commit exported by ``git archive`` (this file and the compiled packer copied in)."""
    root = _common.REPO_ROOT
    if commit is None:
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="fair_steps_") as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=root,
                                 capture_output=True, check=True).stdout
        tar_path = Path(tmp) / "tree.tar"
        tar_path.write_bytes(archive)
        with tarfile.open(tar_path) as tar:
            tar.extractall(Path(tmp) / "tree", filter="data")
        tree = Path(tmp) / "tree"
        shutil.copy(Path(__file__), tree / "benchmarks" / "fair_steps.py")
        for built in root.glob("packing_cy/*.so"):
            shutil.copy(built, tree / "packing_cy" / built.name)
        yield tree


def _child(tree: Path, argv: list[str], *extra: str) -> dict:
    """One measurement in a fresh process on ``tree``'s code (its last stdout line)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.fair_steps", *argv, *extra],
                         cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_all(args, argv: list[str]) -> dict:
    """Every code path, a fresh process per repeat, the paths alternating (so a load
    spike on this shared machine falls on both); medians over repeats."""
    paths = {"current": None}
    if args.baseline_commit:
        paths = {"baseline": args.baseline_commit, **paths}
    with contextlib.ExitStack() as stack:
        trees = {label: stack.enter_context(_tree(c)) for label, c in paths.items()}
        runs = {label: [] for label in paths}
        for repeat in range(args.repeats):
            for label, tree in trees.items():
                runs[label].append(_child(tree, argv, "--inner", "--repeat", str(repeat)))
    figures = {}
    for label, rs in runs.items():
        figures[label] = {s: {k: statistics.median(r[s][k] for r in rs) for k in rs[0][s]}
                          for s in SCENARIOS}
        figures[label]["sampler"] = {  # the fastest call of all repeats; median of medians
            k: (min if k.endswith("_min_ms") else statistics.median)(r["sampler"][k] for r in rs)
            for k in rs[0]["sampler"]}
    if args.baseline_commit:
        figures["baseline"] = {"commit": args.baseline_commit, **figures["baseline"]}
    figures["current"] = {"code": "this working tree (machine.git_commit plus any "
                                  "uncommitted changes)", **figures["current"]}
    return figures


def _print(label: str, figures: dict) -> None:
    for s in SCENARIOS:
        f = figures[s]
        print(f"{label:>8} {s:<20} probe p50 {f['probe_p50_s'] * 1e3:7.1f} ms, max "
              f"{f['probe_max_s'] * 1e3:7.1f} ms; step p50 {f['step_p50_s'] * 1e3:6.1f} ms, "
              f"p99 {f['step_p99_s'] * 1e3:7.1f} ms; heavy {f['heavy_s']:.2f} s")
    print(f"{label:>8} sampler, fastest ms per step by rows asking logprobs=20: " + ", ".join(
        f"{k.removesuffix('_asking_min_ms')}: {v:.1f}" for k, v in figures["sampler"].items()
        if k.endswith("_min_ms")))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smoke:decoder")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stop-max-tokens", type=int, default=256)
    p.add_argument("--probe-gap", type=float, default=0.05)
    p.add_argument("--alone-s", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampler-rows", type=int, default=256)
    p.add_argument("--sampler-vocab", type=int, default=151936)  # Qwen2.5's
    p.add_argument("--baseline-commit", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        print(json.dumps(measure(args)))
        return 0
    inner_argv = [a for a in argv if a not in ("--out", args.out, "--baseline-commit",
                                               args.baseline_commit)]
    load_before = os.getloadavg()
    result = {"machine": machine_info(),
              "command": " ".join(["python -m benchmarks.fair_steps", *argv]),
              "workload": {"model": args.model, "prompt_len": args.prompt_len, "n": args.n,
                           "max_tokens": args.max_tokens,
                           "stop_max_tokens": args.stop_max_tokens,
                           "sampler": {"rows": args.sampler_rows, "vocab": args.sampler_vocab},
                           "probe": {"prompt_len": len(PROBE_PROMPT), "max_tokens": 2},
                           "repeats": args.repeats},
              **_run_all(args, inner_argv)}
    result["load_average_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    for label in ("baseline", "current"):
        if label in result:
            _print(label, result[label])
    if args.out:
        _common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
