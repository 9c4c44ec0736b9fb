"""Grouped-GEMM experts for mixture-of-experts decoders, checked once at start-up.

transformers 5 runs every experts module marked ``@use_experts_implementation`` (Mixtral,
Qwen3-MoE and most MoE families) through the function that
``config._experts_implementation`` names:

| name           | what one layer does over its ``[T, hidden]`` rows                        |
|----------------|--------------------------------------------------------------------------|
| ``eager``      | a Python loop over the experts hit: gather, two linears, ``index_add_``; |
|                | ``nonzero()`` and the loop are host syncs (no CUDA-graph capture)        |
| ``grouped_mm`` | the T * top_k (row, expert) pairs sorted by expert, then one             |
|                | ``torch.nn.functional.grouped_mm`` per projection over expert offsets    |

``grouped_mm`` is what ``from_pretrained`` picks when nothing is asked for (transformers
5.17 and 5.25 alike), but nothing checks that it runs: ``grouped_mm`` needs every row
stride to be a multiple of 16 bytes, so an fp32 model whose expert width is not a
multiple of 4 raises at its first forward, mid-request. :func:`install_grouped_experts`
selects ``grouped_mm`` explicitly, runs each distinct experts shape once against the
loop on the model's own device and dtype, and keeps the loop (one warning) when
``grouped_mm`` is missing, raises or disagrees: an engine never fails to start for it.

Packing needs nothing here: a packed forward hands the model ``[1, T, hidden]``, the MoE
block flattens it to T rows and routes each row on its own (softmax, top-k and the
family's renormalisation stay transformers' code). On CUDA, torch runs its fused kernel
only for bfloat16 on SM90/SM100 (``_grouped_mm_cuda`` in ATen's ``GroupedBlas.cpp``);
other dtypes and GPUs get torch's per-group loop, correct but with a host sync per call.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

GROUPED = "grouped_mm"
LOOP = "eager"
# relative L2 error allowed, grouped vs loop; in bf16 / fp16 the loop accumulates in the
# model dtype and grouped_mm's reduction in fp32
_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
_HALF_TOLERANCE = 2e-2


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The experts modules that transformers dispatches by ``_experts_implementation``."""
    return [m for m in model.modules()
            if hasattr(m, "has_gate") and hasattr(m, "is_transposed")
            and hasattr(getattr(m, "config", None), "_experts_implementation")]


def install_grouped_experts(model: torch.nn.Module) -> int:
    """Run ``model``'s MoE experts through ``grouped_mm`` if it passes its start-up check.

    Returns the number of experts modules (one per MoE layer) now on ``grouped_mm``: 0 for
    a dense model, and 0 after a fallback to the loop. Call it once the model is on its
    device in its dtype and in eval mode: the check runs there.
    """
    experts = experts_modules(model)
    if not experts:
        return 0
    weight = next(experts[0].parameters())
    where = f"{weight.device.type} {str(weight.dtype).removeprefix('torch.')}"
    try:
        problem = _check(model, experts)
    except Exception as exc:  # any failure of the candidate means: keep the loop
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        logger.info("MoE experts: %d layers on grouped_mm (%s, %s)", len(experts), where,
                    "fused kernel" if fused_kernel(weight.device, weight.dtype)
                    else "torch's per-group loop")
        return len(experts)
    try:
        model.set_experts_implementation(LOOP)
    except Exception as exc:  # noqa: BLE001  (then whatever transformers chose stays)
        problem += f"; selecting the loop failed too ({type(exc).__name__}: {exc})"
    logger.warning("MoE experts: grouped_mm failed its start-up check on %s (%s); %d MoE "
                   "layers run transformers' per-expert loop (correct, slower)",
                   where, problem, len(experts))
    return 0


def fused_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch runs ``grouped_mm`` as one fused kernel here (no host sync, capturable
    in a CUDA graph); otherwise it loops over the groups itself."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def _check(model, experts) -> str | None:
    """None if ``grouped_mm`` matches the loop on one module of each distinct shape."""
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return f"torch {torch.__version__} has no grouped_mm (torch >= 2.9 has)"
    if not hasattr(model, "set_experts_implementation"):
        return "this transformers cannot switch experts implementations"
    seen, picked = set(), []
    for module in experts:
        key = (type(module), *(tuple(p.shape) for p in module.parameters()))
        if key not in seen:
            seen.add(key)
            picked.append(module)
    cases = [_probe_inputs(m) for m in picked]
    with torch.inference_mode():
        model.set_experts_implementation(LOOP)
        expected = [m(*case) for m, case in zip(picked, cases)]
        model.set_experts_implementation(GROUPED)
        for module, case, want in zip(picked, cases, expected):
            problem = _compare(module(*case), want)
            if problem is not None:
                return f"{type(module).__name__}: {problem}"
    return None


def _probe_inputs(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rows routed top-2 over every expert but the last, which gets no row (an
    empty group): ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``."""
    weight = next(module.parameters())
    num_experts = int(getattr(module, "num_experts", weight.shape[0]))
    hidden_size = int(getattr(module, "hidden_dim", None) or getattr(module, "hidden_size", None)
                      or module.config.hidden_size)
    top_k = min(2, max(num_experts - 1, 1))
    num_rows = 3 * num_experts + 1
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(num_rows, num_experts, generator=gen)
    if num_experts > top_k:
        scores[:, -1] = float("-inf")
    top, index = scores.topk(top_k, dim=-1)
    hidden = torch.randn(num_rows, hidden_size, generator=gen)
    to = dict(device=weight.device)
    return (hidden.to(**to, dtype=weight.dtype), index.to(**to),
            top.softmax(dim=-1).to(**to, dtype=weight.dtype))


def _compare(got: torch.Tensor, want: torch.Tensor) -> str | None:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, the loop's {tuple(want.shape)}"
    tolerance = _TOLERANCE.get(want.dtype, _HALF_TOLERANCE)
    got, want = got.float(), want.float()
    if not bool(torch.isfinite(got).all()):
        return "non-finite outputs"
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return None if error <= tolerance else f"relative error {error:.2e} > {tolerance:.0e}"
