"""Speculative decoding: wall time, tokens per step and acceptance of ``ngram`` (prompt
lookup) and ``draft`` (a small draft model) against no speculation, greedy, same target.

The target is a random-weight decoder of a ``_common.SHAPES`` shape's dimensions, built
as a Mistral (sliding window ``--window``, 8 on CPU): a random model copies nothing by
itself, and under a window its next token depends only on the last ``layers x (window
- 1)`` tokens, so a passage that ends like the prompt continues like the passage did.
Its weights are drawn with std ``--init-std`` (0.05; at the shapes' usual 0.02 a random
decoder's greedy output falls into a short token loop that prompt lookup predicts, so
"plain" would not be plain), the layers after the draft's ``--draft-layers`` scaled by
``--late-scale`` (their residual writes), so that the draft (the target's embeddings,
first layers, norm and head, saved as its own checkpoint) agrees with it some of the time.
Both are saved with ``save_pretrained`` and loaded through ``from_pretrained``.

Workloads (every prompt the same length, EOS ignored, ``--max-tokens`` generated):

- ``copy``: answers that quote the prompt. For each sequence a random seed text X, Y =
  the target's own greedy continuation of X (the non-speculative engine's), and the
  prompt ``random preamble + X + Y + random separator + X``: continuing X, the target
  writes Y again, which prompt lookup finds in the prompt. The fraction of answer tokens
  equal to Y (``quote_fraction``) and the acceptance are measured, never assumed;
- ``plain``: random prompts of the same length, what the model does with them.

For each (workload, batch in ``--batches``) every configuration (``base``: none;
``ngram``: k = ``--k`` under the engine's load rule, adaptive by default, unless
``--no-adaptive`` / ``--step-overhead-tokens`` / ``--disable-by-batch-size`` say
otherwise; ``draft``: the same with the draft model; ``draft_fixed``: the draft proposing
k at every step, what the method itself gains or costs) runs ``Engine.generate`` over the
batch; rounds alternate the configurations, the first is an untimed warm-up, medians
reported with every run. Per configuration: wall time, the ratio to ``base``
(``speedup``), tokens per step (generated tokens / generation steps, ``Engine.stats``
deltas; the prefill step counts), acceptance (accepted / proposed) overall and by
position, and ``greedy_identical``: every round's tokens equal ``base``'s (recorded,
not asserted). ``--sweep-load`` adds, at ``--sweep-batches`` on both workloads, ngram
with k fixed (``adaptive`` off, no batch cut: every decode proposes k) and ngram under
the engine's rule, against base: the data behind the load rule.

    python -m benchmarks.specdec --device cpu --sweep-load \
        --out benchmarks/results/specdec_cpu.json
    python -m benchmarks.specdec --device cuda --shape qwen2.5-1.5b --repeats 2
    python -m benchmarks.specdec --quick             # the smoke test's run (tiny shape)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common

CPU_DEFAULTS = {"shape": "small", "batches": "1,16", "max_tokens": 64, "repeats": 5,
                "window": 8, "sweep_batches": "1,2,4,8,16,32"}
CUDA_DEFAULTS = {"shape": "qwen2.5-1.5b", "batches": "1,16", "max_tokens": 64, "repeats": 2,
                 "window": 4, "sweep_batches": "1,2,4,8,16,32"}
QUICK = {"shape": "tiny", "batches": "1,4", "max_tokens": 16, "repeats": 1,
         "sweep_batches": "1,2"}
TARGETS = {  # (workload, which batch, method): the least speedup asked for
    "copy_batch1_ngram_speedup": ("copy", "min", "ngram", 1.8),
    "plain_batch16_ngram_speedup": ("plain", "max", "ngram", 0.95),
}
NO_LOAD_RULE = {"adaptive": False, "disable_by_batch_size": None}  # every decode proposes k
_MARKER = "packserve-specdec.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--shape", choices=sorted(_common.SHAPES), help="dimensions of the target "
                   "(default: small on CPU, qwen2.5-1.5b on CUDA; tiny with --quick)")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES)
    p.add_argument("--batches", help="batch sizes (default 1,16)")
    p.add_argument("--max-tokens", type=int, help="generated per sequence (default 64)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--methods", default="ngram,draft,draft_fixed",
                   help="draft: under the engine's load rule; draft_fixed: proposing k always")
    p.add_argument("--repeats", type=int, help="timed rounds after one warm-up round")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, help="the load "
                   "rule's per-sequence positions (engine default unless given)")
    p.add_argument("--step-overhead-tokens", type=float, help="the load rule's F (engine "
                   "default: measured)")
    p.add_argument("--disable-by-batch-size", type=int, help="no speculation from this many "
                   "running sequences (engine default unless given)")
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--window", type=int, help="the target's sliding window (8 CPU, 4 CUDA)")
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--late-scale", type=float, default=0.1)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--sweep-load", action="store_true", help="also ngram with k fixed vs "
                   "base at --sweep-batches, both workloads")
    p.add_argument("--sweep-batches")
    p.add_argument("--quick", action="store_true", help="tiny shape, few tokens (smoke test)")
    p.add_argument("--threads", type=int, help="torch threads (default torch's; the "
                   "Makefile's 1: the VM's second core is shared, and two threads on one "
                   "free core stall on each other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    defaults = dict(CUDA_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS)
    if args.quick:
        defaults |= QUICK
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or _common.default_dtype(args.device)
    args.batches = _ints(args.batches)
    args.sweep_batches = _ints(args.sweep_batches)
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - {"ngram", "draft", "draft_fixed"} or not args.batches:
        p.error("--methods: ngram, draft, draft_fixed; --batches: integers >= 1")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# ---- the models ------------------------------------------------------------------------

def model_config(shape: str, window: int, init_std: float):
    """A Mistral config of ``shape``'s dimensions with a sliding window."""
    from transformers import AutoConfig

    kw = dict(_common.SHAPES[shape])
    kw.pop("model_type")
    for key in ("use_sliding_window",):
        kw.pop(key, None)
    rope = kw.pop("rope_parameters", None)
    if rope:
        kw["rope_theta"] = rope.get("rope_theta", 10000.0)
    kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    return AutoConfig.for_model("mistral", **kw, sliding_window=window,
                                initializer_range=init_std)


