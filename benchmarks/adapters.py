"""Random LoRA adapters in PEFT's format, for benchmarks and demos, without ``peft``.

``write_adapter(base, out, r=16, targets=QV)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` with the keys and shapes PEFT writes for the Llama-style
decoder at ``base`` (its ``config.json``: hidden size, heads, KV heads, intermediate
size, layers). The weights are random: an adapter measures cost, not quality. The tests
make theirs with ``peft`` itself (tests/lora_factories.py), the oracle of correctness.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a Llama-style decoder layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def write_adapter(base: str | os.PathLike, out: str | os.PathLike, *, r: int = 16,
                  alpha: float = 32, targets=QV, seed: int = 0, scale: float = 0.05) -> Path:
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(base) / "config.json").read_text())
    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):  # per decoder layer
        for name in targets:  # per targeted projection
            d_in, d_out = shapes[name]
            part = "self_attn" if name in _ATTN else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * scale
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM"}))
    return out
