"""The language-modeling head as each family's ``*ForCausalLM.forward`` applies it.

The runners compute logits from the base model's hidden states of the rows they need
(a step's sampling rows, a bin's scored rows), so they cannot call the model's forward,
which would compute every row. What a family does after its linear head is therefore
written down here, once, for both runners:

| family              | after ``lm_head``                                        |
|---------------------|----------------------------------------------------------|
| Granite (MoE too)   | ``logits / config.logits_scaling``                       |
| Cohere              | ``logits * config.logit_scale``                          |
| Gemma 2, Gemma 3    | ``c * tanh(logits / c)``, ``c = final_logit_softcapping`` |

A family that does something else is caught at load: ``worker.models.proof`` compares
this head with the model's own forward on the proof's tokens and refuses a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LMHead:
    """``head(hidden [N, hidden]) -> logits [N, vocab]`` fp32, as the model computes them."""

    linear: torch.nn.Module  # the model's output embedding
    scale: float | None = None  # logits multiplied by this (Granite: 1 / logits_scaling)
    softcap: float | None = None  # final_logit_softcapping (Gemma 2 / 3)

    @property
    def vocab_size(self) -> int:
        """Columns of the logits (a vocabulary-parallel head says; its weight is a shard)."""
        return int(getattr(self.linear, "vocab_size", None) or self.linear.weight.shape[0])

    def __call__(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in fp32, into ``out`` when given (the CUDA graphs' static output)."""
        logits = self.linear(hidden)
        out = logits.float() if out is None else out.copy_(logits)
        if self.scale is not None:
            out.mul_(self.scale)
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out


def lm_head(model: torch.nn.Module) -> LMHead:
    """The loaded causal LM's head with its family's scaling and cap (module table)."""
    config = model.config
    scale = None
    if getattr(config, "logits_scaling", None):
        scale = 1.0 / float(config.logits_scaling)
    elif getattr(config, "logit_scale", None):
        scale = float(config.logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return LMHead(model.get_output_embeddings(), scale, softcap)
