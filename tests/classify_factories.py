"""Tiny random ``*ForSequenceClassification`` checkpoints (BERT, RoBERTa, Qwen2), saved
with ``save_pretrained`` and loaded back through ``from_pretrained``, like the models of
``tests/factories.py`` (hidden 64, 2 layers, vocab 512, a large initializer range)."""

from __future__ import annotations

from pathlib import Path

from tests.factories import _COMMON

LABELS = {3: ("negative", "neutral", "positive"), 1: ("relevance",)}
CLASSIFIER_KINDS = ("bert", "roberta", "qwen2")


def _label_maps(num_labels: int) -> dict:
    names = LABELS.get(num_labels) or tuple(f"class-{i}" for i in range(num_labels))
    return {"num_labels": num_labels, "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def _build(kind: str, num_labels: int):
    import transformers as tf

    labels = _label_maps(num_labels)
    dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if kind == "bert":
        config = tf.BertConfig(**dict(_COMMON, max_position_embeddings=128), **dropout, **labels)
        return tf.BertForSequenceClassification(config)
    if kind == "roberta":  # positions from padding_idx + 1 = 2, one token type
        config = tf.RobertaConfig(**dict(_COMMON, max_position_embeddings=130), **dropout,
                                  pad_token_id=1, type_vocab_size=1, **labels)
        return tf.RobertaForSequenceClassification(config)
    if kind == "qwen2":
        config = tf.Qwen2Config(**_COMMON, num_key_value_heads=2, **labels)
        return tf.Qwen2ForSequenceClassification(config)
    raise ValueError(f"unknown classifier kind {kind!r}; known: {CLASSIFIER_KINDS}")


def make_tiny_classifier(kind: str, directory: Path, num_labels: int = 3,
                         seed: int = 0) -> Path:
    """A random ``kind`` classifier with ``num_labels`` named labels, saved to ``directory``."""
    import torch

    torch.manual_seed(seed)
    _build(kind, num_labels).save_pretrained(directory)
    return Path(directory)
