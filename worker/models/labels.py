"""What a sequence-classification model's logits mean: its labels and its activation.

No torch here: the HTTP layer and bulk jobs turn the engine's logits into probabilities
and labels with this, in processes that never load the model.

| model                                             | activation | probabilities          |
|---------------------------------------------------|------------|------------------------|
| ``num_labels >= 2``, single-label (the default)   | softmax    | sum to 1 over labels   |
| ``problem_type: multi_label_classification``       | sigmoid    | one per label, 0..1    |
| ``num_labels == 1`` (cross-encoders, regression)  | sigmoid    | one relevance, 0..1    |

A one-label model scores a pair: its sigmoid is the relevance score that rerankers
report (sentence-transformers' ``CrossEncoder``, vLLM and TEI do the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOFTMAX, SIGMOID = "softmax", "sigmoid"


@dataclass(frozen=True)
class LabelSpec:
    """The labels of a classifier (``config.id2label`` in id order) and how to read its
    logits. Picklable and small: it travels to the ingress inside ``ModelInfo``."""

    labels: tuple[str, ...]  # [num_labels]
    activation: str  # SOFTMAX | SIGMOID
    pooling: str  # the model's own: "cls" (first token, BERT family) | "last" (decoders)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_cross_encoder(self) -> bool:
        """One logit per sequence: a relevance score for a (query, document) pair."""
        return self.num_labels == 1

    @classmethod
    def from_config(cls, hf_config, pooling: str) -> LabelSpec:
        num = int(getattr(hf_config, "num_labels", 0) or 0)
        id2label = getattr(hf_config, "id2label", None) or {}
        labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}")))
                       for i in range(num))
        multi = getattr(hf_config, "problem_type", None) == "multi_label_classification"
        activation = SIGMOID if multi or num == 1 else SOFTMAX
        return cls(labels, activation, pooling)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """[n, num_labels] logits -> [n, num_labels] float32 probabilities."""
        x = np.asarray(logits, dtype=np.float64)
        if self.activation == SIGMOID:
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        x = x - x.max(axis=-1, keepdims=True)
        e = np.exp(x)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    def top_labels(self, probabilities: np.ndarray) -> list[str]:
        """The most probable label of each row (for one-label models: that label)."""
        return [self.labels[int(i)] for i in np.argmax(probabilities, axis=-1)]