def build_checkpoints(args) -> tuple[Path, Path, dict]:
    """(target, draft, description): random-weight checkpoints, built once and reused
    (a marker written last makes a half-written pair rebuild)."""
    import torch
    from transformers import AutoModelForCausalLM

    desc = {"family": "mistral", "dims_of": args.shape, "dtype": args.dtype,
            "sliding_window": args.window, "init_std": args.init_std,
            "late_scale": args.late_scale, "draft_layers": args.draft_layers}
    tag = "-".join(f"{v}" for v in desc.values() if v != "mistral")
    root = Path(os.environ.get("PACKSERVE_CHECKPOINTS") or tempfile.gettempdir())
    base = root / f"packserve-specdec-{tag}"
    target, draft = base / "target", base / "draft"
    if (base / _MARKER).exists():
        return target, draft, desc
    shutil.rmtree(base, ignore_errors=True)
    started = time.perf_counter()
    config = model_config(args.shape, args.window, args.init_std)
    if args.draft_layers >= config.num_hidden_layers:
        raise SystemExit(f"--draft-layers {args.draft_layers} must be below the target's "
                         f"{config.num_hidden_layers} layers")
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        for layer in model.model.layers[args.draft_layers:]:  # the draft lacks these
            layer.self_attn.o_proj.weight.mul_(args.late_scale)
            layer.mlp.down_proj.weight.mul_(args.late_scale)
    model.save_pretrained(target)
    model.model.layers = model.model.layers[:args.draft_layers]
    model.config.num_hidden_layers = args.draft_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:args.draft_layers]
    model.save_pretrained(draft)
    del model
    _common.synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    (base / _MARKER).write_text(json.dumps(desc))
    print(f"[checkpoint] specdec target + draft -> {base} in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return target, draft, desc


def spec_config(args, method: str, draft: Path, load_rule: dict | None) -> dict | None:
    if method == "base":
        return None
    if method == "draft_fixed":  # the draft proposing k always: the method's own figures
        return spec_config(args, "draft", draft, NO_LOAD_RULE)
    spec = {"method": method, "num_speculative_tokens": args.k}
    if method == "ngram":
        spec |= {"prompt_lookup_max": args.prompt_lookup_max,
                 "prompt_lookup_min": args.prompt_lookup_min}
    else:
        spec["model"] = str(draft)
    if load_rule is None:  # the engine's rule, with what the command line set
        load_rule = {key: value for key, value in
                     (("adaptive", args.adaptive),
                      ("step_overhead_tokens", args.step_overhead_tokens),
                      ("disable_by_batch_size", args.disable_by_batch_size))
                     if value is not None}
    return spec | load_rule


# ---- workloads -------------------------------------------------------------------------

def seed_length(config, window: int) -> int:
    """X's length: past the window's reach through every layer, so that what follows X
    depends on X alone (plus a margin)."""
    return max(24, config.num_hidden_layers * (window - 1) + 8)


def copy_workload(base_engine, n: int, args, config, rng) -> tuple[list, list, dict]:
    """``n`` prompts ``preamble + X + Y + separator + X`` and their Y (the target's own
    greedy continuation of X, from the non-speculative engine)."""
    V, x_len = config.vocab_size, seed_length(config, args.window)
    seeds = [rng.integers(3, V, x_len).tolist() for _ in range(n)]
    ys = _greedy(base_engine, seeds, args.max_tokens)
    prompts = [rng.integers(3, V, 16).tolist() + x + y + rng.integers(3, V, 8).tolist() + x
               for x, y in zip(seeds, ys)]
    info = {"seed_tokens": x_len, "prompt_tokens": len(prompts[0]),
            "layout": "16 random + X + Y + 8 random + X; Y = greedy(X) by the target"}
    return prompts, ys, info


def plain_workload(n: int, length: int, config, rng) -> tuple[list, None, dict]:
    prompts = [rng.integers(3, config.vocab_size, length).tolist() for _ in range(n)]
    return prompts, None, {"prompt_tokens": length, "layout": "random token ids"}


def _greedy(engine, prompts, max_tokens):
    from worker.generate.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params)]


