"""Packed vs padded forward passes over the same sequences, same model, same device.

Three modes run over one sample of workload lengths (random token ids):

- ``padded_arrival``: Hugging Face's standard way: fixed batches in arrival order, right
  padding, ``attention_mask``, the model's default attention (sdpa).
- ``padded_sorted``: the same, after sorting the sequences by length.
- ``packed``: our ``Engine`` (FFD bins under the token budget, varlen attention).

What is timed, identically in all modes: the base model's last hidden states (no LM
head: a [tokens, 152k] logits tensor would dominate a 7B run and no prefill needs it for
every token) plus last-token pooling, read back to the host as float32. Timing is wall
clock (perf_counter) around whole passes over the sample, after a warm-up and with the
device synchronized, so it includes host work (padding or packing, copies). Each mode's
pooled vectors are compared with the arrival-order baseline (``check``).

    python benchmarks/forward.py --shape tiny --device cpu --num-seqs 256
    python benchmarks/forward.py --shape qwen2.5-7b --device cuda --dtype bfloat16 \
        --workload azure --batch-size 32 --num-seqs 256 --out benchmarks/results/forward_cuda.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common
from benchmarks.workloads import azure_context_lengths, read_lengths

MODES = ("padded_arrival", "padded_sorted", "packed")
FLOPS_FORMULA = ("useful FLOPs = sum over real sequences of 2*P*L + 2*n_layers*d_attn*L*(L+1); "
                 "P = base-model parameters without the input embedding (no LM head is run), "
                 "d_attn = heads*head_dim; attention counted causal (half of 4*n_layers*d*L^2); "
                 "padding never counts. MFU = useful FLOPs / time / peak")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(_common.SHAPES), default=None)
    src.add_argument("--model", help="a local checkpoint directory")
    p.add_argument("--workload", default="azure", help="azure, or a file with one length per line")
    p.add_argument("--lengths", help="a file with one length per line (overrides --workload)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=_common.DTYPE_NAMES)
    p.add_argument("--num-seqs", type=int, help="sample size (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--batch-size", type=int, default=32, help="padded modes' batch size")
    p.add_argument("--budget", type=int, help="packed tokens per bin (default: the engine's: "
                   "the Phase-0 probe on CUDA, its configured default on CPU)")
    p.add_argument("--max-len", type=int, help="clip lengths here (default: the model's max)")
    p.add_argument("--repeats", type=int, help="timed passes per mode (default 1 CPU, 2 CUDA)")
    p.add_argument("--attention", default="auto", help="the engine's attention backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", help="JSON path (default benchmarks/results/forward_<device>.json)")
    p.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    args = p.parse_args(argv)
    if args.shape is None and args.model is None:
        args.shape = "tiny"
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or _common.default_dtype(args.device)
    args.num_seqs = args.num_seqs or (256 if cuda else 64)
    args.repeats = args.repeats or (2 if cuda else 1)
    dev = args.device.split(":")[0]
    args.out = Path(args.out or _common.REPO_ROOT / f"benchmarks/results/forward_{dev}.json")
    args.plot = Path(args.plot) if args.plot else args.out.with_suffix(".png")
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or args.num_seqs < 1 or args.batch_size < 1 or args.repeats < 1:
        p.error(f"bad --modes {unknown} / --num-seqs / --batch-size / --repeats")
    return args


def sample_lengths(args) -> tuple[np.ndarray, dict]:
    """A seeded random sample of the workload, kept in arrival (file) order."""
    source = args.lengths or args.workload
    lengths = azure_context_lengths() if source == "azure" else read_lengths(source)
    n = min(args.num_seqs, len(lengths))
    rng = np.random.default_rng(args.seed)
    picked = np.sort(rng.choice(len(lengths), size=n, replace=False))
    return lengths[picked].copy(), {"name": Path(source).name, "population": len(lengths),
                                    "sample": f"{n} sequences drawn with seed {args.seed}, "
                                              "arrival order kept"}


def padded_tokens(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> int:
    return int(sum(lengths[order[i:i + batch_size]].max() * len(order[i:i + batch_size])
                   for i in range(0, len(order), batch_size)))


def run_padded(model, tokens: list[np.ndarray], order: np.ndarray, batch_size: int,
               device: str) -> np.ndarray:
    """Right-padded batches in ``order``; last-token hidden state per sequence."""
    import torch

    out = np.empty((len(tokens), model.config.hidden_size), np.float32)
    for i in range(0, len(order), batch_size):  # per batch
        idx = order[i:i + batch_size]
        lens = np.array([len(tokens[j]) for j in idx])
        ids = np.zeros((len(idx), lens.max()), np.int64)
        mask = np.zeros_like(ids)
        for row, j in enumerate(idx):
            ids[row, : lens[row]], mask[row, : lens[row]] = tokens[j], 1
        with torch.inference_mode():
            hidden = model(input_ids=torch.from_numpy(ids).to(device),
                           attention_mask=torch.from_numpy(mask).to(device),
                           use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(idx), device=hidden.device),
                          torch.from_numpy(lens - 1).to(hidden.device)]
            out[idx] = last.float().cpu().numpy()
    return out


def time_mode(name: str, fn, warmup, repeats: int, device: str) -> tuple[dict, np.ndarray | None]:
    """Warm up, then ``repeats`` timed passes; OOM (or any error) is reported, not raised."""
    from worker.core.memory import is_out_of_memory

    entry: dict = {"status": "ok"}
    output = None
    try:
        warmup()
        times = []
        with _common.peak_memory(device) as mem:
            for _ in range(repeats):
                _common.synchronize(device)
                start = time.perf_counter()
                output = fn()
                _common.synchronize(device)
                times.append(time.perf_counter() - start)
        entry.update(times_s=times, time_s=statistics.median(times))
        if "peak_bytes" in mem:
            entry.update(peak_memory_bytes=mem["peak_bytes"],
                         peak_memory_gib=mem["peak_bytes"] / 2**30,
                         memory_at_start_gib=mem["start_bytes"] / 2**30)
    except Exception as exc:  # one mode failing must not lose the others
        entry = {"status": "oom" if is_out_of_memory(exc) else "error", "error": repr(exc)[:500]}
        traceback.print_exc()
    if entry["status"] != "ok":  # outside the except block: its traceback pins tensors
        output = None
        gc.collect()
        _empty_cache(device)
    took = f" {entry['time_s']:.3f}s" if "time_s" in entry else ""
    print(f"[{name}] {entry['status']}{took}", file=sys.stderr)
    return entry, output


def useful_flops(lengths: np.ndarray, config, base_params: int, embed_params: int) -> float:
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    d_attn = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    p = base_params - embed_params
    lens = lengths.astype(np.float64)
    return float((2 * p * lens + 2 * layers * d_attn * lens * (lens + 1)).sum())


def start_engine(args, path, result):
    """The engine, or None (its error recorded as the packed mode's) if it cannot start."""
    from worker import Engine, EngineConfig

    try:
        engine = Engine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                     attention_backend=args.attention,
                                     max_num_batched_tokens=args.budget))
    except Exception as exc:  # the padded modes still run
        traceback.print_exc()
        result["modes"]["packed"] = {"status": "error", "error": repr(exc)[:500]}
        return None
    cfg, report = engine.config, engine.budget_report
    result["engine"] = {"budget_tokens": cfg.max_num_batched_tokens, "align": cfg.align,
                        "attention": cfg.attention_backend, "max_model_len": cfg.max_model_len,
                        "budget_report": report.to_log_lines() if report else None}
    return engine


