"""Tensor-parallel sharding of a loaded Hugging Face decoder, in place.

Each rank keeps its part of every weight; the modules' own forward code is unchanged
(the HF attention and MLP classes still run, with fewer heads and columns), and plain
tensors stay plain (no DTensor): packserve's attention (packed varlen, the paged KV cache,
the Triton kernel) sees this rank's heads as ordinary tensors. Why not transformers'
``tp_plan="auto"``: docs/decisions.md ("Tensor parallelism: our own parallel linears").

| weight                     | split                      | collective after           |
|----------------------------|----------------------------|----------------------------|
| ``q_proj``                 | columns of output: whole query heads | none             |
| ``k_proj``, ``v_proj``     | whole KV heads; replicated when KV heads < ranks | none   |
| ``o_proj``                 | rows of input (row-parallel) | all-reduce, then the bias |
| ``gate_proj``, ``up_proj`` | columns of output            | none                     |
| ``down_proj``              | rows of input (row-parallel) | all-reduce, then the bias |
| ``embed_tokens``           | vocabulary rows (padded to equal parts) | all-reduce    |
| ``lm_head``                | vocabulary rows (tied: the embedding's shard) | all-gather: every rank has the full logits |
| a classifier's ``score``   | replicated (hidden -> labels, on pooled rows; rank 0 runs it) | none |
| MoE ``experts``            | every expert's intermediate columns (``gate_up_proj`` rows of both halves, ``down_proj`` columns) | all-reduce of the block's output |
| MoE router ``gate``        | replicated: every rank routes the same rows alike | none |

When the model has fewer KV heads than ranks (Qwen2.5-7B: 4, at 8 ranks), rank ``r``
keeps KV head ``r * kv_heads // ranks``, the one its query heads read, so the KV cache of
a rank holds ``max(1, kv_heads // ranks)`` heads (``TPLayout.num_kv_heads``).

MoE layers are split like a dense MLP, inside every expert (vLLM's default for MoE under
TP, not expert parallelism): each rank holds all experts at 1/N of their width, so routing
is the same everywhere and no token moves between ranks; the block's output is one
all-reduce, as a dense MLP's ``down_proj``.

Proven families (``TP_FAMILIES``): the Llama-style layout of separate q/k/v and
gate/up projections, and Mixtral / Qwen3-MoE experts (transformers 5's 3-D
``gate_up_proj`` / ``down_proj``). A family with fused projections, Conv1D layers, shared
experts or expert biases is refused by name until a test proves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.core.config import ConfigError
from worker.parallel.group import TPGroup

TP_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"})
FIELD = "tensor_parallel_size"


@dataclass(frozen=True)
class TPLayout:
    """What one rank holds of the model (``model.tp_layout`` once sharded)."""

    rank: int
    size: int
    num_kv_heads: int  # KV heads on this rank (its KV cache's)


class RowParallelLinear(nn.Module):
    """``linear`` keeping the input columns ``[lo, hi)``: partial sums, all-reduced.
    ``proj`` is a plain Linear of those columns (no bias), so FP8 can convert it like any
    other (its per-output-channel scales stay whole: worker/quant/load.py)."""

    def __init__(self, linear: nn.Linear, lo: int, hi: int, tp: TPGroup):
        super().__init__()
        w = linear.weight.data
        self.proj = nn.Linear(hi - lo, linear.out_features, bias=False, device="meta")
        self.proj.weight = nn.Parameter(w[:, lo:hi].contiguous(), requires_grad=False)
        if hasattr(linear, "fp8_scales"):
            self.proj.fp8_scales = linear.fp8_scales
        self.bias = linear.bias  # added once, after the reduce
        self.in_features, self.out_features, self.tp = hi - lo, linear.out_features, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce_(self.proj(x))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """The rows ``[lo, lo + per)`` of the vocabulary (zero rows past its end); ids of
    other ranks embed to 0 here, and the all-reduce sums the one rank that has each."""

    def __init__(self, embedding: nn.Embedding, tp: TPGroup):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.per = -(-self.num_embeddings // tp.size)
        self.lo = tp.rank * self.per
        self.weight = nn.Parameter(_rows(embedding.weight.data, self.lo, self.per),
                                   requires_grad=False)
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.per)
        out = F.embedding(local * inside, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce_(out)


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered to ``[N, vocab_size]``."""

    def __init__(self, linear: nn.Linear, tp: TPGroup, shared: nn.Parameter | None = None):
        super().__init__()
        self.vocab_size = linear.out_features
        self.per = -(-self.vocab_size // tp.size)
        self.weight = shared if shared is not None else nn.Parameter(
            _rows(linear.weight.data, tp.rank * self.per, self.per), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            _rows(linear.bias.data, tp.rank * self.per, self.per), requires_grad=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(F.linear(x, self.weight, self.bias))[..., :self.vocab_size]


class AllReducedOutput(nn.Module):
    """``block``'s output summed over the ranks (an MoE block of width-sharded experts)."""

    def __init__(self, block: nn.Module, tp: TPGroup):
        super().__init__()
        self.block, self.tp = block, tp

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce_(self.block(hidden_states))


def _shard_experts(experts: nn.Module, rank: int, size: int) -> None:
    """Keep columns ``[r * I/N, (r + 1) * I/N)`` of every expert's intermediate width."""
    width = experts.intermediate_dim
    per = width // size
    lo = rank * per
    gate_up = experts.gate_up_proj.data  # [E, 2I, H]: gate rows, then up rows
    experts.gate_up_proj = nn.Parameter(torch.cat(
        [gate_up[:, lo:lo + per], gate_up[:, width + lo:width + lo + per]], dim=1).contiguous(),
        requires_grad=False)
    experts.down_proj = nn.Parameter(experts.down_proj.data[:, :, lo:lo + per].contiguous(),
                                     requires_grad=False)  # [E, H, I]: input columns
    experts.intermediate_dim = per


def _check_experts(experts: nn.Module, size: int, kind: str) -> None:
    names = {n for n, _ in experts.named_parameters()}
    if (names != {"gate_up_proj", "down_proj"} or getattr(experts, "is_transposed", False)
            or not getattr(experts, "has_gate", True)):
        raise ConfigError(FIELD, f"the experts of this {kind!r} model ({type(experts).__name__}:"
                          f" {', '.join(sorted(names))}) are not the layout tensor parallelism"
                          f" is proven for; run it at 1 rank")
    if experts.intermediate_dim % size:
        raise ConfigError(FIELD, f"the experts' intermediate width {experts.intermediate_dim}"
                          f" does not split over {size} ranks")


def _rows(w: torch.Tensor, lo: int, per: int) -> torch.Tensor:
    """``w[lo:lo + per]``, zero rows where it runs past ``w``'s end."""
    out = torch.zeros((per, *w.shape[1:]), dtype=w.dtype, device=w.device)
    part = w[lo:lo + per]
    out[: part.shape[0]] = part
    return out


def _keep_rows(linear: nn.Linear, lo: int, hi: int) -> None:
    linear.weight = nn.Parameter(linear.weight.data[lo:hi].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[lo:hi].contiguous(), requires_grad=False)
    linear.out_features = hi - lo
    if hasattr(linear, "fp8_scales"):  # an FP8 checkpoint's per-channel scales (quant/load.py)
        linear.fp8_scales = linear.fp8_scales.rows(lo, hi)


def plan(config, size: int) -> tuple[int, int, int]:
    """(query heads, KV heads, intermediate columns) per rank; ``ConfigError`` naming
    the number that does not split over ``size`` ranks."""
    kind = config.model_type
    if kind not in TP_FAMILIES:
        raise ConfigError(FIELD, f"tensor parallelism is proven for {', '.join(sorted(TP_FAMILIES))}"
                          f"; a {kind!r} model is refused at {size} ranks (run it at 1)")
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    inter = config.intermediate_size
    if heads % size:
        raise ConfigError(FIELD, f"{heads} attention heads do not split over {size} ranks")
    if kv % size and size % kv:
        raise ConfigError(FIELD, f"{kv} KV heads neither split over {size} ranks nor divide it")
    if inter % size:
        raise ConfigError(FIELD, f"intermediate_size {inter} does not split over {size} ranks")
    moe = getattr(config, "moe_intermediate_size", None)  # Qwen3-MoE's expert width
    if moe and moe % size:
        raise ConfigError(FIELD, f"moe_intermediate_size {moe} does not split over {size} ranks")
    return heads // size, max(1, kv // size), inter // size


def shard_decoder(model: nn.Module, tp: TPGroup) -> TPLayout:
    """Keep this rank's part of every weight of a loaded causal LM (module table); sets
    and returns ``model.tp_layout``. At one rank nothing changes."""
    config = model.config
    heads, kv_heads, inter = plan(config, tp.size)
    head, score = getattr(model, "lm_head", None), getattr(model, "score", None)
    if not hasattr(model, "model") or (head is None and not isinstance(score, nn.Linear)):
        raise ConfigError(FIELD, f"tensor parallelism serves causal LMs and decoder sequence "
                          f"classifiers; a {type(model).__name__} is refused at {tp.size} ranks"
                          f" (run it at 1)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    model.tp_layout = layout = TPLayout(tp.rank, tp.size, kv_heads)
    if tp.size == 1:
        return layout
    total_kv = config.num_key_value_heads or config.num_attention_heads
    kv_lo = tp.rank * kv_heads if total_kv >= tp.size else tp.rank * total_kv // tp.size
    q_lo, i_lo = tp.rank * heads * head_dim, tp.rank * inter
    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:  # every refusal before any weight is cut
        if hasattr(mlp, "experts"):
            if set(dict(mlp.named_children())) != {"experts", "gate"}:
                children = ", ".join(dict(mlp.named_children()))
                raise ConfigError(FIELD, f"an MoE block with {children}"
                                  f" (shared experts?) is not proven under tensor parallelism;"
                                  f" run this {config.model_type!r} model at 1 rank")
            _check_experts(mlp.experts, tp.size, config.model_type)
    for layer, mlp in zip(model.model.layers, mlps):
        attn = layer.self_attn
        _keep_rows(attn.q_proj, q_lo, q_lo + heads * head_dim)
        for proj in (attn.k_proj, attn.v_proj):
            _keep_rows(proj, kv_lo * head_dim, (kv_lo + kv_heads) * head_dim)
        attn.o_proj = RowParallelLinear(attn.o_proj, q_lo, q_lo + heads * head_dim, tp)
        attn.num_key_value_groups = heads // kv_heads  # HF's eager/sdpa repeat_kv reads it
        if hasattr(mlp, "experts"):
            _shard_experts(mlp.experts, tp.rank, tp.size)
            layer.mlp = AllReducedOutput(mlp, tp)
            continue
        _keep_rows(mlp.gate_proj, i_lo, i_lo + inter)
        _keep_rows(mlp.up_proj, i_lo, i_lo + inter)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, i_lo, i_lo + inter, tp)
    embed = model.model.embed_tokens
    tied = head is not None and head.weight is embed.weight
    model.model.embed_tokens = VocabParallelEmbedding(embed, tp)
    if head is not None:
        model.lm_head = VocabParallelLMHead(
            head, tp, shared=model.model.embed_tokens.weight if tied else None)
    # A sequence classifier's ``score`` (hidden -> labels) stays whole on every rank: it
    # reads the pooled rows of the all-reduced hidden state, on rank 0 alone.
    return layout