# ---- measuring -------------------------------------------------------------------------

COUNTERS = ("num_steps", "num_generated_tokens", "spec_num_steps", "spec_num_proposed",
            "spec_num_accepted")


def _stats_delta(before, after) -> dict:
    out = {key: getattr(after, key, 0) - getattr(before, key, 0) for key in COUNTERS}
    for key in ("spec_proposed_by_position", "spec_accepted_by_position"):
        a, b = list(getattr(after, key, ()) or ()), list(getattr(before, key, ()) or ())
        b += [0] * (len(a) - len(b))
        out[key] = [x - y for x, y in zip(a, b)]
    out["spec_k_after"] = getattr(after, "spec_k", 0)
    return out


def timed_run(engine, prompts, args) -> tuple[list, dict]:
    before = engine.stats
    _common.synchronize(args.device)
    start = time.perf_counter()
    tokens = _greedy(engine, prompts, args.max_tokens)
    _common.synchronize(args.device)
    wall = time.perf_counter() - start
    delta = _stats_delta(before, engine.stats)
    delta["wall_s"] = wall
    delta["generated"] = sum(map(len, tokens))
    load = engine.generation.spec_load
    if load is not None:  # what the load rule measured (F) and the draft's step cost (D)
        f = load.cost.overhead_tokens
        delta["rule"] = {"overhead_tokens_F": f, "measured": load.cost.seconds_per_token
                         is not None, "draft_cost_tokens_D_at_batch":
                         load.draft_cost_tokens(len(prompts), f) if load.draft_ratio else 0.0,
                         "threshold_at_batch": load.threshold(len(prompts))}
    return tokens, delta


def measure(engines: dict, prompts: list, args, quotes=None) -> dict:
    """Every configuration over ``prompts``, alternating, one warm-up round; the first
    configuration is the reference of ``speedup`` and ``greedy_identical``."""
    names = list(engines)
    runs = {name: [] for name in names}
    mismatch = {name: {"rounds": 0, "sequences": 0, "first": None} for name in names}
    reference = None
    for round_ in range(args.repeats + 1):
        outs = {}
        for name in names:  # per configuration, in turn
            outs[name], delta = timed_run(engines[name], prompts, args)
            if round_:
                runs[name].append(delta)
        reference = outs[names[0]]
        for name in names[1:]:
            bad = [i for i, (a, b) in enumerate(zip(outs[name], reference)) if a != b]
            if bad:
                m = mismatch[name]
                m["rounds"] += 1
                m["sequences"] = max(m["sequences"], len(bad))
                if m["first"] is None:
                    i = bad[0]
                    pos = next((j for j, (a, b) in enumerate(zip(outs[name][i], reference[i]))
                                if a != b), min(len(outs[name][i]), len(reference[i])))
                    m["first"] = {"round": round_, "sequence": i, "position": pos,
                                  "got": outs[name][i][pos:pos + 8],
                                  "want": reference[i][pos:pos + 8]}
    base_wall = statistics.median(r["wall_s"] for r in runs[names[0]])
    entries = {}
    for name in names:
        entry = summarize(runs[name], len(prompts))
        entry["speedup"] = base_wall / entry["wall_s"]
        entry["greedy_identical"] = mismatch[name]["rounds"] == 0
        if mismatch[name]["rounds"]:
            entry["mismatch"] = mismatch[name]
        entries[name] = entry
    if quotes is not None:  # how much of the (reference) answer is the quoted Y
        same = sum(sum(a == b for a, b in zip(out, y)) for out, y in zip(reference, quotes))
        entries[names[0]]["quote_fraction"] = same / sum(map(len, quotes))
    return entries


