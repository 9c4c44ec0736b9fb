"""Which quantized checkpoint a model directory holds, read from its config alone, and the
refusal of every format the engine does not implement.

| ``quant_method`` (config.json ``quantization_config``) | served as                         |
|-------------------------------------------------------|-----------------------------------|
| ``compressed-tensors`` (llm-compressor), FP8 groups   | e4m3 weights, per-tensor or per-channel ``weight_scale``; activations dynamic per token, or static per tensor (``input_scale``) |
| ``fbgemm_fp8``                                         | e4m3 weights, per-channel ``weight_scale``; dynamic per-token activations capped at ``activation_scale_ub`` |
| ``modelopt`` ``quant_algo: FP8`` (or hf_quant_config.json) | e4m3 weights, per-tensor ``weight_scale``; static per-tensor ``input_scale``; ``k_scale`` / ``v_scale`` for an FP8 KV cache |

Anything else with a ``quantization_config`` (AWQ, GPTQ, bitsandbytes, block-wise FP8,
compressed-tensors int4/int8 or FP4 groups, ModelOpt NVFP4, ...) is a ``ConfigError``
naming the method and listing these: wrong output is worse than a refusal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from worker.core.config import ConfigError

FIELD = "quantization"
SUPPORTED = ("compressed-tensors FP8 (per-tensor / per-channel weights)", "fbgemm_fp8",
             "modelopt FP8", "quantization='fp8' of a bf16/fp16/fp32 checkpoint",
             "quantization='int8' of an encoder on CPU")


@dataclass(frozen=True)
class Fp8Format:
    """How an FP8 checkpoint's linear layers are stored."""

    method: str  # "compressed-tensors" | "fbgemm_fp8" | "modelopt"
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left unquantized
    static_activations: bool = False  # the checkpoint carries per-tensor input_scale
    activation_scale_ub: float | None = None  # FBGEMM's cap on a token's amax
    kv_cache_scales: bool = False  # k_scale / v_scale for an FP8 KV cache


def _refuse(what: str) -> ConfigError:
    return ConfigError(FIELD, f"this checkpoint is quantized as {what}, which packserve does "
                       f"not serve; supported: {'; '.join(SUPPORTED)}")


def read_quantization_config(hf_config, path: str) -> dict | None:
    """The checkpoint's ``quantization_config`` (config.json), else ModelOpt's
    ``hf_quant_config.json`` as the same shape, else None."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None:
        return qc if isinstance(qc, dict) else qc.to_dict()
    side = os.path.join(path, "hf_quant_config.json")
    if os.path.isfile(side):
        with open(side) as f:
            data = json.load(f)
        quant = data.get("quantization", {})
        return {"quant_method": "modelopt", **quant}
    return None


def detect_format(qc: dict | None) -> Fp8Format | None:
    """The FP8 format ``qc`` describes, None for an unquantized checkpoint; ``ConfigError``
    for any other quantization."""
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fbgemm_fp8":
        return Fp8Format("fbgemm_fp8", ignore=tuple(qc.get("modules_to_not_convert") or ()),
                         activation_scale_ub=float(qc.get("activation_scale_ub", 1200.0)))
    if method == "modelopt":
        algo = str(qc.get("quant_algo", "")).upper()
        if algo != "FP8":
            raise _refuse(f"modelopt {algo or '(no quant_algo)'}")
        kv = qc.get("kv_cache_quant_algo")
        if kv not in (None, "FP8"):
            raise _refuse(f"modelopt with a {kv} KV cache")
        return Fp8Format("modelopt", ignore=tuple(qc.get("exclude_modules") or ()),
                         static_activations=True, kv_cache_scales=kv == "FP8")
    if method == "fp8" and qc.get("weight_block_size"):
        raise _refuse(f"block-wise FP8 (weight_block_size {qc['weight_block_size']})")
    raise _refuse(repr(method or qc))


def _compressed_tensors(qc: dict) -> Fp8Format:
    fmt = qc.get("format", "")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _refuse(f"compressed-tensors format {fmt!r}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _refuse("compressed-tensors without config_groups")
    static = set()
    for name, group in groups.items():
        w, a = group.get("weights") or {}, group.get("input_activations")
        if (w.get("type"), w.get("num_bits")) != ("float", 8) or w.get("strategy") not in (
                "tensor", "channel") or w.get("symmetric") is False:
            raise _refuse(f"compressed-tensors group {name!r} with weights "
                          f"{w.get('type')}{w.get('num_bits')} {w.get('strategy')}")
        targets = group.get("targets") or []
        if any(t != "Linear" and not str(t).startswith("re:") for t in targets):
            raise _refuse(f"compressed-tensors group {name!r} targeting {targets}")
        if a is None:
            raise _refuse(f"compressed-tensors group {name!r}: FP8 weights with unquantized "
                          f"activations (weight-only FP8)")
        if (a.get("type"), a.get("num_bits")) != ("float", 8):
            raise _refuse(f"compressed-tensors group {name!r} with activations "
                          f"{a.get('type')}{a.get('num_bits')}")
        dynamic = a.get("dynamic") is True
        if dynamic and a.get("strategy") not in ("token", "tensor"):
            raise _refuse(f"compressed-tensors activations strategy {a.get('strategy')!r}")
        if not dynamic and a.get("strategy") != "tensor":
            raise _refuse(f"compressed-tensors static activations {a.get('strategy')!r}")
        static.add(not dynamic)
    if len(static) > 1:
        raise _refuse("compressed-tensors groups mixing static and dynamic activations")
    kv = qc.get("kv_cache_scheme")
    if kv is not None and (kv.get("type"), kv.get("num_bits")) != ("float", 8):
        raise _refuse(f"compressed-tensors KV cache {kv.get('type')}{kv.get('num_bits')}")
    return Fp8Format("compressed-tensors", ignore=tuple(qc.get("ignore") or ()),
                     static_activations=static == {True}, kv_cache_scales=kv is not None)


def check_request(requested: str | None, fmt: Fp8Format | None, decoder: bool) -> None:
    """Refuse what ``quantization`` asks of this checkpoint that cannot be done."""
    if fmt is not None and requested == "int8":
        raise ConfigError(FIELD, f"'int8' quantizes an unquantized encoder; this checkpoint "
                          f"is already {fmt.method} FP8")
    if (fmt is not None or requested == "fp8") and not decoder:
        raise ConfigError(FIELD, "FP8 serves decoders (the generation path); for an encoder "
                          "on CPU use quantization='int8'")
