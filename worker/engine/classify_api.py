"""The engine's classification API, mixed into ``Engine``: ``classify`` (sync) and
``classify_async``, for ``*ForSequenceClassification`` checkpoints.

Classification is one more pooled task of the packed path: its sequences share FFD bins
with embeddings and scores, the base model runs once per bin, and the model's own head
(``worker.models.heads``) reads one row per sequence. Logits come back; ``Engine.labels``
(a ``worker.models.labels.LabelSpec``) turns them into probabilities and label names.

Pairs (a cross-encoder's query and document) arrive already tokenized as one sequence,
the way the model's tokenizer joins them (``tokenizer(query, document)``), with that
tokenizer's ``token_type_ids`` for the BERT family (decoders and RoBERTa need none).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from worker.core.request import Task, check_type_count
from worker.models.labels import LabelSpec


class ClassifyAPI:
    """Classification methods of ``Engine`` (which provides requests, steps and spec)."""

    @property
    def labels(self) -> LabelSpec | None:
        """The classifier's labels and activation; None for a model without a head."""
        return self.spec.labels

    def classify(self, token_id_lists: Sequence,
                 token_type_ids: Sequence | None = None) -> np.ndarray:
        """The classification head's logits -> [n, num_labels] float32.

        ``token_type_ids``: None, or one entry per sequence (None, or a list as long as
        the sequence: 0 for the first text of a pair, 1 for the second). Raises the
        first request's typed error (with a note naming its index) before running any;
        ``UnsupportedTaskError`` when the model has no classification head.
        """
        requests = self._make_all(token_id_lists, Task.CLASSIFY, None, False, token_type_ids)
        self._run_sync(requests)
        return self._stack_logits([r.output for r in requests])

    async def classify_async(self, token_id_lists: Sequence,
                             token_type_ids: Sequence | None = None) -> np.ndarray:
        """``classify`` through the step loop; raises the first request's error."""
        check_type_count(token_type_ids, len(token_id_lists))
        types = token_type_ids if token_type_ids is not None else [None] * len(token_id_lists)
        futures = [self.submit(ids, Task.CLASSIFY, token_type_ids=t)
                   for ids, t in zip(token_id_lists, types)]
        return self._stack_logits(list(await asyncio.gather(*futures)))

    def _stack_logits(self, outputs: list[np.ndarray]) -> np.ndarray:
        if outputs:
            return np.stack(outputs)
        num_labels = self.labels.num_labels if self.labels is not None else 0
        return np.empty((0, num_labels), np.float32)
