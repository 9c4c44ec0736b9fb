"""Structured-output overhead: generated tokens/s at batch 64 with and without a JSON
schema constraint, and the host time of the grammar masks per step.

One in-process engine (the smoke decoder: it has the fast tokenizer llguidance needs),
``--batch`` prompts at once. The constrained run goes first (temperature 1, seeded,
``response_format``-style JSON schema); the unconstrained run then generates exactly as
many tokens per request (``ignore_eos``, ``max_tokens`` = the constrained output's
length), so both runs do the same model work and differ only by the constraint. Modes
alternate for ``--repeats`` rounds; medians, of wall time and of the process's CPU
seconds (every thread, llguidance's included; steadier on a shared machine). Mask time is what ``Grammars.fill`` (llguidance computing
the allowed tokens) and ``apply_bitmask`` (setting the others to -inf) take per step (timed by wrapping them), next to the whole step.

    python -m benchmarks.structured --out benchmarks/results/structured_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common

SCHEMA = {  # long enough outputs to reach steady decode, bounded so they finish
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "label": {"enum": ["alpha", "beta", "gamma", "delta"]},
        "scores": {"type": "array", "minItems": 8, "maxItems": 16,
                   "items": {"type": "integer", "minimum": 0, "maximum": 999}},
        "note": {"type": "string", "maxLength": 24},
    },
    "required": ["id", "label", "scores", "note"], "additionalProperties": False,
}


def mask_timer(engine) -> _common.CallTimer:
    """Times the engine's mask calls: ``fill`` (llguidance computing the allowed tokens)
    and ``apply`` (setting the others to -inf)."""
    import worker.generate.logits_process as lp

    grammars, timer = engine.generation.grammars, _common.CallTimer()
    grammars.fill = timer.wrap(grammars.fill, "fill")
    lp.apply_bitmask = timer.wrap(lp.apply_bitmask, "apply")
    return timer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smoke:decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from worker import Engine, EngineConfig
    from worker.generate.grammar import Structured
    from worker.generate.sampling import SamplingParams
    from worker.models.sources import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    prompts = [tok(f"Record {i} as JSON:")["input_ids"] for i in range(args.batch)]
    engine = Engine(EngineConfig(model=args.model, device=args.device, max_model_len=512,
                                 max_num_running_seqs=args.batch,
                                 num_kv_blocks=args.batch * 512 // 16 + 8))
    timer = mask_timer(engine)
    structured = Structured.json(SCHEMA)
    rounds = []
    for r in range(args.repeats):  # per round: constrained, then the same tokens free
        constrained = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0,
                                      seed=1000 * r + i, structured=structured)
                       for i in range(args.batch)]
        steps_before, mask_before, fill_before = (engine.stats.num_steps, timer.total(),
                                                  timer.seconds["fill"])
        start, cpu = time.perf_counter(), time.process_time()
        outs = engine.generate(prompts, constrained)
        wall_c, cpu_c = time.perf_counter() - start, time.process_time() - cpu
        steps = engine.stats.num_steps - steps_before
        mask_s, fill_s = timer.total() - mask_before, timer.seconds["fill"] - fill_before
        lengths = [len(o.token_ids) for o in outs]
        finished = sum(o.finish_reason.value == "stop" for o in outs)
        free = [SamplingParams(max_tokens=n, temperature=1.0, seed=1000 * r + i,
                               ignore_eos=True) for i, n in enumerate(lengths)]
        start, cpu = time.perf_counter(), time.process_time()
        outs_free = engine.generate(prompts, free)
        wall_f, cpu_f = time.perf_counter() - start, time.process_time() - cpu
        assert [len(o.token_ids) for o in outs_free] == lengths
        tokens = sum(lengths)
        rounds.append({"tokens": tokens, "steps": steps, "finished_by_grammar": finished,
                       "constrained_s": wall_c, "free_s": wall_f,
                       "constrained_cpu_s": cpu_c, "free_cpu_s": cpu_f,
                       "constrained_tok_s": tokens / wall_c, "free_tok_s": tokens / wall_f,
                       "mask_ms_per_step": 1e3 * mask_s / max(steps, 1),
                       "fill_ms_per_step": 1e3 * fill_s / max(steps, 1),
                       "step_ms": 1e3 * wall_c / max(steps, 1)})
        print(f"[round {r}] {rounds[-1]}", file=sys.stderr, flush=True)
    engine.shutdown()
    med = {k: float(np.median([x[k] for x in rounds])) for k in rounds[0]}
    result = {
        "benchmark": "structured", "model": args.model, "batch": args.batch,
        "environment": _common.environment(args.device), "schema": SCHEMA, "rounds": rounds,
        "median": med,
        "slowdown": float(np.median([x["constrained_s"] / x["free_s"] for x in rounds])),
        "cpu_slowdown": float(np.median([x["constrained_cpu_s"] / x["free_cpu_s"]
                                         for x in rounds])),
    }
    _common.write_json(args.out, result)
    print(f"batch {args.batch}: constrained {med['constrained_tok_s']:,.0f} tok/s, free "
          f"{med['free_tok_s']:,.0f} tok/s, slowdown {result['slowdown']:.3f}x wall, "
          f"{result['cpu_slowdown']:.3f}x CPU; masks "
          f"{med['mask_ms_per_step']:.2f} ms of a {med['step_ms']:.1f} ms step")
    return result


if __name__ == "__main__":
    main()
