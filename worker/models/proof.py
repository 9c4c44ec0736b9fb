"""The load-time proof that the checkpoint being loaded runs the way the runners drive it.

The family matrix (tests) proves numbers per family; this proves the plumbing on the
very checkpoint, with one tiny packed forward of two sequences:

- every layer's attention reaches the registered function under the runner's context
  (counted); a family that computes attention inline or builds a mask of its own, or
  asks the attention for something no backend computes (``UnsupportedAttention``),
  would return wrong numbers;
- for a causal LM, ``worker.models.lm_head`` applied to the base model's hidden states
  equals the logits of the model's own forward (a family that scales or caps logits in
  a way the head does not know would skew every logprob and sample).

What fails is refused by name, with or without ``allow_untested_model``.
"""

from __future__ import annotations

import torch

from worker.attention.context import PackedSegments, attention_context
from worker.attention.packed import UnsupportedAttention
from worker.core.config import ConfigError
from worker.models.lm_head import lm_head

_LENGTHS = (3, 2)  # two sequences: a forward that ignored the segments would mix them


@torch.inference_mode()
def prove_model(model, spec, device) -> None:
    """Raise ``ConfigError`` (field ``model``) unless one packed forward reaches our
    attention once per layer (``config.num_hidden_layers``), nothing is refused, and a
    causal LM's logits are what ``lm_head`` computes."""
    total = sum(_LENGTHS)
    ids = (torch.arange(total, device=device) % max(2, spec.vocab_size - 1) + 1).view(1, -1)
    positions = torch.cat([torch.arange(n, device=device) for n in _LENGTHS])
    kwargs = dict(input_ids=ids, position_ids=(positions + spec.position_offset).view(1, -1),
                  use_cache=False)
    if spec.takes_token_type_ids:
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    cu = torch.tensor([0, _LENGTHS[0], total], dtype=torch.int32, device=device)
    expected = int(model.config.num_hidden_layers)
    name = spec.model_type
    try:
        with attention_context(PackedSegments(cu, max(_LENGTHS))) as active:
            hidden = model.base_model(**kwargs).last_hidden_state[0]
    except UnsupportedAttention as exc:
        raise ConfigError("model", f"{name!r} is refused: {exc}") from None
    if active.num_calls != expected:
        raise ConfigError(
            "model", f"{name!r} is refused: {active.num_calls} attention calls reached "
            f"packserve's attention in a forward of a {expected}-layer model; its layers "
            "compute attention some other way, which packed and paged forwards cannot run")
    if spec.is_decoder and not spec.is_classifier:
        _prove_lm_head(model, kwargs, cu, hidden, name)


def _prove_lm_head(model, kwargs, cu, hidden, name: str) -> None:
    with attention_context(PackedSegments(cu, max(_LENGTHS))):
        want = model(**kwargs).logits[0].float()
    got = lm_head(model)(hidden)
    tol = 1e-4 if hidden.dtype == torch.float32 else 2e-2  # half: the same GEMM, ulps apart
    excess = ((got - want).abs() - tol * (1 + want.abs())).max().item()
    if not excess <= 0:  # NaN too
        raise ConfigError(
            "model", f"{name!r} is refused: its forward turns hidden states into logits "
            f"differently from packserve's LM head (max difference "
            f"{(got - want).abs().max().item():.3g}); worker/models/lm_head.py knows "
            "logits_scaling, logit_scale and final_logit_softcapping")
