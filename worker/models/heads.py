"""Classification heads of ``*ForSequenceClassification`` checkpoints, on pooled rows.

A packed forward runs the base model over a whole bin; what Hugging Face's
``*ForSequenceClassification.forward`` does after its base model is redone here on one
hidden row per sequence, with the checkpoint's own modules (so the weights, and any
dense + tanh in between, are exactly the model's):

| family                        | pooled row              | head                                  |
|-------------------------------|-------------------------|---------------------------------------|
| BERT (``pooler`` + Linear)    | first token ([CLS])     | ``classifier(pooler(row))``           |
| RoBERTa, XLM-R                | first token (``<s>``)   | ``classifier(row)`` (dense, tanh, out) |
| decoders (Llama, Qwen2, ...)  | last token              | ``score(row)``                        |

Decoders: Hugging Face takes the last token that is not ``pad_token_id``; a packed
sequence has no padding, so its last token is that token unless the sequence itself
ends in pad ids (don't send those). Dropout is inactive in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.core.config import ConfigError

CLS_HEAD_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})


@dataclass(frozen=True)
class ClassificationHead:
    """``head(rows [B, hidden]) -> logits [B, num_labels]`` in the model's dtype."""

    pooling: str  # "cls" | "last": which row of each sequence the head reads
    head: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Pool each sequence of a packed bin and apply the head -> [B, num_labels] fp32."""
        cu = cu_seqlens.long()
        rows = hidden[cu[:-1]] if self.pooling == "cls" else hidden[cu[1:] - 1]
        return self.head(rows).float()


def classification_head(model: torch.nn.Module, model_type: str,
                        is_decoder: bool) -> ClassificationHead:
    """The head of a loaded ``*ForSequenceClassification`` model; ``ConfigError`` for a
    family whose head this module does not know (a guess would be silently wrong)."""
    if is_decoder:
        score = getattr(model, "score", None)
        if not isinstance(score, torch.nn.Linear):
            raise _unsupported(model)
        return ClassificationHead("last", score)
    classifier = getattr(model, "classifier", None)
    if model_type not in CLS_HEAD_TYPES or classifier is None:
        raise _unsupported(model)
    pooler = getattr(model.base_model, "pooler", None)
    if isinstance(classifier, torch.nn.Linear):  # BERT: pooler (dense + tanh) first
        if pooler is None:
            raise _unsupported(model)
        return ClassificationHead("cls", lambda rows: classifier(pooler(rows[:, None])))
    # RoBERTa's RobertaClassificationHead reads features[:, 0] itself
    return ClassificationHead("cls", lambda rows: classifier(rows[:, None]))


def _unsupported(model: torch.nn.Module) -> ConfigError:
    name = type(model).__name__
    return ConfigError("model", f"{name}: classification heads are supported for BERT, "
                       "RoBERTa and XLM-RoBERTa encoders and for decoders with a `score` "
                       "layer (Llama, Qwen2, Mistral, ...); this one is not")
