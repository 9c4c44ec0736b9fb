"""The forward-only tasks against what their users run today, in one process, same
model, same texts, same threads, modes interleaved (A B C C B A ...) so that load from
other jobs on a shared machine, and whatever one mode leaves behind for the next, falls on
every mode alike.

``embed``: the real all-MiniLM-L6-v2 against sentence-transformers ``encode()`` (it
tokenizes, sorts the texts by length, pads batches of 32, mean-pools and normalizes).
packserve: tokenize (the model's fast tokenizer, one call) + ``Engine.embed`` (mean
pooling, normalized), with the CPU reference attention grouped (the default) and, to
show what the grouping bought, one SDPA call per sequence (the definition it replaced).

``classify``: the smoke classifier (the real MiniLM encoder under a random 3-label head)
against Hugging Face padded batches of 32 in input order, what a
``pipeline("text-classification")`` loop does: tokenize a batch, pad it, run
``BertForSequenceClassification``, softmax. packserve: tokenize + ``Engine.classify`` +
softmax.

``decoder``: scoring (``Engine.score``: the log-prob of every token given the ones
before it) with the ``small-8k`` benchmark shape (Llama: hidden 256, 4 layers, 8 / 2
heads, vocab 8,192, so that the LM head, the same work in every mode, does not drown the
attention; random weights saved with ``save_pretrained``, loaded by the engine) over
``--num-seqs`` random token sequences with the last Azure context lengths clipped to
8..2048 (no tokenizer: the ids are the input), against Hugging Face padded batches of 32
in input order (the base model over the padded batch, then the LM head and log-softmax on
each sequence's real rows, as a careful scoring loop does; padding the head too would
only inflate the baseline). packserve runs three ways: the CPU attention
rule that ships (``worker.attention.cpu.RULE``), the grouping before issue 24
(``LEGACY_RULE``: causal groups at every length under an explicit mask) and one SDPA call
per sequence.

Texts are words of the model's vocabulary (one token each), so each text has exactly the
length drawn: the last ``--num-texts`` context lengths of the Azure conversation trace
(held out from the first part, which other benchmarks use), scaled by 1/8 (embed; clipped
to sentence-transformers' max_seq_length of 256 for MiniLM, so nothing is truncated) or
1/4 (classify; clipped to 512). Wall and CPU seconds are both reported: on a VM shared
with other jobs the CPU seconds move less.

    python -m benchmarks.pooled --num-texts 2000 --num-docs 800 --repeats 2 \
        --out benchmarks/results/pooled_cpu.json
    python -m benchmarks.pooled --tasks decoder --num-seqs 256 --repeats 2 \
        --out benchmarks/results/pooled_decoder_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common
from benchmarks.workloads import azure_context_lengths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="embed,classify", help="any of embed,classify,decoder")
    p.add_argument("--num-texts", type=int, default=2000, help="embed")
    p.add_argument("--num-docs", type=int, default=800, help="classify")
    p.add_argument("--num-seqs", type=int, default=256, help="decoder")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per mode")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--budget", type=int, default=8192, help="packserve's max_num_batched_tokens")
    p.add_argument("--batch-size", type=int, default=32, help="the baselines' batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(_common.REPO_ROOT / "benchmarks/results/pooled_cpu.json"))
    return p.parse_args(argv)


def make_texts(tokenizer, num: int, scale: int, max_words: int, seed: int) -> list[str]:
    """``num`` texts of vocabulary words, one token each: lengths from the end of the trace."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2)
    rng = np.random.default_rng(seed)
    lengths = np.clip(azure_context_lengths()[-num:] // scale, 1, max_words)
    return [" ".join(rng.choice(words, int(n))) for n in lengths]


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def interleave(modes: dict, repeats: int) -> tuple[dict, dict]:
    """``repeats`` rounds of every mode in turn, every other round in reverse order (no mode
    always follows the same one; models loaded and warmed up before); the outputs of the
    first round are kept for the comparison."""
    outputs = {}
    runs = {name: {"wall_s": [], "cpu_s": []} for name in modes}
    for round_ in range(repeats):
        for name in list(modes)[::-1 if round_ % 2 else 1]:
            wall, cpu, out = timed(modes[name])
            outputs.setdefault(name, out)
            runs[name]["wall_s"].append(round(wall, 3))
            runs[name]["cpu_s"].append(round(cpu, 3))
            print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    for r in runs.values():
        r["median_wall_s"] = statistics.median(r["wall_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_s"])
    return runs, outputs


def bench_embed(args, engine_cls, config_cls) -> dict:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from tests.factories import minilm_dir

    path = str(minilm_dir())
    st = SentenceTransformer(path, device="cpu")
    tok = AutoTokenizer.from_pretrained(path)
    texts = make_texts(tok, args.num_texts, 8, st.max_seq_length - 2, args.seed)
    engine = engine_cls(config_cls(model=path, max_num_batched_tokens=args.budget))

    def packserve(grouped: bool):
        def run():
            engine.runner.group_attention = grouped
            ids = tok(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]
            return engine.embed(ids, pooling="mean", normalize=True)
        return run

    engine.embed([[101, 102]] * 4)  # warm-up
    st.encode(texts[:8])
    modes = {"packserve": packserve(True),
             "packserve_per_sequence_attention": packserve(False),
             "sentence_transformers": lambda: st.encode(texts, batch_size=args.batch_size)}
    runs, outputs = interleave(modes, args.repeats)
    engine.runner.group_attention = True
    ref = outputs["sentence_transformers"]
    lengths = np.array([len(x) for x in tok(texts)["input_ids"]])
    return {"model": "all-MiniLM-L6-v2 (real weights)", "num_texts": len(texts),
            "num_tokens": int(lengths.sum()), "mean_tokens": float(lengths.mean()),
            "max_tokens": int(lengths.max()),
            "st_padded_tokens": sorted_padded_tokens(lengths, args.batch_size),
            "max_abs_diff": {k: float(np.abs(v - ref).max()) for k, v in outputs.items()},
            "runs": runs, **ratios(runs, "sentence_transformers")}


def bench_classify(args, engine_cls, config_cls) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from worker.models.sources import resolve_model

    path = resolve_model("smoke:classifier")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="sdpa", dtype=torch.float32).eval()
    texts = make_texts(tok, args.num_docs, 4, 510, args.seed + 1)
    engine = engine_cls(config_cls(model=path, max_num_batched_tokens=args.budget))

    def packserve():
        ids = tok(texts, truncation=True, max_length=512)["input_ids"]
        return engine.labels.probabilities(engine.classify(ids))

    def hf_padded():  # pipeline("text-classification")'s loop: batches in input order
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), args.batch_size):
                enc = tok(texts[i:i + args.batch_size], padding=True, truncation=True,
                          max_length=512, return_tensors="pt")
                out.append(torch.softmax(model(**enc).logits, -1).numpy())
        return np.concatenate(out)

    engine.classify([[101, 102]] * 4)  # warm-up
    with torch.inference_mode():
        model(**tok(texts[:4], padding=True, return_tensors="pt"))
    runs, outputs = interleave({"packserve": packserve, "hf_padded_batches": hf_padded},
                               args.repeats)
    lengths = np.array([len(x) for x in tok(texts)["input_ids"]])
    padded = sum(int(lengths[i:i + args.batch_size].max()) * len(lengths[i:i + args.batch_size])
                 for i in range(0, len(lengths), args.batch_size))
    return {"model": "smoke:classifier (real MiniLM encoder, random 3-label head)",
            "num_texts": len(texts), "num_tokens": int(lengths.sum()),
            "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
            "hf_padded_tokens": padded,
            "max_abs_diff_probs": float(np.abs(outputs["packserve"]
                                               - outputs["hf_padded_batches"]).max()),
            "same_labels": bool((outputs["packserve"].argmax(-1)
                                 == outputs["hf_padded_batches"].argmax(-1)).all()),
            "runs": runs, **ratios(runs, "hf_padded_batches")}


