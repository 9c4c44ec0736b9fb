"""int8 encoder embeddings on CPU (``quantization="int8"``) against what CPU embedding
users run: sentence-transformers fp32 ``encode()`` and an int8 ONNX Runtime model.

One process, the real all-MiniLM-L6-v2, the pooled benchmark's 2,000 texts
(``benchmarks.pooled.make_texts``: vocabulary words, Azure-trace lengths / 8, clipped to
254 words), the same thread count for torch and ONNX Runtime (intra-op threads), modes
interleaved in rounds (A B C C B A ...). Quality: the mean and minimum cosine of each
mode's embeddings to sentence-transformers fp32 (to packserve fp32 without it).

Modes (``--modes``; the ones whose library is missing are left out and named):

- ``packserve_int8``: tokenize + ``Engine.embed`` with ``quantization="int8"``;
- ``packserve_fp32``: the same engine unquantized (the reference packserve ships);
- ``st_fp32``: ``SentenceTransformer.encode`` (length-sorted padded batches of 32);
- ``ort_int8``: sentence-transformers' int8 ONNX recipe (``export_dynamic_quantized_onnx_model``:
  ONNX Runtime dynamic quantization, int8 weights per tensor, the ``avx512_vnni`` config
  where the CPU has VNNI, else ``avx2``). Its own ``backend="onnx"`` needs optimum-onnx,
  which pins transformers < 4.58; when that is not installed the same recipe is applied
  here directly: ``torch.onnx.export`` of the model, ``onnxruntime.quantization.
  quantize_dynamic`` (QInt8 weights, per tensor, no range reduction on VNNI), padded
  batches of 32 of the length-sorted texts, mean pooling and normalization as ST does.

    python -m benchmarks.quant --num-texts 2000 --repeats 3 \
        --out benchmarks/results/quant_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common
from benchmarks.pooled import interleave, load_average, make_texts, write

MODES = ("packserve_int8", "packserve_fp32", "st_fp32", "ort_int8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(MODES)}")
    p.add_argument("--num-texts", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per mode")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--budget", type=int, default=8192, help="packserve's max_num_batched_tokens")
    p.add_argument("--batch-size", type=int, default=32, help="the baselines' batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(_common.REPO_ROOT / "benchmarks/results/quant_cpu.json"))
    return p.parse_args(argv)


def cpu_int8_config() -> str:
    """The ST / optimum quantization config this CPU supports: avx512_vnni, else avx2."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def packserve_mode(path: str, tok, texts, args, quantization: str | None):
    from worker import Engine, EngineConfig

    engine = Engine(EngineConfig(model=path, max_num_batched_tokens=args.budget,
                                 quantization=quantization))
    engine.embed([[101, 102]] * 4)  # warm-up

    def run():
        ids = tok(texts, truncation=True, max_length=256)["input_ids"]
        return engine.embed(ids, pooling="mean", normalize=True)
    return run


def st_mode(path: str, texts, args):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu")
    st.encode(texts[:8])
    return lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)


def ort_mode(path: str, tok, texts, args, workdir: Path):
    """ST's int8 ONNX recipe applied with torch's exporter and ONNX Runtime directly."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Positional(torch.nn.Module):  # the exporter passes inputs by position
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
    fp32_path, int8_path = workdir / "model.onnx", workdir / "model_qint8.onnx"
    enc = tok(["a b c", "d e"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"last_hidden_state": {0: "batch",
                                                                                1: "seq"}}
    with torch.inference_mode():
        torch.onnx.export(Positional(), (enc["input_ids"], enc["attention_mask"],
                                  enc["token_type_ids"]), str(fp32_path), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    vnni = cpu_int8_config() == "avx512_vnni"  # optimum: avx2 reduces the range, VNNI not
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                     per_channel=False, reduce_range=not vnni, op_types_to_quantize=["MatMul"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"])
    order = np.argsort([-len(t) for t in texts], kind="stable")  # ST sorts by length

    def run():
        out = np.empty((len(texts), model.config.hidden_size), np.float32)
        for i in range(0, len(texts), args.batch_size):
            rows = order[i:i + args.batch_size]
            enc = tok([texts[j] for j in rows], padding=True, truncation=True,
                      max_length=256, return_tensors="np")
            hidden = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out
    run()
    return run


def available(modes: list[str]) -> tuple[list[str], dict]:
    """The modes whose libraries import; the rest with the reason."""
    needs = {"st_fp32": "sentence_transformers", "ort_int8": "onnxruntime"}
    kept, missing = [], {}
    for mode in modes:
        module = needs.get(mode)
        try:
            if module:
                __import__(module)
            kept.append(mode)
        except ImportError as exc:
            missing[mode] = f"{module} not installed ({exc})"
    return kept, missing


def cosines(outputs: dict, reference: str) -> dict:
    ref = outputs[reference]
    cos = {k: (v * ref).sum(1) for k, v in outputs.items()}
    return {k: {"mean": round(float(c.mean()), 5), "min": round(float(c.min()), 5)}
            for k, c in cos.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from tests.factories import minilm_dir

    torch.set_num_threads(args.threads)
    modes, missing = available(args.modes.split(","))
    path = str(minilm_dir())
    tok = AutoTokenizer.from_pretrained(path)
    texts = make_texts(tok, args.num_texts, 8, 254, args.seed)
    with tempfile.TemporaryDirectory() as workdir:
        build = {"packserve_int8": lambda: packserve_mode(path, tok, texts, args, "int8"),
                 "packserve_fp32": lambda: packserve_mode(path, tok, texts, args, None),
                 "st_fp32": lambda: st_mode(path, texts, args),
                 "ort_int8": lambda: ort_mode(path, tok, texts, args, Path(workdir))}
        fns = {m: build[m]() for m in modes}
        runs, outputs = interleave(fns, args.repeats)
    reference = "st_fp32" if "st_fp32" in outputs else "packserve_fp32"
    lengths = np.array([len(x) for x in tok(texts)["input_ids"]])
    texts_per_s = {k: round(len(texts) / r["median_wall_s"], 1) for k, r in runs.items()}
    ours = runs.get("packserve_int8")
    result = {
        "machine": _common.machine_info(), "threads": args.threads, "budget": args.budget,
        "batch_size": args.batch_size, "cpu_int8_config": cpu_int8_config(),
        "model": "all-MiniLM-L6-v2 (real weights)", "num_texts": len(texts),
        "num_tokens": int(lengths.sum()), "mean_tokens": float(lengths.mean()),
        "max_tokens": int(lengths.max()), "modes_left_out": missing,
        "runs": runs, "texts_per_s": texts_per_s,
        "packserve_int8_speedup_wall": ({k: round(r["median_wall_s"] / ours["median_wall_s"], 3)
                                         for k, r in runs.items()} if ours else {}),
        "quality_reference": reference, "cosine_to_reference": cosines(outputs, reference),
        "load_average": load_average()}
    write(args.out, result)
    print(f"texts/s {texts_per_s}; packserve_int8 speedup {result['packserve_int8_speedup_wall']}")
    print(f"cosine to {reference}: {result['cosine_to_reference']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
