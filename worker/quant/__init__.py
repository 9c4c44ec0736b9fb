"""Quantized serving: FP8 linear layers (checkpoint formats and ``quantization="fp8"``),
the FP8 KV cache's scales, and dynamic int8 encoders on CPU.

Layer: above ``core`` and ``params``, below ``kv`` (the cache stores FP8 through it) and
``models`` (the loader swaps the linear layers through it).
"""
