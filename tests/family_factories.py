"""Tiny random checkpoints of every family in the matrix (worker/models/families.py,
docs/models.md), built with transformers' own config and model classes and saved with
``save_pretrained``. Like tests/factories.py: hidden 64, 2 layers, vocab 512, weights
drawn wider than the default so masking or rotary bugs show far above tolerances.

Each entry sets what its family is known for, so the matrix exercises it: windows
shorter than the longest prompt (24 < 70), soft-capping small enough to bite, partial
rotary, multipliers away from 1, MoE routing over 4 experts.
"""

from __future__ import annotations

from pathlib import Path

from tests.factories import BUILDERS, MAX_POSITIONS, SLIDING_WINDOW, VOCAB

_C = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, initializer_range=0.1)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_ENC = dict(_C, max_position_embeddings=128)


def _rope(kind: str, **extra) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **extra}}


def _decoders(T) -> dict:
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_C, num_key_value_heads=2)),
        "llama-linear": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            **_C, num_key_value_heads=2, **_rope("linear", factor=2.0))),
        "llama-llama3": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            **_C, num_key_value_heads=2, **_rope("llama3", factor=4.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0,
                                                 original_max_position_embeddings=64))),
        "llama-yarn": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            **_C, num_key_value_heads=2, **_rope("yarn", factor=4.0,
                                                 original_max_position_embeddings=64))),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_C, num_key_value_heads=1)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_C, num_key_value_heads=2,
                                                          head_dim=32)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
            **_C, num_key_value_heads=1, sliding_window=SLIDING_WINDOW)),
        "mistral-nowindow": lambda: T.MistralForCausalLM(T.MistralConfig(
            **_C, num_key_value_heads=2, sliding_window=None)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
            **_C, num_key_value_heads=2, head_dim=16, sliding_window=SLIDING_WINDOW,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, query_pre_attn_scalar=4)),
        "gemma3_text": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            **_C, num_key_value_heads=2, head_dim=16, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"])),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(
            **_C, num_key_value_heads=2, pad_token_id=0,
            **_rope("default", partial_rotary_factor=0.5))),
        "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**_C, num_key_value_heads=2,
                                                          pad_token_id=0)),
        "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(
            **_C, num_key_value_heads=2, embedding_multiplier=2.0, residual_multiplier=0.5,
            attention_multiplier=0.3, logits_scaling=2.0)),
        "stablelm": lambda: T.StableLmForCausalLM(T.StableLmConfig(
            **_C, num_key_value_heads=2, **_rope("default", partial_rotary_factor=0.25))),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            **_C, **_rope("default", partial_rotary_factor=0.25))),
        "gpt_neox-full": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            **_C, use_parallel_residual=False, **_rope("default", partial_rotary_factor=1.0))),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=MAX_POSITIONS,
            initializer_range=0.1, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            bos_token_id=0, eos_token_id=0)),
        "mixtral": BUILDERS["mixtral"],  # the MoE tests' checkpoints (tests/factories.py)
        "qwen3_moe": BUILDERS["qwen3_moe"],
    }


def _encoders(T) -> dict:
    return {
        "bert": lambda: T.BertModel(T.BertConfig(**_ENC, **_NO_DROPOUT)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**_ENC, **_NO_DROPOUT,
                                                          pad_token_id=1)),
        "xlm-roberta": lambda: T.XLMRobertaModel(T.XLMRobertaConfig(**_ENC, **_NO_DROPOUT,
                                                                    pad_token_id=1)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(
            dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=VOCAB,
            max_position_embeddings=128, initializer_range=0.1, dropout=0.0,
            attention_dropout=0.0)),
        "electra": lambda: T.ElectraModel(T.ElectraConfig(**_ENC, **_NO_DROPOUT,
                                                          embedding_size=32)),
        "modernbert": lambda: T.ModernBertModel(T.ModernBertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1,
            local_attention=16, global_attn_every_n_layers=2, pad_token_id=0)),
    }


def family_names(kind: str) -> list[str]:
    import transformers

    return list((_decoders if kind == "decoder" else _encoders)(transformers))


def make_family_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """Build matrix entry ``name`` (a family, or ``family-variant``) into ``directory``."""
    import torch
    import transformers

    builders = {**_decoders(transformers), **_encoders(transformers)}
    torch.manual_seed(seed)
    builders[name]().save_pretrained(directory)
    return Path(directory)
