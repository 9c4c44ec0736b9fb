"""An FP8 KV cache's scales when the checkpoint has none: one calibration forward.

At start, before the first step and before any CUDA graph is captured, the model runs
one forward over ``CALIBRATION_TEXT`` (mixed prose, code, numbers and a chat turn; the
tokenizer adds its BOS, so the attention-sink token is seen) through the ordinary paged
path, into a scratch cache of the model's dtype. The K/V that forward wrote give every
layer and KV head its absolute maximum, and ``scales_from_amax`` maps that maximum,
times ``CALIBRATION_HEADROOM``, to e4m3's largest value. A later value beyond the headroom
saturates at +-448 (``worker.quant.kv.quantize``); it never becomes inf or NaN.

Why not vLLM's default scale of 1.0: a layer whose V values are all below 2^-6 (common)
then stores them as e4m3 subnormals, with one to three significant bits; and why not the
first request's prefill: CUDA graphs are captured before any request, and a short first
prompt would set the scales of every later one (docs/decisions.md).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from worker.attention.context import attention_context
from worker.attention.paged import PagedContext, build_metadata
from worker.kv.cache import KVCache, KVCacheSpec
from worker.quant.kv import scales_from_amax

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = (
    "The committee met on Tuesday, 14 March, to review the budget for the coming year. "
    "Revenue rose 7.5% to $2.31 billion, while costs fell slightly; the chair noted that "
    "the new warehouse in Rotterdam would open in the autumn.\n\n"
    "def merge(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n"
    "User: Can you explain why the sky is blue?\nAssistant: Sunlight is scattered by the "
    "molecules of the air, and short (blue) wavelengths scatter far more than long (red) "
    "ones, so blue light reaches your eyes from every direction of the sky.\n\n"
    "Prime numbers below fifty: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47. "
    "Die Katze schläft auf dem Sofa; le chat dort sur le canapé; 猫はソファで寝ている。"
)
NUM_FALLBACK_TOKENS = 256  # a model without a tokenizer: this many fixed random tokens


def calibration_tokens(tokenizer, vocab_size: int) -> list[int]:
    """The calibration text's token ids, or fixed pseudo-random ids without a tokenizer."""
    if tokenizer is not None:
        ids = [int(t) for t in tokenizer(CALIBRATION_TEXT)["input_ids"]]
        ids = [t for t in ids if 0 <= t < vocab_size]
        if ids:
            return ids
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, NUM_FALLBACK_TOKENS).tolist()


@torch.inference_mode()
def calibrate_kv_scales(model, spec: KVCacheSpec, device, tokenizer, vocab_size: int
                        ) -> torch.Tensor:
    """[L, 2, Hkv] fp32 scales from one forward of the calibration tokens (see above)."""
    ids = calibration_tokens(tokenizer, vocab_size)
    plain = dataclasses.replace(spec, cache_dtype=None)
    num_blocks = spec.num_blocks_for_tokens(len(ids))
    scratch = KVCache(plain, num_blocks, device)
    meta = build_metadata([list(range(num_blocks))], [0], [len(ids)], spec.block_size, device)
    tokens = torch.tensor(ids, device=device).view(1, -1)
    positions = torch.arange(len(ids), device=device).view(1, -1)
    with attention_context(PagedContext(scratch, meta, "reference")) as active:
        model.base_model(input_ids=tokens, position_ids=positions, use_cache=False)
    if active.num_calls != spec.num_layers:
        raise RuntimeError(f"the KV calibration forward reached {active.num_calls} of "
                           f"{spec.num_layers} attention layers")
    amax = scratch.kv.abs().amax(dim=(2, 3, 5)).float()  # [L, 2, Hkv]: unwritten slots are 0
    scales = scales_from_amax(amax)
    logger.info("FP8 KV cache: scales calibrated on %d tokens (K amax %.3g..%.3g, V amax "
                "%.3g..%.3g over layers and heads)", len(ids), amax[:, 0].min(),
                amax[:, 0].max(), amax[:, 1].min(), amax[:, 1].max())
    del scratch
    return scales
