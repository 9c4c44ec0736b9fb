"""FP8 (e4m3) linear layers: weights stored in float8 with their scales, activations
quantized per token as they arrive, one ``torch._scaled_mm`` per call.

What one call computes, for ``x [M, in]`` and the stored ``q [out, in]`` (float8_e4m3fn)::

    s_x  [M, 1]   per token: amax(|x_m|) / 448 (dynamic; FBGEMM caps amax at its upper
                  bound), or the checkpoint's static per-tensor ``input_scale``
    x_q  = clamp(x / s_x, -448, 448) in e4m3
    y    = (x_q @ q.T) * s_x * s_w  (+ bias)   s_w: [out] per channel or one per tensor

``_scaled_mm`` takes the two scale vectors and accumulates in fp32 (CUDA sm89+, and CPU in
torch >= 2.13). The fallback computes the same product in the model's dtype (the weight
upcast per call, then both scales): correct everywhere, no faster than the unquantized
layer. :func:`check_scaled_mm` decides once per device and dtype, at load, which one runs:
an engine never fails to start because ``_scaled_mm`` is missing or wrong.

The layer keeps ``in_features`` / ``out_features`` and a ``weight`` (the e4m3 tensor) so
that code which walks linear layers (tensor-parallel sharding, LoRA's wrapper) finds the
shapes it expects; nothing may ``F.linear`` that weight directly (the LoRA wrapper calls
the layer, worker/lora/layers.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
SCALED_MM, DEQUANT = "scaled_mm", "dequant"


def quantize_weight(w: torch.Tensor, per_channel: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [out, in] e4m3, scale)``: ``scale`` [out] (per channel) or [] (per tensor),
    fp32, with ``q * scale`` the closest e4m3 grid to ``w``."""
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (w / (scale[:, None] if per_channel else scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 (the weights a reference model holds)."""
    scale = scale.float()
    return q.float() * (scale[:, None] if scale.ndim == 1 else scale)


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None,
                         scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q [M, in] e4m3, s_x)``: ``s_x`` [M, 1] per token, or the static [] scale."""
    if static_scale is not None:
        scale = static_scale
    else:
        amax = x.abs().amax(dim=-1, keepdim=True).float()
        if scale_ub is not None:
            amax = amax.clamp(max=scale_ub)
        scale = (amax / FP8_MAX).clamp_min(_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """A linear layer of e4m3 weights with fp32 scales; inputs and outputs in ``dtype``."""

    def __init__(self, q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, *, input_scale: torch.Tensor | None = None,
                 activation_scale_ub: float | None = None, mode: str = SCALED_MM):
        super().__init__()
        if q.dtype != FP8 or q.ndim != 2:
            raise ValueError(f"Fp8Linear takes a 2-D {FP8} weight, got {q.dtype} {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        weight_scale = weight_scale.float().reshape(-1)
        if weight_scale.numel() not in (1, self.out_features):
            raise ValueError(f"weight_scale has {weight_scale.numel()} values for "
                             f"{self.out_features} output channels (1 or one per channel)")
        self.weight = nn.Parameter(q, requires_grad=False)
        # one [1, out] row either way: _scaled_mm's row-wise form takes it as is
        self.register_buffer("weight_scale", weight_scale.expand(self.out_features)
                             .reshape(1, -1).contiguous())
        self.per_channel = weight_scale.numel() > 1
        self.register_buffer("input_scale", None if input_scale is None
                             else input_scale.float().reshape(()).clone())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dtype, self.activation_scale_ub, self.mode = dtype, activation_scale_ub, mode

    @classmethod
    def from_linear(cls, linear: nn.Module, mode: str = SCALED_MM) -> Fp8Linear:
        """Quantize ``linear``'s weight per output channel (``quantization="fp8"``)."""
        q, scale = quantize_weight(linear.weight.data)
        return cls(q, scale, None if linear.bias is None else linear.bias.data,
                   linear.weight.dtype, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        x_q, s_x = quantize_activations(x2, self.input_scale, self.activation_scale_ub)
        y = self.matmul(x_q, s_x)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def matmul(self, x_q: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
        """``(x_q @ q.T) * s_x * s_w`` in ``self.dtype``."""
        # a static scale as one row per token: _scaled_mm's row-wise form wants real
        # strides (an expanded [1, 1] keeps stride 0)
        rows = s_x if s_x.ndim == 2 else s_x.reshape(1, 1).repeat(x_q.shape[0], 1)
        if self.mode == SCALED_MM:
            out = self.dtype if self.dtype != torch.float16 else torch.bfloat16  # row-wise
            #   scaling writes bf16 (or fp32), not fp16
            y = torch._scaled_mm(x_q, self.weight.t(), scale_a=rows,
                                 scale_b=self.weight_scale, out_dtype=out)
            return y.to(self.dtype)
        y = F.linear(x_q.to(self.dtype), self.weight.to(self.dtype))
        return y * (rows.to(self.dtype) * self.weight_scale.to(self.dtype))

    def dequantized(self) -> torch.Tensor:
        """The fp32 weights this layer multiplies by."""
        return dequantize_weight(self.weight.data, self.weight_scale[0])

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "per-token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={'per-channel' if self.per_channel else 'per-tensor'}, "
                f"activations={act}, {self.mode}")


def fp8_layers(model: nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]


def check_scaled_mm(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``_scaled_mm`` runs here and matches the fallback on a small product of each
    scale form the layers use (row-wise, and a static input scale); else why not."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (sm89+)"
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    x = torch.randn(5, 64, generator=gen).to(device=device, dtype=dtype)
    q, scale = quantize_weight(w)
    try:
        for static in (None, torch.tensor(0.01)):
            layers = [Fp8Linear(q.to(device), scale.to(device), None, dtype, mode=m,
                                input_scale=None if static is None else static.to(device))
                      for m in (SCALED_MM, DEQUANT)]
            got, want = (layer(x).float() for layer in layers)
            error = float((got - want).norm() / want.norm().clamp_min(1e-30))
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            if not bool(torch.isfinite(got).all()) or error > tolerance:
                return f"relative error {error:.1e} against the fallback (> {tolerance:.0e})"
    except Exception as exc:  # noqa: BLE001  (any failure: keep the fallback)
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def select_mode(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Set every ``Fp8Linear`` of ``model`` to ``_scaled_mm`` if it passes its check here,
    else to the fallback (one warning). Returns the mode, or None without FP8 layers."""
    layers = fp8_layers(model)
    if not layers:
        return None
    problem = check_scaled_mm(device, dtype)
    mode = SCALED_MM if problem is None else DEQUANT
    for layer in layers:
        layer.mode = mode
    if problem is None:
        logger.info("FP8: %d linear layers on torch._scaled_mm (%s)", len(layers), device)
    else:
        logger.warning("FP8: torch._scaled_mm failed its check on %s (%s); %d linear layers "
                       "run the dequantize-and-matmul fallback (correct, not faster than "
                       "the unquantized model)", device, problem, len(layers))
    return mode
