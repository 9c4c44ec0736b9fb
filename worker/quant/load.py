"""FP8 at load: an FP8 checkpoint's scales onto the linear layers that hold its weights,
then those layers (or, for ``quantization="fp8"``, every eligible one) as ``Fp8Linear``.

The order inside ``load_model``::

    prepare()              config.json -> Fp8Format; quantization_config taken off the
                           config, so transformers loads the e4m3 weights as plain tensors
                           of the model dtype (exact: every e4m3 value is a bf16, fp16 and
                           fp32 value) and builds no quantizer of its own
    from_pretrained()
    attach_scales()        each quantized Linear gets ``fp8_scales`` (read from the
                           safetensors files); a scale whose module is not a Linear of the
                           model (fused MoE experts) is refused by name
    shard()                tensor parallelism cuts ``fp8_scales`` with the weight rows
                           (worker/parallel/shard.py)
    convert()              Linear + fp8_scales -> Fp8Linear (the weight back to e4m3);
                           ``quantization="fp8"``: quantize per output channel
    .to(device); select_mode()   _scaled_mm or its fallback, checked on the device
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from worker.core.config import ConfigError
from worker.quant.formats import (
    FIELD,
    Fp8Format,
    check_request,
    detect_format,
    read_quantization_config,
)
from worker.quant.fp8 import FP8, Fp8Linear

logger = logging.getLogger(__name__)

_SCALE = re.compile(r"^(?P<module>.+)\.(?P<kind>weight_scale|input_scale|k_scale|v_scale)$")
_LAYER = re.compile(r"layers\.(\d+)\.")
_ROUTER = re.compile(r"(^|\.)(gate|router)$")  # MoE routers stay in the model dtype
_ALIGN = 16  # _scaled_mm on CUDA takes in/out features that are multiples of 16


@dataclass
class Fp8Scales:
    """What a Linear of an FP8 checkpoint carries until ``convert``."""

    weight: torch.Tensor  # [out] per channel, or [] per tensor, fp32
    input: torch.Tensor | None = None  # static per-tensor activation scale
    activation_scale_ub: float | None = None

    def rows(self, lo: int, hi: int) -> Fp8Scales:
        """The scales of output rows ``[lo, hi)`` (a column-parallel shard)."""
        weight = self.weight[lo:hi].clone() if self.weight.ndim == 1 else self.weight
        return Fp8Scales(weight, self.input, self.activation_scale_ub)


def prepare(hf_config, path: str, requested: str | None, decoder: bool) -> Fp8Format | None:
    """The checkpoint's FP8 format (None if unquantized), with what ``quantization`` asks
    of it checked; takes ``quantization_config`` off ``hf_config``."""
    fmt = detect_format(read_quantization_config(hf_config, path))
    check_request(requested, fmt, decoder)
    if getattr(hf_config, "quantization_config", None) is not None:
        del hf_config.quantization_config
    return fmt


def _checkpoint_scales(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(FIELD, f"an FP8 checkpoint needs .safetensors files; {path} has none")
    scales, dtypes = {}, {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                if _SCALE.match(key):
                    scales[key] = f.get_tensor(key).float()
                elif key.endswith(".weight"):
                    dtypes[key] = f.get_slice(key).get_dtype()
    for key in scales:
        m = _SCALE.match(key)
        if m["kind"] == "weight_scale" and dtypes.get(m["module"] + ".weight") != "F8_E4M3":
            raise ConfigError(FIELD, f"{m['module']}.weight is stored as "
                              f"{dtypes.get(m['module'] + '.weight')}, not F8_E4M3, beside its "
                              f"weight_scale; packserve serves e4m3 FP8 only")
    return scales


def _module_of(linears: dict[str, nn.Linear], name: str) -> tuple[str, nn.Linear] | None:
    for candidate in (name, name.removeprefix("model."), "model." + name):
        if candidate in linears:
            return candidate, linears[candidate]
    return None


def attach_scales(model: nn.Module, path: str, fmt: Fp8Format) -> int:
    """Put ``fp8_scales`` on every Linear the checkpoint quantized; set
    ``model.kv_cache_scales`` ({layer: (k_scale, v_scale)}) when it carries them.
    Returns the number of quantized Linears."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    scales = _checkpoint_scales(path)
    found, experts, kv = 0, 0, {}
    for key, value in sorted(scales.items()):
        m = _SCALE.match(key)
        module, kind = m["module"], m["kind"]
        if kind in ("k_scale", "v_scale"):
            layer = _LAYER.search(module)
            if layer is None:
                raise ConfigError(FIELD, f"{key}: a KV-cache scale outside a numbered layer")
            kv.setdefault(int(layer[1]), {})[kind] = float(value.reshape(-1)[0])
            continue
        if kind == "input_scale":
            continue  # read with its weight_scale
        hit = _module_of(linears, module)
        if hit is None and _dequantize_expert(model, module, value):
            experts += 1
            continue
        if hit is None:
            raise ConfigError(FIELD, f"{module}: the checkpoint quantized it, but it is not a "
                              f"linear layer or a MoE expert of this {type(model).__name__}")
        linear = hit[1]
        if linear is model.get_output_embeddings():
            raise ConfigError(FIELD, f"{module}: an FP8 LM head is not served (llm-compressor "
                              f"and ModelOpt leave it unquantized by default)")
        weight = value.reshape(-1)
        if weight.numel() not in (1, linear.out_features):
            raise ConfigError(FIELD, f"{module}.weight_scale has {weight.numel()} values for "
                              f"{linear.out_features} output channels (per-tensor or "
                              f"per-channel only)")
        input_scale = scales.get(module + ".input_scale")
        if fmt.static_activations and input_scale is None:
            raise ConfigError(FIELD, f"{module}: static activations without an input_scale")
        linear.fp8_scales = Fp8Scales(weight if weight.numel() > 1 else weight.reshape(()),
                                      input_scale.reshape(()) if fmt.static_activations
                                      else None, fmt.activation_scale_ub)
        found += 1
    if experts:
        logger.warning("FP8 checkpoint (%s): %d MoE expert projections dequantized to %s at "
                       "load (FP8 expert GEMMs are not implemented: the experts hold the "
                       "model dtype's memory)", fmt.method, experts, next(
                           model.parameters()).dtype)
    if not found + experts:
        raise ConfigError(FIELD, f"the checkpoint's config says {fmt.method} FP8, but no "
                          f"weight_scale was found in {path}")
    if kv:
        incomplete = sorted(layer for layer, s in kv.items() if len(s) != 2)
        if incomplete:
            raise ConfigError(FIELD, f"layers {incomplete} carry only one of k_scale/v_scale")
        model.kv_cache_scales = {layer: (s["k_scale"], s["v_scale"])
                                 for layer, s in sorted(kv.items())}
    logger.info("FP8 checkpoint (%s): %d linear layers in FP8%s", fmt.method, found,
                f", KV-cache scales for {len(kv)} layers" if kv else "")
    return found


