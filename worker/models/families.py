"""The model families packserve has proven, and the rule that refuses the rest at load.

A family is proven when tests/worker/models/test_family_matrix.py builds a tiny random
checkpoint of it (``save_pretrained``, loaded back through ``from_pretrained``) and the
engine reproduces transformers on it: greedy generation through chunked prefill and
decode on the paged backends (decoders), packed scores and embeddings. docs/models.md
is the table users read; ``PROVEN`` is the same table for the code.

What else a checkpoint can bring that the matrix does not cover is refused by feature:
a rotary scaling whose frequencies depend on the batch's longest position (``dynamic``,
``longrope``: a packed step mixes sequences, so they would differ from one sequence run
alone), a per-layer sliding window switched on in a Qwen config, remote code. A refused
model loads anyway with ``allow_untested_model`` (one WARNING naming what is unproven).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from worker.core.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    kind: str  # "decoder" | "encoder"
    features: str  # what the matrix's checkpoint of this family exercises


_DECODERS = (
    ("llama", "RoPE, GQA; rope_scaling linear, llama3, yarn"),
    ("qwen2", "q/k/v biases, GQA, 1 KV head"),
    ("qwen3", "q/k RMSNorm, explicit head_dim"),
    ("mistral", "sliding window (and none), 1 KV head"),
    ("gemma2", "attention and final logit soft-capping, alternating sliding windows, "
               "query_pre_attn_scalar"),
    ("gemma3_text", "alternating local/global layers with two rotary bases, q/k norm"),
    ("phi3", "fused qkv and gate_up, partial rotary"),
    ("olmo2", "q/k RMSNorm over all heads, post-norms"),
    ("granite", "embedding, residual, attention and logits multipliers"),
    ("stablelm", "partial rotary, LayerNorm (a layer that drops attention kwargs)"),
    ("gpt_neox", "fused qkv, partial and full rotary, parallel residual"),
    ("gpt2", "absolute positions, Conv1D projections"),
    ("mixtral", "sparse MoE (top-2 of 4 experts), GQA"),
    ("qwen3_moe", "sparse MoE with norm_topk_prob, q/k norm"),
)
_ENCODERS = (
    ("bert", "absolute positions, token types"),
    ("roberta", "positions from padding_idx + 1"),
    ("xlm-roberta", "positions from padding_idx + 1"),
    ("distilbert", "no token types"),
    ("electra", "embedding projection"),
    ("modernbert", "RoPE, alternating global / local (sliding) bidirectional attention"),
)
PROVEN: dict[str, Family] = {
    **{t: Family(t, "decoder", f) for t, f in _DECODERS},
    **{t: Family(t, "encoder", f) for t, f in _ENCODERS},
}
PROVEN_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_ALLOW_FLAG = "allow_untested_model (--allow-untested-model)"


def proven_names(kind: str | None = None) -> list[str]:
    return sorted(t for t, f in PROVEN.items() if kind is None or f.kind == kind)


def rope_types(hf_config) -> set[str]:
    """Every rotary type the config names (Gemma 3 names one per layer type)."""
    found = set()
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(hf_config, name, None)
        if not isinstance(params, dict):
            continue
        nested = [p for p in params.values() if isinstance(p, dict)]
        for p in nested or [params]:
            kind = p.get("rope_type") or p.get("type")
            if kind:
                found.add(str(kind))
    return found


def unproven_features(hf_config, trust_remote_code: bool = False) -> list[str]:
    """What about this checkpoint the family matrix has not proven; [] when all is."""
    kind = hf_config.model_type
    problems = []
    if kind not in PROVEN:
        problems.append(f"model family {kind!r}")
    extra = rope_types(hf_config) - PROVEN_ROPE_TYPES
    if extra:
        problems.append(f"rotary scaling {', '.join(sorted(extra))}")
    if kind in ("qwen2", "qwen3", "qwen3_moe") and getattr(hf_config, "use_sliding_window",
                                                           False):
        problems.append("use_sliding_window=true (per-layer windows in a Qwen config)")
    if trust_remote_code and getattr(hf_config, "auto_map", None):
        problems.append("remote code (auto_map)")
    return problems


def check_proven(hf_config, *, allow_untested: bool, trust_remote_code: bool = False,
                 model: str = "") -> list[str]:
    """Raise ``ConfigError`` naming what is unproven and the proven families, unless
    ``allow_untested`` (then one WARNING). Returns what was unproven."""
    problems = unproven_features(hf_config, trust_remote_code)
    if not problems:
        return problems
    what = "; ".join(problems)
    proven = (f"proven decoders: {', '.join(proven_names('decoder'))}; proven encoders: "
              f"{', '.join(proven_names('encoder'))}; rotary types: "
              f"{', '.join(sorted(PROVEN_ROPE_TYPES))} (docs/models.md)")
    if not allow_untested:
        raise ConfigError("model", f"{model or kind_of(hf_config)} is refused: {what} is not "
                          f"proven to give transformers' results ({proven}). Set "
                          f"{_ALLOW_FLAG} to run it anyway, unchecked")
    logger.warning("serving %s with %s, which packserve has not proven (%s is set): its "
                   "outputs are unchecked", model or kind_of(hf_config), what, _ALLOW_FLAG)
    return problems


def describe(hf_config, trust_remote_code: bool = False) -> str:
    """One line for ``packserve probe``: the family and whether the matrix proves it."""
    problems = unproven_features(hf_config, trust_remote_code)
    kind = hf_config.model_type
    if not problems:
        return f"family: {kind} (proven: {PROVEN[kind].features}; docs/models.md)"
    return (f"family: {kind} NOT PROVEN ({'; '.join(problems)}): refused at load unless "
            f"{_ALLOW_FLAG}; proven families: {', '.join(proven_names())}")


def kind_of(hf_config) -> str:
    return f"a {hf_config.model_type!r} checkpoint"
