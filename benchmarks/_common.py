"""Helpers shared by the forward, fit-search and host-to-device benchmarks.

Model shapes are random-weight checkpoints built from a config (no download):

| shape        | family | hidden | layers | heads / kv | intermediate | vocab   | max pos |
|--------------|--------|--------|--------|------------|--------------|---------|---------|
| ``tiny``     | Llama  | 64     | 2      | 4 / 2      | 176          | 32,000  | 16,384  |
| ``small``    | Llama  | 256    | 4      | 8 / 2      | 704          | 32,000  | 16,384  |
| ``small-8k`` | Llama  | 256    | 4      | 8 / 2      | 704          | 8,192   | 16,384  |
| ``qwen2.5-7b``| Qwen2 | 3,584  | 28     | 28 / 4     | 18,944       | 152,064 | 32,768  |
| ``qwen2.5-1.5b``| Qwen2 | 1,536 | 28     | 12 / 2     | 8,960        | 151,936 | 32,768  |

``tiny`` is small enough that three modes over 256 Azure-length sequences run in about
two minutes on two CPU cores. ``qwen2.5-7b`` is the real Qwen2.5-7B shape (q/k/v bias,
untied head, rope theta 1e6); it is built in its dtype directly on the device and saved
once (``ensure_checkpoint``), so every process loads it through ``from_pretrained`` like
a real checkpoint and no fp32 copy of 7B parameters is ever made on the host.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._env import machine_info

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPE_NAMES = ("float32", "bfloat16", "float16")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM; MFU is reported against it

SHAPES = {
    "tiny": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 32000, "max_position_embeddings": 16384,
    },
    "small": {  # CPU benchmarks where prefill must cost something (multiturn.py)
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 32000, "max_position_embeddings": 16384,
    },
    "small-8k": {  # pooled.py's decoder scoring: a head that does not drown the attention
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 8192, "max_position_embeddings": 16384,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
    },
    "qwen2.5-1.5b": {  # the generation benchmark's GPU shape (embeddings tied)
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
    },
}
_MARKER = "packserve-shape.json"


def shape_config(shape: str):
    """The transformers config of a named shape (random weights are built from it)."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def ensure_checkpoint(shape: str, dtype: str, device: str, root: str | None = None) -> Path:
    """A random-weight checkpoint of ``shape`` in ``dtype``, saved once and reused.

    Built under ``torch.device(device)`` so a 7B model is created on the GPU in bf16.
    A marker file written last makes a half-written directory (a killed run) rebuild.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    root = root or os.environ.get("PACKSERVE_CHECKPOINTS") or tempfile.gettempdir()
    path = Path(root) / f"packserve-{shape}-{dtype}"
    if (path / _MARKER).exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=getattr(torch, dtype))
    model.save_pretrained(path)
    del model
    _empty_cache(device)
    (path / _MARKER).write_text(json.dumps({"shape": shape, "dtype": dtype}))
    print(f"[checkpoint] {shape} {dtype} -> {path} in {time.perf_counter() - started:.1f}s",
          file=sys.stderr)
    return path


def _empty_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def environment(device: str) -> dict:
    """``_env.machine_info()`` plus the device this run used, for every result file."""
    import torch

    info = machine_info() | {"device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info.get("cpu", "cpu")
    return info


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict; on CUDA it gets ``peak_bytes`` (max allocated during the block)."""
    import torch

    out: dict = {}
    if not device.startswith("cuda"):
        yield out
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out["start_bytes"] = torch.cuda.memory_allocated()
    try:
        yield out
    finally:
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated()


def bar_chart(path: str | Path, bars: dict, title: str, ylabel: str) -> None:
    """One bar per label; a value that is a string (``"oom"``) draws an empty bar so named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    values = [v if isinstance(v, (int, float)) else 0.0 for v in bars.values()]
    colors = ["#999999", "#6699cc", "#2a7f3f", "#cc8833"][: len(bars)]
    drawn = ax.bar(list(bars), values, color=colors)
    for bar, value in zip(drawn, bars.values()):
        label = f"{value:,.0f}" if isinstance(value, (int, float)) else str(value).upper()
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class CallTimer:
    """Seconds spent inside wrapped calls, per key: a benchmark's view of one part of the
    engine (``obj.f = timer.wrap(obj.f, "key")``; ``timer.seconds["key"]``)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def wrap(self, fn, key: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return timed

    def total(self) -> float:
        return sum(self.seconds.values())


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
