"""The smoke-test classifiers (``smoke:classifier``, ``smoke:reranker``): built once per
cache from the packaged all-MiniLM-L6-v2 encoder under a random head, labelled as smoke
tests, deterministic, and served by the engine like any sequence classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.factories import minilm_dir
from worker.models import smoke, sources


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke-cls-cache")


@pytest.mark.parametrize("name, labels", [("classifier", ("smoke-a", "smoke-b", "smoke-c")),
                                          ("reranker", ("relevance",))])
def test_built_once_and_labelled(name, labels, cache):
    path = Path(sources.resolve_model(f"smoke:{name}", cache_dir=cache))
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert tuple(config["id2label"][str(i)] for i in range(len(labels))) == labels
    assert config[smoke.SMOKE_MARKER] is True and sources.is_smoke_test(path)
    assert sources.is_smoke_test(f"smoke:{name}")
    assert "RANDOM" in (path / "README.md").read_text()
    mtime = (path / "config.json").stat().st_mtime_ns
    assert sources.resolve_model(f"smoke:{name}", cache_dir=cache) == str(path)
    assert (path / "config.json").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_encoder_is_the_real_minilm_and_the_build_is_deterministic(cache, tmp_path):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    path = Path(sources.resolve_model("smoke:classifier", cache_dir=cache))
    model = AutoModelForSequenceClassification.from_pretrained(path)
    real = AutoModel.from_pretrained(minilm_dir())
    for name, tensor in real.state_dict().items():
        torch.testing.assert_close(model.bert.state_dict()[name], tensor, rtol=0, atol=0)
    again = smoke.build_classifier(tmp_path / "again", minilm_dir(), seed=sources.SMOKE_SEED)
    other = AutoModelForSequenceClassification.from_pretrained(again)
    torch.testing.assert_close(other.classifier.weight, model.classifier.weight, rtol=0, atol=0)


def test_engine_classifies_text_with_the_smoke_classifier(cache, monkeypatch, make_engine):
    from transformers import AutoTokenizer

    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(cache))
    engine = make_engine("smoke:classifier", max_num_batched_tokens=1024)
    tok = AutoTokenizer.from_pretrained(sources.resolve_model("smoke:classifier"))
    texts = ["packed, not padded", "a longer sentence about bins and budgets", "hi"]
    logits = engine.classify([tok(t)["input_ids"] for t in texts])
    probs = engine.labels.probabilities(logits)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(-1), 1, atol=1e-6)
    assert set(engine.labels.top_labels(probs)) <= {"smoke-a", "smoke-b", "smoke-c"}
