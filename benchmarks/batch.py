"""``packserve batch`` against a padded Hugging Face baseline: the same embedding job over
the same documents, same model, same device.

The job: read a JSONL file of documents, tokenize them with the model's tokenizer, embed
each (last-token pooling of the base model's hidden states, float32), write a JSONL file
of ``{"id", "embedding", "num_tokens"}``.

- ``hf_padded``: one process, the way a script does it with transformers: read, tokenize,
  right-padded batches of ``--batch-size`` in file order with ``attention_mask`` (sdpa),
  write. Timed from reading to the written file; the model is loaded before the clock.
- ``packserve``: ``deployments.batch.run_job`` on a local Ray cluster it starts itself
  (one engine actor given every core, tokenizing in a Ray task). Timed as the job's wall
  time minus its start-up (Ray start and the engine's model load), which includes the
  plan's scan of the input, tokenizing, packed forwards, the per-shard commits and the
  final assembly; its wall time with start-up is recorded too.

Wall-clock time is what the ratio reports; both are also timed in CPU seconds (the
baseline's process; packserve's tokenizing tasks and engine actor, not its driver), a
figure less sensitive to other load on a shared machine. The load average before and
after is recorded.

Documents are random words of a word-level tokenizer over the model's vocabulary (word
``w<i>`` is token i), so each document has exactly the length drawn from the workload
(Azure conversation context lengths by default, in arrival order).

    python -m benchmarks.batch --device cpu --num-docs 512 --out benchmarks/results/batch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common
from benchmarks.forward import padded_tokens, run_padded
from benchmarks.workloads import azure_context_lengths, read_lengths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(_common.SHAPES), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workload", default="azure", help="azure, or a file with one length per line")
    p.add_argument("--num-docs", type=int, default=512)
    p.add_argument("--max-len", type=int, default=4096, help="clip lengths here")
    p.add_argument("--batch-size", type=int, default=32, help="the baseline's padded batch size")
    p.add_argument("--shard-size", type=int, default=128, help="packserve's rows per shard")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU: torch threads of the baseline and of packserve's one actor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(_common.REPO_ROOT / "benchmarks/results/batch_cpu.json"))
    return p.parse_args(argv)


def add_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """Word ``w<i>`` is token i; no special tokens are added when encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"w{i}": i for i in range(1, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def make_documents(path: Path, lengths: np.ndarray, vocab_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            words = " ".join(f"w{t}" for t in rng.integers(1, vocab_size, int(n)))
            f.write(json.dumps({"id": f"doc-{i}", "text": words}) + "\n")


def run_hf_padded(model_dir: Path, inp: Path, out: Path, args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    loading = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = [json.loads(line) for line in inp.read_text().splitlines()]
    tokens = [np.asarray(ids, np.int64) for ids in
              tokenizer([r["text"] for r in rows])["input_ids"]]
    tokenized = time.perf_counter()
    order = np.arange(len(tokens))
    pooled = run_padded(model, tokens, order, args.batch_size, args.device)
    _common.synchronize(args.device)
    forwarded = time.perf_counter()
    with open(out, "w") as f:
        f.writelines(json.dumps({"id": row["id"], "embedding": vec.tolist(),
                                 "num_tokens": len(ids)}) + "\n"
                     for row, vec, ids in zip(rows, pooled, tokens))
    done, cpu_s = time.perf_counter(), time.process_time() - cpu_started
    lengths = np.array([len(t) for t in tokens])
    return {"time_s": done - started, "cpu_s": cpu_s, "load_s": started - loading,
            "read_tokenize_s": tokenized - started,
            "forward_s": forwarded - tokenized, "write_s": done - forwarded,
            "computed_tokens": padded_tokens(lengths, order, args.batch_size),
            "threads": args.threads}


def run_packserve(model_dir: Path, inp: Path, out: Path, args) -> dict:
    from deployments.batch import JobConfig, run_job

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpu = not args.device.startswith("cuda")
    config = JobConfig(model=str(model_dir), task="embed", input=str(inp), output=str(out),
                       shard_size=args.shard_size, padded_batch_size=args.batch_size,
                       pooling="last", device="cpu" if cpu else "cuda", progress=False,
                       num_actors=1 if cpu else None,
                       num_cpus_per_actor=float(args.threads) if cpu else 1.0)
    summary = run_job(config)
    job_s = summary.wall_s - summary.startup_s
    return summary.to_json() | {"job_s": job_s, "threads": args.threads if cpu else None}


def compare(a: Path, b: Path) -> dict:
    def load(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], np.float32)

    ids_a, emb_a = load(a)
    ids_b, emb_b = load(b)
    return {"same_ids_in_order": ids_a == ids_b,
            "max_abs_diff": float(np.abs(emb_a - emb_b).max()),
            "max_abs_reference": float(np.abs(emb_a).max())}


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = "float32" if not args.device.startswith("cuda") else "bfloat16"
    base = _common.ensure_checkpoint(args.shape, dtype, args.device)
    work = Path(tempfile.mkdtemp(prefix="packserve-batch-bench-"))
    model_dir = work / "model"
    shutil.copytree(base, model_dir)
    vocab = _common.shape_config(args.shape).vocab_size
    add_word_tokenizer(model_dir, vocab)
    source = azure_context_lengths() if args.workload == "azure" else read_lengths(args.workload)
    lengths = np.minimum(source[: args.num_docs], args.max_len)
    inp = work / "docs.jsonl"
    make_documents(inp, lengths, vocab, args.seed)
    real = int(lengths.sum())
    padded = padded_tokens(lengths, np.arange(len(lengths)), args.batch_size)
    result = {"benchmark": "batch", "environment": _common.environment(args.device),
              "model": {"shape": args.shape, "dtype": dtype}, "task": "embed (last-token pooling)",
              "command": "python -m benchmarks.batch " + " ".join(argv or sys.argv[1:]),
              "workload": {"name": args.workload, "num_docs": len(lengths), "real_tokens": real,
                           "mean": float(lengths.mean()), "p50": float(np.median(lengths)),
                           "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
                           "clip": args.max_len, "order": "the first N requests, arrival order",
                           "padded_tokens_batch": padded, "ideal_ratio": padded / real},
              "batch_size": args.batch_size, "shard_size": args.shard_size}
    result["load_average_before"] = os.getloadavg()
    result["hf_padded"] = run_hf_padded(model_dir, inp, work / "hf.jsonl", args)
    print(f"[hf_padded] {result['hf_padded']['time_s']:.1f} s", file=sys.stderr)
    result["packserve"] = run_packserve(model_dir, inp, work / "ours.jsonl", args)
    print(f"[packserve] {result['packserve']['job_s']:.1f} s", file=sys.stderr)
    hf, ours = result["hf_padded"], result["packserve"]
    for entry, seconds in ((hf, hf["time_s"]), (ours, ours["job_s"])):
        entry["docs_per_s"], entry["real_tokens_per_s"] = len(lengths) / seconds, real / seconds
    result["load_average_after"] = os.getloadavg()
    result["ratios"] = {"job_time": hf["time_s"] / ours["job_s"],
                        "job_time_with_startup": (hf["load_s"] + hf["time_s"]) / ours["wall_s"],
                        "cpu_time": hf["cpu_s"] / ours["run_cpu_s"]}
    result["check"] = compare(work / "hf.jsonl", work / "ours.jsonl")
    _common.write_json(args.out, result)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"ratios": result["ratios"], "check": result["check"],
                      "hf_tokens_per_s": hf["real_tokens_per_s"],
                      "packserve_tokens_per_s": ours["real_tokens_per_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
