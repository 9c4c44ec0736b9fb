"""Classification on the packed path: tiny random BERT, RoBERTa and Qwen2
``*ForSequenceClassification`` checkpoints loaded through ``from_pretrained``; packed
logits equal Hugging Face's per-sequence logits (fp32, 1e-4), pairs with token types
included; labels from ``id2label``; bad input gets typed errors naming the setting."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tests.classify_factories import CLASSIFIER_KINDS, LABELS, make_tiny_classifier
from tests.factories import VOCAB, mixed_lengths, token_lists
from worker.core.errors import InvalidRequestError, UnsupportedTaskError

ATOL = 1e-4


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """``classifier(kind, num_labels=3) -> Path``, built once per module."""
    cache = {}

    def get(kind: str, num_labels: int = 3):
        key = (kind, num_labels)
        if key not in cache:
            cache[key] = make_tiny_classifier(
                kind, tmp_path_factory.mktemp(f"cls-{kind}-{num_labels}"), num_labels)
        return cache[key]

    return get


def hf_logits(path, sequences, types=None) -> np.ndarray:
    """Each sequence run alone (no padding) through Hugging Face's own classifier."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for i, ids in enumerate(sequences):
            kwargs = {"input_ids": torch.tensor([ids])}
            if types is not None:
                kwargs["token_type_ids"] = torch.tensor([types[i]])
            out.append(model(**kwargs).logits[0].numpy())
    return np.stack(out)


def sequences_for(kind: str, n: int = 24, seed: int = 0) -> list[list[int]]:
    longest = 100 if kind != "qwen2" else 70
    seqs = token_lists(mixed_lengths(n, longest, seed=seed), seed=seed)
    if kind == "roberta":  # its pad id (1) would change nothing here, but keep ids real
        seqs = [[t if t != 1 else 2 for t in s] for s in seqs]
    return seqs


@pytest.mark.parametrize("kind", CLASSIFIER_KINDS)
def test_packed_logits_equal_hf_per_sequence(kind, classifier, make_engine):
    path = classifier(kind)
    seqs = sequences_for(kind)
    # a small budget: several bins per step, sequences of every length share bins
    engine = make_engine(path, max_num_batched_tokens=256, max_num_bins_per_step=2)
    logits = engine.classify(seqs)
    assert logits.shape == (len(seqs), 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf_logits(path, seqs), atol=ATOL, rtol=0)
    assert engine.stats.num_bins > 2
    assert engine.labels.labels == LABELS[3]
    assert engine.labels.pooling == ("last" if kind == "qwen2" else "cls")


def test_bert_pairs_with_token_types_equal_hf(classifier, make_engine):
    path = classifier("bert")
    rng = np.random.default_rng(3)
    seqs = sequences_for("bert", n=16, seed=3)
    types = []
    for s in seqs:  # the second text starts somewhere inside: types 0...0 1...1
        cut = int(rng.integers(0, len(s) + 1))
        types.append([0] * cut + [1] * (len(s) - cut))
    engine = make_engine(path, max_num_batched_tokens=256)
    logits = engine.classify(seqs, token_type_ids=types)
    np.testing.assert_allclose(logits, hf_logits(path, seqs, types), atol=ATOL, rtol=0)
    # the types matter (a model that ignored them would pass the check above by luck only)
    plain = engine.classify(seqs)
    assert np.abs(plain - logits).max() > 10 * ATOL


def test_pairs_and_singles_share_a_step(classifier, make_engine):
    """Some sequences with types, some without, in the same bins: each gets its own."""
    path = classifier("bert")
    seqs = sequences_for("bert", n=12, seed=5)
    types = [None if i % 2 else [0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2)
             for i, s in enumerate(seqs)]
    engine = make_engine(path)
    logits = engine.classify(seqs, token_type_ids=types)
    ref_types = [t if t is not None else [0] * len(s) for s, t in zip(seqs, types)]
    np.testing.assert_allclose(logits, hf_logits(path, seqs, ref_types), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["roberta", "qwen2"])
def test_embed_on_a_classifier_is_the_base_models_hidden_state(kind, classifier, make_engine):
    """Classify and embed in one step; embed is the base model's pooled hidden state
    (RoBERTa included: its positions start at padding_idx + 1)."""
    from transformers import AutoModelForSequenceClassification

    path = classifier(kind)
    seqs = sequences_for(kind, n=10, seed=7)
    engine = make_engine(path)

    async def both():
        return await asyncio.gather(engine.classify_async(seqs),
                                    engine.embed_async(seqs, pooling="mean"))

    logits, vectors = asyncio.run(both())
    np.testing.assert_allclose(logits, hf_logits(path, seqs), atol=ATOL, rtol=0)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = [model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0].mean(0).numpy()
               for s in seqs]
    np.testing.assert_allclose(vectors, np.stack(ref), atol=ATOL, rtol=0)


def test_labels_and_probabilities(classifier, make_engine):
    engine = make_engine(classifier("bert"))
    logits = engine.classify(sequences_for("bert", n=5))
    probs = engine.labels.probabilities(logits)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    top = engine.labels.top_labels(probs)
    assert top == [LABELS[3][i] for i in logits.argmax(-1)]


def test_one_label_cross_encoder_uses_sigmoid(classifier, make_engine):
    engine = make_engine(classifier("bert", num_labels=1))
    seqs = sequences_for("bert", n=6)
    logits = engine.classify(seqs)
    assert logits.shape == (6, 1)
    assert engine.labels.is_cross_encoder and engine.labels.activation == "sigmoid"
    np.testing.assert_allclose(engine.labels.probabilities(logits),
                               1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_classify_needs_a_classification_head(tiny_model, make_engine):
    engine = make_engine(tiny_model("bert"))
    assert engine.labels is None
    with pytest.raises(UnsupportedTaskError, match="sequence-classification") as err:
        engine.classify([[1, 2, 3]])
    assert err.value.setting == "model"


def test_bad_token_types_are_refused_by_name(classifier, make_engine):
    bert = make_engine(classifier("bert"))
    with pytest.raises(InvalidRequestError, match="token_type_ids has 2 entries") as err:
        bert.classify([[5, 6, 7]], token_type_ids=[[0, 1]])
    assert (err.value.limit, err.value.value, err.value.setting) == (3, 2, "token_type_ids")
    with pytest.raises(InvalidRequestError, match="type 2 at position 1") as err:
        bert.classify([[5, 6, 7]], token_type_ids=[[0, 2, 1]])
    assert err.value.limit == 2
    with pytest.raises(InvalidRequestError, match="2 entries for 1 sequences"):
        bert.classify([[5, 6, 7]], token_type_ids=[None, None])
    qwen = make_engine(classifier("qwen2"))
    with pytest.raises(UnsupportedTaskError, match="no token-type embeddings"):
        qwen.classify([[5, 6, 7]], token_type_ids=[[0, 0, 1]])
    np.testing.assert_allclose(qwen.classify([[5, 6, 7]], token_type_ids=[[0, 0, 0]]),
                               qwen.classify([[5, 6, 7]]))  # all-zero types are no types


def test_over_length_and_out_of_vocab_name_the_limit(classifier, make_engine):
    engine = make_engine(classifier("bert"))
    with pytest.raises(InvalidRequestError, match="max_model_len=128"):
        engine.classify([[1] * 129])
    with pytest.raises(InvalidRequestError, match=f"outside the vocabulary \\[0, {VOCAB}\\)"):
        engine.classify([[1, VOCAB]])
    assert engine.classify([]).shape == (0, 3)
