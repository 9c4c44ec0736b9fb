"""Units of the classification endpoints, no Ray: what each model serves, the score
request's pairing rule, and how labels and activations are read from a config."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.http.classify_protocol import RerankRequest, ScoreRequest
from deployments.http.routes import ENDPOINTS
from deployments.replica.work import ModelInfo
from worker.models.labels import SIGMOID, SOFTMAX, LabelSpec


def info(can_generate: bool, labels: LabelSpec | None = None, **more) -> ModelInfo:
    return ModelInfo(name="m", is_decoder=can_generate, can_generate=can_generate,
                     max_model_len=512, vocab_size=100, hidden_size=8, capacity_tokens=64,
                     token_budget=32, smoke_test=False, device="cpu",
                     attention_backend="reference", labels=labels, **more)


THREE = LabelSpec(("a", "b", "c"), SOFTMAX, "cls")
ONE = LabelSpec(("relevance",), SIGMOID, "cls")


@pytest.mark.parametrize("model, tasks", [
    (info(True), ["completions", "chat", "responses", "embeddings"]),
    (info(True, tensor_parallel_size=2), ["completions", "chat", "responses", "embeddings"]),
    (info(False), ["embeddings", "score", "rerank"]),
    (info(False, THREE), ["classify", "embeddings"]),
    (info(False, ONE), ["classify", "embeddings", "score", "rerank"]),
])
def test_what_each_model_serves(model, tasks):
    assert model.tasks == tasks
    assert set(tasks) <= set(ENDPOINTS.values())  # each is a metered endpoint's label
    assert model.can_rerank == ("rerank" in tasks)


def test_score_pairs_one_against_many_or_pairwise():
    assert ScoreRequest(model="m", text_1="q", text_2=["a", "b"]).pairs() == (["q", "q"],
                                                                             ["a", "b"])
    assert ScoreRequest(model="m", text_1=["x", "y"], text_2=["a", "b"]).pairs() == (
        ["x", "y"], ["a", "b"])
    with pytest.raises(ValueError, match="text_1 has 2 texts and text_2 has 3"):
        ScoreRequest(model="m", text_1=["x", "y"], text_2=["a", "b", "c"]).pairs()
    with pytest.raises(ValueError, match="text_2 is empty"):
        ScoreRequest(model="m", text_1="q", text_2=[]).pairs()


def test_rerank_documents_as_strings_or_objects():
    body = RerankRequest(model="m", query="q", documents=["a", {"text": "b"}])
    assert body.texts() == ["a", "b"]
    with pytest.raises(ValidationError, match="documents"):
        RerankRequest(model="m", query="q", documents=[])
    with pytest.raises(ValidationError, match="extra"):
        RerankRequest(model="m", query="q", documents=[{"text": "a", "title": "t"}])


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_labels_and_activation_from_the_config():
    spec = LabelSpec.from_config(_Config(num_labels=2, id2label={"0": "NEG", "1": "POS"}), "cls")
    assert spec.labels == ("NEG", "POS") and spec.activation == SOFTMAX
    multi = LabelSpec.from_config(_Config(num_labels=2, id2label={0: "x", 1: "y"},
                                          problem_type="multi_label_classification"), "last")
    assert multi.activation == SIGMOID and multi.pooling == "last"
    np.testing.assert_allclose(multi.probabilities(np.array([[0.0, 0.0]])), [[0.5, 0.5]])
    bare = LabelSpec.from_config(_Config(num_labels=1), "cls")
    assert bare.labels == ("LABEL_0",) and bare.is_cross_encoder and bare.activation == SIGMOID
    probs = THREE.probabilities(np.array([[1000.0, 0.0, -1000.0]]))  # no overflow
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0]])
    assert THREE.top_labels(probs) == ["a"]