def clip_length(args, engine, path) -> int:
    """Longest sequence every mode can take: the model's, the engine budget, --max-len."""
    if engine is not None:
        limits = [engine.config.max_model_len, engine.config.max_num_batched_tokens]
    else:
        from transformers import AutoConfig

        limits = [AutoConfig.from_pretrained(path).max_position_embeddings]
    return int(min(limits + ([args.max_len] if args.max_len else [])))


def run_packed(engine, tokens, args) -> tuple[dict, np.ndarray | None]:
    entry, out = time_mode("packed", lambda: engine.embed(tokens, pooling="last"),
                           lambda: engine.embed(tokens[:16], pooling="last"),
                           args.repeats, args.device)
    entry["num_bins"] = engine.stats.num_bins  # warm-up included
    return entry, out


def _tokens(lengths: np.ndarray, vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab, size=int(n), dtype=np.int64) for n in lengths]


def _vocab(path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


def _allocated_gib(device: str) -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None


def _empty_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def load_baseline(path, args):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    return model.to(args.device).eval()


def summarize(result: dict, lengths: np.ndarray, outputs: dict, flops: float) -> None:
    modes, real = result["modes"], int(lengths.sum())
    peak = _common.peak_tflops(result["environment"].get("device_name", "")) \
        if result["environment"]["device"].startswith("cuda") else None
    for entry in modes.values():
        if entry.get("status") == "ok":
            entry["real_tokens_per_s"] = real / entry["time_s"]
            entry["computed_tokens_per_s"] = entry["computed_tokens"] / entry["time_s"]
            entry["mfu"] = flops / entry["time_s"] / (peak * 1e12) if peak else None
    tps = {m: modes[m].get("real_tokens_per_s") for m in modes}
    ideal = modes["padded_arrival"]["computed_tokens"] / real if "padded_arrival" in modes else None
    ratios = {"ideal_ratio": ideal}
    if tps.get("packed") and tps.get("padded_arrival"):
        ratios["packed_over_arrival"] = tps["packed"] / tps["padded_arrival"]
        ratios["fraction_of_ideal"] = ratios["packed_over_arrival"] / ideal
    if tps.get("packed") and tps.get("padded_sorted"):
        ratios["packed_over_sorted"] = tps["packed"] / tps["padded_sorted"]
    result["ratios"] = ratios
    ref = outputs.get("padded_arrival")
    if ref is not None:
        scale = float(np.abs(ref).max()) or 1.0
        result["check"] = {f"max_abs_diff_{m}_vs_arrival": float(np.abs(o - ref).max())
                           for m, o in outputs.items() if o is not None and m != "padded_arrival"}
        result["check"]["max_abs_reference"] = scale


def plot(result: dict, path: Path) -> None:
    modes, r, env = result["modes"], result["ratios"], result["environment"]
    sub = f"ideal {r.get('ideal_ratio') or 0:.2f}x"
    if r.get("packed_over_arrival"):
        sub += f", packed/arrival {r['packed_over_arrival']:.2f}x"
    if r.get("packed_over_sorted"):
        sub += f", packed/sorted {r['packed_over_sorted']:.2f}x"
    title = (f"{result['model']['name']} {result['dtype']} on {env['device_name']}\n"
             f"{result['workload']['num_seqs']} {result['workload']['name']} sequences, "
             f"batch {result['batch_size']}; {sub}")
    _common.bar_chart(path, {m: e.get("real_tokens_per_s") if e.get("status") == "ok"
                             else e.get("status", "?") for m, e in modes.items()},
                      title, "real tokens / s (higher is better)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model:
        path, name = Path(args.model), Path(args.model).name
    else:
        path, name = _common.ensure_checkpoint(args.shape, args.dtype, args.device), args.shape
    lengths_raw, workload = sample_lengths(args)
    result = {"benchmark": "forward", "environment": _common.environment(args.device),
              "model": {"name": name, "path": str(path)}, "dtype": args.dtype,
              "batch_size": args.batch_size, "repeats": args.repeats, "workload": workload,
              "timed": "base-model last hidden states + last-token pooling, read back to host",
              "flops_formula": FLOPS_FORMULA, "modes": {}}
    if not args.device.startswith("cuda"):
        result["note"] = ("CPU: a rehearsal of the harness, not a result. The padded modes' "
                          "dense [B, 1, L, L] masks and quadratic CPU attention dominate a tiny "
                          "model, so ratios overshoot the ideal ratio; GPU numbers are the result")
    engine = start_engine(args, path, result)
    clip = clip_length(args, engine, path)
    lengths = np.minimum(lengths_raw, clip)
    result["workload"].update(clip=clip, num_clipped=int((lengths_raw > clip).sum()),
                              num_seqs=len(lengths), real_tokens=int(lengths.sum()),
                              mean=float(lengths.mean()), p50=float(np.median(lengths)),
                              p99=float(np.percentile(lengths, 99)), max=int(lengths.max()))
    vocab = engine.spec.vocab_size if engine else _vocab(path)
    tokens = _tokens(lengths, vocab, args.seed)
    outputs = {}
    if engine is not None:
        if "packed" in args.modes:
            entry, outputs["packed"] = run_packed(engine, tokens, args)
            result["modes"]["packed"] = entry | {"computed_tokens": int(lengths.sum())}
        engine.shutdown()
        del engine
        gc.collect()
        _empty_cache(args.device)
        result["engine"]["allocated_after_shutdown_gib"] = _allocated_gib(args.device)
    model = load_baseline(path, args)
    counts = model.model.num_parameters(), model.model.get_input_embeddings().weight.numel()
    flops = useful_flops(lengths, model.config, *counts)
    result["model"].update(base_params=counts[0], embedding_params=counts[1], useful_flops=flops)
    arrival, by_length = np.arange(len(lengths)), np.argsort(lengths, kind="stable")
    for mode, order in (("padded_arrival", arrival), ("padded_sorted", by_length)):
        if mode not in args.modes:
            continue
        entry, outputs[mode] = time_mode(
            mode, functools.partial(run_padded, model.model, tokens, order, args.batch_size,
                                    args.device),
            functools.partial(run_padded, model.model, tokens, order[:4], args.batch_size,
                              args.device),
            args.repeats, args.device)
        entry["computed_tokens"] = padded_tokens(lengths, order, args.batch_size)
        result["modes"][mode] = entry
        summarize(result, lengths, outputs, flops)
        _common.write_json(args.out, result)  # partial results survive a later kill
    result["modes"] = {m: result["modes"][m] for m in MODES if m in result["modes"]}
    summarize(result, lengths, outputs, flops)
    _common.write_json(args.out, result)
    plot(result, args.plot)
    print(_table(result))
    return 0 if all(e.get("status") != "error" for e in result["modes"].values()) else 1


def _table(result: dict) -> str:
    rows = [f"{'mode':<16}{'status':>7}{'time s':>9}{'real tok/s':>12}{'computed':>11}"
            f"{'peak GiB':>9}"]
    for m, e in result["modes"].items():
        rows.append(f"{m:<16}{e.get('status'):>7}{e.get('time_s', float('nan')):>9.2f}"
                    f"{e.get('real_tokens_per_s') or float('nan'):>12,.0f}"
                    f"{e.get('computed_tokens', 0):>11,}"
                    f"{e.get('peak_memory_gib') or float('nan'):>9.2f}")
    rows.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items() if v))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