def summarize(runs: list[dict], batch: int) -> dict:
    last = runs[-1]  # counters are the same every round (greedy, same prompts)
    steps, generated = last["num_steps"], last["generated"]
    proposed, accepted = last["spec_num_proposed"], last["spec_num_accepted"]
    by_pos = [a / p if p else None for a, p in zip(last["spec_accepted_by_position"],
                                                   last["spec_proposed_by_position"])]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "generated_tokens": generated, "steps": steps,
            "stats_generated_tokens": last["num_generated_tokens"],  # Engine.stats' count
            "tokens_per_step": generated / steps if steps else None,
            "tokens_per_step_per_seq": generated / steps / batch if steps else None,
            "spec_steps": last["spec_num_steps"], "proposed": proposed, "accepted": accepted,
            "acceptance": accepted / proposed if proposed else None,
            "acceptance_by_position": by_pos,
            "proposed_by_position": last["spec_proposed_by_position"],
            "spec_k_after": last["spec_k_after"],
            "load_rule": last.get("rule"),
            "runs": [{k: r[k] for k in ("wall_s", "num_steps", "generated", "spec_num_proposed",
                                         "spec_num_accepted")} for r in runs]}


# ---- the run ---------------------------------------------------------------------------

def make_engine(path: Path, args, max_len: int, most: int, speculative):
    """One engine of the target. On CUDA its KV cache is sized for the largest batch
    (blocks of 16 tokens, room to spare) rather than from the free memory, as three or
    four engines share the GPU."""
    from worker import Engine, EngineConfig

    extra = {}
    if args.device.startswith("cuda"):
        extra["num_kv_blocks"] = most * (-(-max_len // 16) + 2) + 16
    return Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                               max_model_len=max_len, speculative=speculative, **extra))


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    target, draft, models = build_checkpoints(args)
    config = model_config(args.shape, args.window, args.init_std)
    x_len = seed_length(config, args.window)
    prompt_len = 16 + x_len + args.max_tokens + 8 + x_len
    max_len = prompt_len + args.max_tokens + args.k + 8
    names = ["base"] + args.methods
    most = max(args.batches + (args.sweep_batches if args.sweep_load else []))
    engines = {name: make_engine(target, args, max_len, most,
                                 spec_config(args, name, draft, None)) for name in names}
    rng = np.random.default_rng(args.seed)
    pools = {"copy": copy_workload(engines["base"], most, args, config, rng),
             "plain": plain_workload(most, prompt_len, config, rng)}
    result = {"benchmark": "specdec", "shape": args.shape, "dtype": args.dtype,
              "environment": _common.environment(args.device),
              "torch_threads": torch.get_num_threads(), "models": models,
              "draft_layers_of_target": f"{args.draft_layers} of {config.num_hidden_layers}",
              "k": args.k, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "quick": args.quick,
              "speculative": {name: spec_config(args, name, draft, None) for name in names},
              "workloads": {w: pool[2] for w, pool in pools.items()}, "cases": []}
    for workload, (prompts, quotes, _) in pools.items():  # per workload, per batch
        for batch in args.batches:
            entry = {"workload": workload, "batch": batch,
                     "configs": measure(engines, prompts[:batch], args,
                                        quotes[:batch] if quotes else None)}
            result["cases"].append(entry)
            _report_case(entry)
            _save(args, result)
    result["targets"] = targets(result["cases"], args.batches)
    if args.sweep_load:
        for name in ("draft", "draft_fixed"):  # free the draft engines first
            if name in engines:
                engines.pop(name).shutdown()
        sweep = {"base": engines.pop("base"),
                 "ngram_fixed_k": make_engine(target, args, max_len, most,
                                              spec_config(args, "ngram", draft, NO_LOAD_RULE)),
                 "ngram": engines.pop("ngram", None) or make_engine(
                     target, args, max_len, most, spec_config(args, "ngram", draft, None))}
        engines = sweep
        result["sweep_load"] = {"method": "ngram", "k": args.k,
                                "fixed_k": spec_config(args, "ngram", draft, NO_LOAD_RULE),
                                "rule": spec_config(args, "ngram", draft, None), "rows": []}
        for workload, (prompts, quotes, _) in pools.items():  # per workload, per batch
            for batch in args.sweep_batches:
                configs = measure(sweep, prompts[:batch], args,
                                  quotes[:batch] if quotes else None)
                row = {"workload": workload, "batch": batch, **_sweep_row(configs)}
                result["sweep_load"]["rows"].append(row)
                print(f"[sweep] {workload:<6} b{batch:<3} fixed k x{row['speedup']:.2f} "
                      f"(acc {row['acceptance']}, tok/step/seq "
                      f"{row['tokens_per_step_per_seq']:.2f}), rule "
                      f"x{row['rule']['speedup']:.2f}", file=sys.stderr)
                _save(args, result)
    for e in engines.values():
        e.shutdown()
    result["all_greedy_identical"] = all(
        c["greedy_identical"] for case in result["cases"] for c in case["configs"].values()
    ) and all(r["greedy_identical"] for r in result.get("sweep_load", {}).get("rows", []))
    result["wall_s_total"] = time.perf_counter() - started
    _save(args, result)
    _print_table(result)
    return result