def bench_decoder(args, engine_cls, config_cls) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from worker.attention import cpu

    path = str(_common.ensure_checkpoint("small-8k", "float32", "cpu"))
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="sdpa", dtype=torch.float32).eval()
    lengths = np.clip(azure_context_lengths()[-args.num_seqs:], 8, 2048)
    rng = np.random.default_rng(args.seed + 2)
    seqs = [rng.integers(0, model.config.vocab_size, int(n)).tolist() for n in lengths]
    engine = engine_cls(config_cls(model=path, max_num_batched_tokens=args.budget))
    shipped = cpu.RULE

    def packserve(rule, grouped: bool = True):
        def run():  # the rule is read where each bin's groups are planned
            engine.runner.group_attention, cpu.RULE = grouped, rule
            try:
                return np.concatenate(engine.score(seqs))
            finally:
                engine.runner.group_attention, cpu.RULE = True, shipped
        return run

    def hf_padded():
        out = []
        with torch.inference_mode():
            for i in range(0, len(seqs), args.batch_size):
                batch = seqs[i:i + args.batch_size]
                ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, seq in enumerate(batch):
                    ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                for row, seq in enumerate(batch):  # the head on real rows only
                    logp = torch.log_softmax(model.lm_head(hidden[row, :len(seq) - 1]), -1)
                    out.append(logp.gather(1, ids[row, 1:len(seq), None])[:, 0].numpy())
        return np.concatenate(out)

    engine.score(seqs)  # warm-up: a first pass meets every bin's GEMM shapes once
    with torch.inference_mode():
        model(input_ids=torch.ones(2, 8, dtype=torch.long))
    modes = {"packserve": packserve(shipped),
             "packserve_legacy_grouping": packserve(cpu.LEGACY_RULE),
             "packserve_per_sequence_attention": packserve(shipped, grouped=False),
             "hf_padded_batches": hf_padded}
    runs, outputs = interleave(modes, args.repeats)
    ref = outputs["hf_padded_batches"]
    per_seq = runs["packserve_per_sequence_attention"]
    padded = sum(int(lengths[i:i + args.batch_size].max()) * len(lengths[i:i + args.batch_size])
                 for i in range(0, len(lengths), args.batch_size))
    return {"model": "small-8k Llama shape (hidden 256, 4 layers, 8/2 heads, vocab 8,192), "
                     "random weights", "attention_rule": dataclasses.asdict(shipped),
            "num_seqs": len(seqs), "num_tokens": int(lengths.sum()),
            "mean_tokens": float(lengths.mean()), "max_tokens": int(lengths.max()),
            "hf_padded_tokens": padded,
            "max_abs_diff_logprob": {k: float(np.abs(v - ref).max()) for k, v in outputs.items()},
            "runs": runs, **ratios(runs, "hf_padded_batches"),
            "wall_vs_per_sequence_attention": {
                k: round(r["median_wall_s"] / per_seq["median_wall_s"], 3)
                for k, r in runs.items()}}


