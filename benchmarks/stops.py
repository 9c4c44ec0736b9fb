"""Stop strings: what matching costs per generated token, for 1 to 10,000 strings.

Two measurements, both on this machine's CPU:

- ``matcher``: the text of one request grows by a few characters per token (as a
  detokenizer makes it); each token, the rescan rule (every stop string searched over the
  whole text: what ``worker/generate/output.py`` did before) and the incremental matcher
  (``worker.generate.stops.StopStrings``) each check it, alternating, medians of repeats;
- ``engine``: the smoke decoder generates ``--batch`` requests of ``--max-tokens`` tokens
  (ignore_eos) with no stop strings, and again with 10,000 stop strings that never
  occur on one of them; wall time of the whole run, alternating, medians.

    python -m benchmarks.stops --out benchmarks/results/stops_cpu.json
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
from benchmarks._env import machine_info


def rescan(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def time_matcher(num_stops: int, num_tokens: int, chars_per_token: int = 5) -> dict:
    from worker.generate.stops import StopStrings

    stops = tuple(f"<never {i}>" for i in range(num_stops))
    texts = ["x" * (chars_per_token * (t + 1)) for t in range(num_tokens)]
    start = time.perf_counter()
    for text in texts:
        rescan(text, stops)
    old = time.perf_counter() - start
    matcher = StopStrings(stops)
    start = time.perf_counter()
    for text in texts:
        matcher.find(text)
    new = time.perf_counter() - start
    return {"rescan_us_per_token": old / num_tokens * 1e6,
            "incremental_us_per_token": new / num_tokens * 1e6}


def time_engine(engine, prompts, max_tokens: int, stops: tuple[str, ...]) -> float:
    from worker import SamplingParams

    plain = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    params = [plain] * len(prompts)
    if stops:
        params[0] = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                   stop=stops)
    start = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smoke:decoder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    counts = (1, 100, 10_000)
    matcher = {}
    for n in counts:
        runs = [time_matcher(n, 256) for _ in range(args.repeats)]
        matcher[n] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"matcher, {n} stop strings: rescan {matcher[n]['rescan_us_per_token']:.1f} us "
              f"per token, incremental {matcher[n]['incremental_us_per_token']:.1f} us")

    from worker import Engine, EngineConfig

    stops = tuple(f"<never {i}>" for i in range(10_000))
    with Engine(EngineConfig(model=args.model, max_num_running_seqs=args.batch)) as engine:
        prompts = [[5 + i, 6 + i, 7 + i] for i in range(args.batch)]
        time_engine(engine, prompts, 4, ())  # warm-up
        plain, heavy = [], []
        for _ in range(args.repeats):
            plain.append(time_engine(engine, prompts, args.max_tokens, ()))
            heavy.append(time_engine(engine, prompts, args.max_tokens, stops))
    result = {
        "machine": machine_info(), "command": " ".join(["python -m benchmarks.stops",
                                                        *(argv or sys.argv[1:])]),
        "matcher_256_tokens": matcher,
        "engine": {"model": args.model, "batch": args.batch, "max_tokens": args.max_tokens,
                   "no_stops_s": statistics.median(plain),
                   "one_request_10000_stops_s": statistics.median(heavy),
                   "ratio": statistics.median(heavy) / statistics.median(plain)},
    }
    e = result["engine"]
    print(f"engine: {e['no_stops_s']:.3f} s without stop strings, "
          f"{e['one_request_10000_stops_s']:.3f} s with 10,000 on one request "
          f"({e['ratio']:.2f}x)")
    if args.out:
        _common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
