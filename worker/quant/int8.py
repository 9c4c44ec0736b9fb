"""Dynamic int8 linear layers for encoders on CPU (``quantization="int8"``).

What one call computes, for ``x [M, in]`` and the stored ``q [out, in]`` (int8)::

    s_w  [out]    per output channel: amax(|w_n|) / 127, fixed at load
    s_x  [M, 1]   per token: amax(|x_m|) / 127, computed on every call (dynamic)
    x_q  = round(x / s_x) in [-127, 127], int8
    y    = (x_q @ q.T) * s_w * s_x  (+ bias)          int32 accumulation

Why per token and not torch's ``quantize_dynamic`` (one scale per input tensor): a packed
bin holds up to ``max_num_batched_tokens`` tokens of many sequences, so one scale per call
lets the largest activation of any token set the grid of all of them. On the real
all-MiniLM-L6-v2 that costs the embeddings a mean cosine of 0.86 to fp32 (the FFN's
second layer, after GELU, is the worst); per token it is 0.993 (docs/decisions.md).

Backends, chosen once at load by :func:`select_backend` (the first that runs and equals
the fp32 product of the quantized operands on a small input):

| backend   | the int8 GEMM                                        | where                   |
|-----------|------------------------------------------------------|-------------------------|
| ``onednn``| ``onednn::qlinear_pointwise`` on a prepacked weight, | x86 builds of torch     |
|           | s_w applied inside, fp32 out (VNNI / AMX when there) |                         |
| ``int_mm``| ``torch._int_mm`` (int32 out), both scales after     | any CPU build           |

The layer keeps ``in_features`` / ``out_features`` and a ``weight`` (the int8 tensor) so
that code which reads shapes finds them; nothing may ``F.linear`` that weight directly.
Heads stay fp32: only linear layers of the base model are converted, never the pooler
(it feeds only a classifier) nor anything outside the base model (``classifier``,
``score``): they run on one row per sequence, so int8 would save nothing there.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from worker.core.config import ConfigError

logger = logging.getLogger(__name__)

INT8_MAX = 127.0  # symmetric: -128 is never used, so -x quantizes like x
_MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
ONEDNN, INT_MM = "onednn", "int_mm"
BACKENDS = (ONEDNN, INT_MM)  # preference order
_SKIPPED = ("pooler",)  # base-model children that feed only a head


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [out, in] int8, scale [out] fp32)`` with ``q * scale`` the closest grid to ``w``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(_MIN_SCALE)
    return (w / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q [M, in] int8, scale [M, 1] fp32)``: one scale per row (token)."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(_MIN_SCALE)
    return (x / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A linear layer of int8 weights and per-token int8 activations; fp32 accumulation
    scaled back, output in the input's dtype."""

    def __init__(self, linear: nn.Linear, backend: str):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.out_features, self.in_features = linear.weight.shape
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight", q)  # [out, in] int8: shapes only, never F.linear it
        self.register_buffer("weight_scale", scale)  # [out] fp32
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.backend = backend
        if backend == ONEDNN:  # opaque blocked layout, made once (not in the state dict)
            self._packed = torch.ops.onednn.qlinear_prepack(q, None)
            self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        else:
            self._q_t = q.t().contiguous()  # [in, out]: _int_mm's right operand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_q, s_x = quantize_rows(x.reshape(-1, self.in_features))
        if self.backend == ONEDNN:  # x_scale 1, zero point 0: s_x is applied below
            y = torch.ops.onednn.qlinear_pointwise(
                x_q, 1.0, 0, self._packed, self.weight_scale, self._zero_points, None,
                1.0, 0, torch.float32, "none", [], "")
        else:
            y = torch._int_mm(x_q, self._q_t).float() * self.weight_scale
        y = y * s_x if self.bias is None else torch.addcmul(self.bias, y, s_x)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"backend={self.backend}")


def reference_product(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute, in fp64 from its quantized operands (its definition)."""
    x_q, s_x = quantize_rows(x.reshape(-1, layer.in_features))
    y = (x_q.double() @ layer.weight.double().t()) * layer.weight_scale.double() * s_x
    return y if layer.bias is None else y + layer.bias.double()


def select_backend(linear: nn.Linear) -> str:
    """The first backend whose layer runs and equals :func:`reference_product` on a small
    input (odd sizes, a zero row); ``ConfigError`` when none does."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, linear.in_features, generator=gen)
    x[3] = 0.0
    failures = []
    for backend in BACKENDS:
        try:
            layer = Int8Linear(linear, backend)
            got, want = layer(x).double(), reference_product(layer, x)
            err = ((got - want).abs() / (1 + want.abs())).max().item()
            if err <= 1e-4:
                return backend
            failures.append(f"{backend}: off by {err:.3g}")
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            failures.append(f"{backend}: {type(exc).__name__}: {str(exc)[:120]}")
    raise ConfigError("quantization", "'int8' found no int8 GEMM that works in this torch "
                      f"build ({'; '.join(failures)}); serve without --quantization")


def quantize_int8(model: nn.Module, *, decoder: bool, device: torch.device) -> int:
    """Replace the base model's ``nn.Linear`` layers in place with :class:`Int8Linear`;
    returns how many. Encoders on CPU only: a decoder is refused by name."""
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if decoder:
        raise ConfigError("quantization", f"'int8' is for encoder models on CPU (dynamic int8 "
                          f"linear layers); {kind!r} is a decoder: use 'fp8' (CUDA) or no "
                          "quantization")
    if torch.device(device).type != "cpu":
        raise ConfigError("quantization", f"'int8' runs encoders on CPU, not on {device}; "
                          "use 'fp8' there")
    base = model.base_model
    found = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.Linear) and name.split(".", 1)[0] not in _SKIPPED]
    if not found:
        return 0
    backend = select_backend(found[0][1])
    for name, linear in found:  # once per linear layer, at load
        parent_name, _, leaf = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, leaf, Int8Linear(linear, backend))
    logger.info("int8: %d linear layers of %s quantized (per-token activations, %s GEMM)",
                len(found), kind, backend)
    return len(found)