def sorted_padded_tokens(lengths: np.ndarray, batch_size: int) -> int:
    """Tokens sentence-transformers computes: batches of the length-sorted texts."""
    s = np.sort(lengths)[::-1]
    return int(sum(int(s[i]) * len(s[i:i + batch_size]) for i in range(0, len(s), batch_size)))


def ratios(runs: dict, baseline: str) -> dict:
    """Baseline time / packserve time, wall and CPU (medians); > 1: packserve is faster."""
    base, ours = runs[baseline], runs["packserve"]
    return {"speedup_wall": round(base["median_wall_s"] / ours["median_wall_s"], 3),
            "speedup_cpu": round(base["median_cpu_s"] / ours["median_cpu_s"], 3)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from worker import Engine, EngineConfig

    torch.set_num_threads(args.threads)
    result = {"machine": _common.machine_info(),
              "threads": args.threads, "budget": args.budget, "batch_size": args.batch_size,
              "load_average_before": load_average()}
    for task in args.tasks.split(","):
        print(f"{task}:", flush=True)
        bench = {"embed": bench_embed, "classify": bench_classify,
                 "decoder": bench_decoder}[task]
        result[task] = bench(args, Engine, EngineConfig)
        print(f"  speedup {result[task]['speedup_wall']}x wall, "
              f"{result[task]['speedup_cpu']}x CPU", flush=True)
        result["load_average_after"] = load_average()
        write(args.out, result)  # after each task: a cut run keeps what it measured
    print(f"wrote {args.out}")
    return 0


def write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