def _sweep_row(configs: dict) -> dict:
    """Fixed k's figures at the top level, the engine rule's under ``rule``."""
    base, spec, rule = configs["base"], configs["ngram_fixed_k"], configs["ngram"]
    return {"speedup": spec["speedup"], "base_wall_s": base["wall_s"],
            "spec_wall_s": spec["wall_s"], "acceptance": spec["acceptance"],
            "tokens_per_step_per_seq": spec["tokens_per_step_per_seq"],
            "base_tokens_per_step_per_seq": base["tokens_per_step_per_seq"],
            "acceptance_by_position": spec["acceptance_by_position"],
            "greedy_identical": spec["greedy_identical"] and rule["greedy_identical"],
            **({"quote_fraction": base["quote_fraction"]} if "quote_fraction" in base else {}),
            "rule": {key: rule[key] for key in ("speedup", "wall_s", "acceptance", "proposed",
                                                "tokens_per_step_per_seq",
                                                "acceptance_by_position", "greedy_identical")},
            "runs": {name: c["runs"] for name, c in configs.items()}}


def targets(cases: list, batches: list) -> dict:
    out = {}
    for key, (workload, which, method, least) in TARGETS.items():
        batch = min(batches) if which == "min" else max(batches)
        case = next((c for c in cases if c["workload"] == workload and c["batch"] == batch),
                    None)
        if case is None or method not in case["configs"]:
            out[key] = {"target": least, "value": None, "pass": None, "batch": batch}
            continue
        value = case["configs"][method]["speedup"]
        out[key] = {"target": least, "value": value, "pass": value >= least, "batch": batch,
                    "acceptance": case["configs"][method]["acceptance"]}
    return out


def _save(args, result: dict) -> None:
    if args.out:
        _common.write_json(args.out, result)


def _report_case(entry: dict) -> None:
    for name, c in entry["configs"].items():
        acc = f"{c['acceptance']:.2f}" if c["acceptance"] is not None else "-"
        print(f"[{entry['workload']} b{entry['batch']}] {name:<6} {c['wall_s']:.3f}s "
              f"x{c['speedup']:.2f} tok/step/seq {c['tokens_per_step_per_seq']:.2f} "
              f"acc {acc} identical {c['greedy_identical']}", file=sys.stderr)


def _print_table(result: dict) -> None:
    print(f"\nspecdec: {result['shape']} dims ({result['models']['family']}, window "
          f"{result['models']['sliding_window']}) {result['dtype']} on "
          f"{result['environment']['device_name']}, k={result['k']}, "
          f"{result['max_tokens']} tokens")
    print(f"{'workload':<8}{'batch':>6}{'config':>8}{'wall s':>9}{'x base':>8}"
          f"{'tok/step/seq':>14}{'accept':>8}{'identical':>10}")
    for case in result["cases"]:
        for name, c in case["configs"].items():
            acc = f"{c['acceptance']:.2f}" if c["acceptance"] is not None else "-"
            print(f"{case['workload']:<8}{case['batch']:>6}{name:>8}{c['wall_s']:>9.3f}"
                  f"{c['speedup']:>8.2f}{c['tokens_per_step_per_seq']:>14.2f}{acc:>8}"
                  f"{c['greedy_identical']!s:>10}")
    for key, t in result.get("targets", {}).items():
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"target {key}: {value} (>= {t['target']}): "
              f"{'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else 'n/a'}")
    for row in result.get("sweep_load", {}).get("rows", []):
        acc = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
        print(f"sweep {row['workload']:<6} b{row['batch']:<3} fixed k x{row['speedup']:.2f} "
              f"acc {acc}; rule x{row['rule']['speedup']:.2f}")
    print(f"all greedy identical: {result['all_greedy_identical']}; "
          f"{result['wall_s_total']:.0f}s")


if __name__ == "__main__":
    main()
