"""FP8 checkpoints written the way their tools write them, from a tiny saved model, and
the fp32 reference whose weights are their dequantized values.

| method                | tensors per quantized Linear                                    | config |
|-----------------------|-----------------------------------------------------------------|--------|
| ``compressed-tensors`` | ``weight`` F8_E4M3, ``weight_scale`` [out, 1] (channel) or [1] (tensor), ``input_scale`` [1] (static) | ``quantization_config`` as llm-compressor 0.x writes it (``config_groups``, ``ignore: [lm_head]``, ``format: float-quantized``, ``quantization_status: compressed``) |
| ``fbgemm_fp8``        | ``weight`` F8_E4M3, ``weight_scale`` [out, 1]                   | ``quant_method: fbgemm_fp8``, ``activation_scale_ub`` |
| ``modelopt``          | ``weight`` F8_E4M3, ``weight_scale`` [], ``input_scale`` []; ``k_proj.k_scale``, ``v_proj.v_scale`` | ``hf_quant_config.json`` (``producer: modelopt``) |

The quantized modules: every Linear of the decoder layers but MoE routers (Mixtral's
per-expert ``w1/w2/w3`` included); embeddings and the LM head stay.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker.quant.fp8 import FP8_MAX

_TARGET = re.compile(r"layers\.\d+\..*(proj|w1|w2|w3)\.weight$")


def _quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def make_fp8_checkpoint(src: Path, dst: Path, method: str = "compressed-tensors", *,
                        strategy: str = "channel", static: bool = False,
                        kv_scales: bool = False, input_amax: float = 4.0) -> Path:
    """Copy ``src`` (a saved model) to ``dst`` with its linear layers in FP8 as ``method``
    stores them. ``static``: per-tensor input scales of ``input_amax / 448``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    per_channel = method == "fbgemm_fp8" or (method == "compressed-tensors"
                                             and strategy == "channel")
    static = static or method == "modelopt"
    for key, value in tensors.items():
        if not _TARGET.search(key):
            out[key] = value
            continue
        q, scale = _quantize(value, per_channel)
        prefix = key.removesuffix(".weight")
        out[key] = q
        if method == "modelopt":
            out[prefix + ".weight_scale"] = scale.reshape(())
        else:
            out[prefix + ".weight_scale"] = scale.to(torch.bfloat16 if method ==
                                                     "compressed-tensors" else torch.float32)
        if static:
            s = torch.tensor(input_amax / FP8_MAX)
            out[prefix + ".input_scale"] = s.reshape(()) if method == "modelopt" else s.reshape(1)
        if kv_scales and prefix.endswith(("k_proj", "v_proj")):
            name = "k_scale" if prefix.endswith("k_proj") else "v_scale"
            out[prefix + "." + name] = torch.tensor(0.05 if name == "k_scale" else 0.04)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if method == "compressed-tensors":
        config["quantization_config"] = _compressed_tensors_config(strategy, static, kv_scales)
    elif method == "fbgemm_fp8":
        config["quantization_config"] = {"quant_method": "fbgemm_fp8",
                                         "activation_scale_ub": 1200.0,
                                         "modules_to_not_convert": ["lm_head"]}
    elif method == "modelopt":
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": {"quant_algo": "FP8",
                             "kv_cache_quant_algo": "FP8" if kv_scales else None,
                             "exclude_modules": ["lm_head"]}}))
    else:
        raise ValueError(method)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _compressed_tensors_config(strategy: str, static: bool, kv_scales: bool) -> dict:
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                   "strategy": "tensor" if static else "token", "dynamic": not static,
                   "block_structure": None, "actorder": None, "observer": None if not static
                   else "minmax", "observer_kwargs": {}}
    config = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "version": "0.9.1",
        "global_compression_ratio": 1.2, "sparsity_config": {},
        "ignore": ["lm_head", "re:.*mlp.gate$"],
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None, "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                        "strategy": strategy, "dynamic": False, "block_structure": None,
                        "actorder": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": activations}},
        "kv_cache_scheme": None,
    }
    if kv_scales:
        config["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "symmetric": True,
                                     "strategy": "tensor", "dynamic": False}
    return config


def dequantized_checkpoint(fp8_dir: Path, dst: Path) -> Path:
    """``fp8_dir`` as an unquantized fp32 checkpoint of its dequantized values (``q * s``),
    scales dropped: the reference model loads it with plain ``from_pretrained``."""
    shutil.copytree(fp8_dir, dst)
    (dst / "hf_quant_config.json").unlink(missing_ok=True)
    tensors = load_file(fp8_dir / "model.safetensors")
    out = {}
    for key, value in tensors.items():
        if re.search(r"\.(weight_scale|input_scale|k_scale|v_scale)$", key):
            continue
        if value.dtype == torch.float8_e4m3fn:
            scale = tensors[key.removesuffix(".weight") + ".weight_scale"].float()
            value = value.float() * (scale.reshape(-1, 1) if scale.numel() > 1
                                     else scale.reshape(()))
        out[key] = value
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
