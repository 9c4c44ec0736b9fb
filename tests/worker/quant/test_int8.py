"""``quantization="int8"``: dynamic int8 linear layers for encoders on CPU, held to the fp32
engine on the real all-MiniLM-L6-v2 (2,000 texts: cosine of the embeddings; a small
retrieval set: the same top-1 document), and refused for decoders by name."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from transformers import AutoTokenizer

from tests.factories import make_tiny_checkpoint, minilm_dir
from worker import Engine, EngineConfig
from worker.core.config import ConfigError
from worker.models.smoke_corpus import generate_corpus
from worker.quant.int8 import BACKENDS, Int8Linear, quantize_int8, reference_product

NUM_TEXTS = 2000

# (query, the document that answers it): one topic each, so fp32 finds the intended one
RETRIEVAL = [
    ("How do I bake sourdough bread?",
     ("Mix flour, water and a starter, let the dough rise overnight, then bake it in a hot "
     "oven until the crust is dark.")),
    ("What causes ocean tides?",
     "The gravitational pull of the moon and the sun raises and lowers the sea twice a day."),
    ("Which planet is known as the red planet?",
     "Mars looks red because iron oxide dust covers its surface."),
    ("How can I speed up my Python code?",
     "Profile the program first, then replace slow loops with vectorized numpy operations."),
    ("What is the capital of Japan?", "Tokyo is the largest city of Japan and its capital."),
    ("How do vaccines protect people?",
     "A vaccine trains the immune system to recognize a virus before a real infection."),
    ("Why do leaves change color in autumn?",
     ("In the fall trees stop making chlorophyll, so the green fades and yellow and red "
     "pigments show.")),
    ("How do I change a flat tire?",
     ("Loosen the lug nuts, jack up the car, swap the wheel for the spare and tighten the "
     "nuts again.")),
    ("What does a stock market index measure?",
     "An index such as the S&P 500 tracks the combined share prices of many large companies."),
    ("How long should I boil an egg?",
     "For a hard-boiled egg, keep it in boiling water for about nine to twelve minutes."),
    ("Who painted the Mona Lisa?",
     "Leonardo da Vinci painted the portrait of Lisa Gherardini in the early 1500s."),
    ("How does a refrigerator keep food cold?",
     ("A compressor pumps refrigerant that absorbs heat inside the fridge and releases it "
     "outside.")),
    ("What is the best way to learn a new language?",
     ("Speaking with native speakers every day and reading simple books builds vocabulary "
     "fast.")),
    ("How do bees make honey?",
     ("Bees collect nectar from flowers, store it in the hive and fan it with their wings "
     "until it thickens.")),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight more than red ones."),
    ("How do I reset a forgotten password?",
     "Click the forgot password link on the login page and follow the email you receive."),
]


def make_texts(num: int, seed: int = 0) -> list[str]:
    """``num`` texts of the smoke corpus (prose, code, chat), cut to 3..150 words: 40%
    short (3..12), 45% medium (12..48), 15% long (48..150, up to ~200 tokens)."""
    rng = random.Random(seed)
    words = " ".join(generate_corpus(seed, num_paragraphs=600)).split()
    texts = []
    for _ in range(num):
        r = rng.random()
        n = rng.randint(3, 12) if r < 0.4 else rng.randint(12, 48) if r < 0.85 else \
            rng.randint(48, 150)
        start = rng.randrange(len(words) - n)
        texts.append(" ".join(words[start:start + n]))
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def engines():
    path = str(minilm_dir())
    fp32 = Engine(EngineConfig(model=path, max_num_batched_tokens=8192))
    int8 = Engine(EngineConfig(model=path, max_num_batched_tokens=8192, quantization="int8"))
    yield fp32, int8
    fp32.shutdown()
    int8.shutdown()


def embed_both(engines, tokenizer, texts):
    ids = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    return tuple(e.embed(ids, pooling="mean", normalize=True) for e in engines), ids


def test_layers_are_converted(engines):
    fp32, int8 = engines
    layers = fp32.runner.model.config.num_hidden_layers
    converted = [m for m in int8.runner.model.base_model.encoder.modules()
                 if isinstance(m, Int8Linear)]
    assert len(converted) == 6 * layers  # q, k, v, attention out, FFN in, FFN out
    assert not any(type(m) is nn.Linear for m in int8.runner.model.base_model.encoder.modules())
    assert all(m.weight.dtype == torch.int8 and m.backend in BACKENDS for m in converted)
    assert type(int8.runner.model.pooler.dense) is nn.Linear  # it feeds only heads: fp32


def test_quantize_int8_returns_the_count_and_the_layer_is_its_definition():
    torch.manual_seed(0)
    model = nn.Module()  # a stand-in with a base model of two linears and a pooler
    model.base_model = nn.Module()
    model.base_model.encoder = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 48))
    model.base_model.pooler = nn.Linear(48, 48, bias=False)
    x = torch.randn(1, 37, 48)
    want_fp32 = model.base_model.encoder(x)
    assert quantize_int8(model, decoder=False, device=torch.device("cpu")) == 2
    first = model.base_model.encoder[0]
    got = first(x[0]).double()
    assert (got - reference_product(first, x[0])).abs().max() < 1e-3
    y = model.base_model.encoder(x)
    assert y.shape == want_fp32.shape and y.dtype == torch.float32
    rel = (y - want_fp32).norm() / want_fp32.norm()
    assert 0 < rel < 0.02  # quantized (not the fp32 layer), and close


def test_embeddings_stay_close_to_fp32(engines, tokenizer):
    texts = make_texts(NUM_TEXTS)
    (want, got), ids = embed_both(engines, tokenizer, texts)
    lengths = np.array([len(i) for i in ids])
    assert len(texts) == NUM_TEXTS and lengths.min() <= 10 and lengths.max() >= 180
    cosine = (want * got).sum(1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.98, (cosine.mean(), cosine.min())
    assert cosine.mean() < 0.99999  # really quantized: not the fp32 numbers


def test_retrieval_top1_matches_fp32(engines, tokenizer):
    queries, docs = zip(*RETRIEVAL, strict=True)
    (q32, q8), _ = embed_both(engines, tokenizer, list(queries))
    (d32, d8), _ = embed_both(engines, tokenizer, list(docs))
    top32, top8 = (q32 @ d32.T).argmax(1), (q8 @ d8.T).argmax(1)
    intended = np.arange(len(RETRIEVAL))
    assert (top32 == intended).mean() >= 0.9  # a set where retrieval means something
    assert (top8 == top32).all(), np.nonzero(top8 != top32)


def test_a_decoder_is_refused_by_name(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    with pytest.raises(ConfigError) as err:
        Engine(EngineConfig(model=str(path), quantization="int8"))
    assert err.value.field == "quantization"
    assert "'llama' is a decoder" in str(err.value) and "fp8" in str(err.value)
    assert "encoder models on CPU" in str(err.value)


def test_serve_carries_int8_into_the_engine_args(capsys):
    from deployments.app.cli import main
    from deployments.app.config import ModelArgs

    assert main(["serve", "packaged:all-MiniLM-L6-v2", "--quantization", "int8",
                 "--dry-run"]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]["models"][0]
    assert model["engine"] == {"quantization": "int8"}
    assert ModelArgs(**model).engine_config().quantization == "int8"