_EXPERT = re.compile(r"^(?P<layer>.*layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\."
                     r"(?P<e>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)$")
_GATE, _UP = ("w1", "gate_proj"), ("w3", "up_proj")


def _dequantize_expert(model: nn.Module, module: str, scale: torch.Tensor) -> bool:
    """Multiply one expert projection's scale into transformers' fused experts (which
    hold the e4m3 values as loaded): ``gate_up_proj [E, 2I, H]`` (gate rows, then up
    rows) or ``down_proj [E, H, I]``. False if ``module`` names no such expert."""
    m = _EXPERT.match(module)
    if m is None:
        return False
    experts = None
    for name in (m["layer"], m["layer"].removeprefix("model."), "model." + m["layer"]):
        try:
            experts = model.get_submodule(name + ".mlp.experts")
            break
        except AttributeError:
            continue
    if experts is None or getattr(experts, "is_transposed", True) or not hasattr(
            experts, "gate_up_proj"):
        return False
    e, proj, width = int(m["e"]), m["proj"], experts.gate_up_proj.shape[1] // 2
    if proj in _GATE + _UP:
        lo = 0 if proj in _GATE else width
        target = experts.gate_up_proj.data[e, lo:lo + width]
    else:
        target = experts.down_proj.data[e]
    s = scale.reshape(-1)
    if s.numel() not in (1, target.shape[0]):
        raise ConfigError(FIELD, f"{module}.weight_scale has {s.numel()} values for "
                          f"{target.shape[0]} output channels")
    target.copy_((target.float() * (s[:, None] if s.numel() > 1 else s)).to(target.dtype))
    return True


def online_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears ``quantization="fp8"`` converts: those of the decoder layers, routers
    excepted (embeddings, the LM head and a classifier's head stay in the model dtype)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".layers." not in f".{name}":
            continue
        if _ROUTER.search(name):
            continue
        out.append((name, module))
    return out


def convert(model: nn.Module, online: bool) -> int:
    """Replace each Linear carrying ``fp8_scales`` (or, ``online``, each target) by an
    ``Fp8Linear``; layers whose features are not multiples of 16 stay as they are."""
    if online:
        targets = online_targets(model)
    else:
        targets = [(n, m) for n, m in model.named_modules() if hasattr(m, "fp8_scales")]
    converted, skipped = 0, []
    for name, linear in targets:
        if linear.in_features % _ALIGN or linear.out_features % _ALIGN:
            if not online:
                raise ConfigError(FIELD, f"{name}: {linear.in_features}x{linear.out_features}"
                                  f" is not a multiple of {_ALIGN} (FP8 GEMMs need it)")
            skipped.append(name)
            continue
        if online:
            layer = Fp8Linear.from_linear(linear)
        else:
            s = linear.fp8_scales
            layer = Fp8Linear(linear.weight.data.to(FP8), s.weight,
                              None if linear.bias is None else linear.bias.data,
                              linear.weight.dtype, input_scale=s.input,
                              activation_scale_ub=s.activation_scale_ub)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        converted += 1
    if skipped:
        logger.warning("FP8: %d linear layers kept in the model dtype (features not a "
                       "multiple of %d): %s", len(skipped), _ALIGN, ", ".join(skipped[:4]))
    return converted
