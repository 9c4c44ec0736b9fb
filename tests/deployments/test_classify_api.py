"""Classify, rerank and score over real Ray Serve and HTTP (httpx, and the official
``openai`` client's raw POST where its typed API has no such call): each endpoint's
shape, results equal to the engines called directly, rerank order = the model's scores
sorted, ``top_n``, and bad input answered with a 400 naming the field, the limit and
the value. One app for the module: the smoke classifier (3 labels), the smoke
cross-encoder (1 label), both the real MiniLM encoder under a random head, and the real
all-MiniLM-L6-v2 embedding model (rerank by cosine similarity)."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from tests.deployments.conftest import running_app, wait_drained

CLS, XENC, EMBED = "smoke-classifier", "smoke-reranker", "all-MiniLM-L6-v2"
MODELS = [CLS, XENC, EMBED]
ENGINE = {"max_num_batched_tokens": 2048}
ARGS = {"models": [{"name": CLS, "model": "smoke:classifier", "engine": ENGINE},
                   {"name": XENC, "model": "smoke:reranker", "engine": ENGINE},
                   {"name": EMBED, "model": "packaged:all-MiniLM-L6-v2", "engine": ENGINE}]}
QUERY = "how are sequences packed into bins?"
DOCS = ["First-fit decreasing puts each sequence into the first bin with room.",
        "The weather in Lisbon is mild in winter.",
        "Padding wastes compute on tokens nobody asked for.",
        "Bins are filled up to a token budget, longest sequences first.",
        "cats"]


@pytest.fixture(scope="module")
def url(serve_url):
    with running_app(ARGS):
        yield serve_url
        wait_drained(serve_url, MODELS)


@pytest.fixture(scope="module")
def direct():
    """The engines and tokenizers, called directly, as the replicas are configured."""
    from transformers import AutoTokenizer

    from worker import Engine, EngineConfig
    from worker.models.sources import resolve_model

    specs = {CLS: "smoke:classifier", XENC: "smoke:reranker", EMBED: "packaged:all-MiniLM-L6-v2"}
    engines = {m: Engine(EngineConfig(model=s, **ENGINE)) for m, s in specs.items()}
    toks = {m: AutoTokenizer.from_pretrained(resolve_model(s)) for m, s in specs.items()}
    yield engines, toks
    for e in engines.values():
        e.shutdown()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def cross_encoder_scores(direct, query_or_queries, docs) -> np.ndarray:
    engines, toks = direct
    queries = query_or_queries if isinstance(query_or_queries, list) else [query_or_queries] * len(docs)
    enc = toks[XENC](queries, docs)
    logits = engines[XENC].classify(enc["input_ids"], token_type_ids=enc["token_type_ids"])
    return engines[XENC].labels.probabilities(logits)[:, 0]


def cosine_scores(direct, query, docs) -> np.ndarray:
    engines, toks = direct
    vectors = engines[EMBED].embed([toks[EMBED](t)["input_ids"] for t in [query] + docs],
                                   normalize=True)
    return vectors[1:] @ vectors[0]


def test_models_list_classify_and_rerank_tasks(url):
    models = {m["id"]: m["packserve"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert models[CLS]["tasks"] == ["classify", "embeddings"]
    assert models[CLS]["labels"] == ["smoke-a", "smoke-b", "smoke-c"]
    assert models[XENC]["tasks"] == ["classify", "embeddings", "score", "rerank"]
    assert models[XENC]["labels"] == ["relevance"] and models[CLS]["smoke_test"] is True
    assert models[EMBED]["tasks"] == ["embeddings", "score", "rerank"]


def test_classify_equals_the_engine(url, direct):
    engines, toks = direct
    texts = ["packed, not padded", "a much longer input about first-fit decreasing bins", "ok"]
    body = post(url, "/v1/classify", {"model": CLS, "input": texts}).json()
    assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == CLS
    ids = [toks[CLS](t)["input_ids"] for t in texts]
    probs = engines[CLS].labels.probabilities(engines[CLS].classify(ids))
    labels = engines[CLS].labels.top_labels(probs)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["label"] for d in body["data"]] == labels
    assert all(d["num_classes"] == 3 for d in body["data"])
    np.testing.assert_allclose([d["probs"] for d in body["data"]], probs, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(map(len, ids))
    one = post(url, "/v1/classify", {"model": CLS, "input": ids[0]}).json()  # token ids
    np.testing.assert_allclose(one["data"][0]["probs"], probs[0], atol=1e-5)


def test_classify_through_the_openai_client(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    body = client.post("/classify", body={"model": CLS, "input": "hello"}, cast_to=object)
    assert body["data"][0]["label"] in ("smoke-a", "smoke-b", "smoke-c")
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/classify", body={"model": EMBED, "input": "hello"}, cast_to=object)
    assert err.value.body["param"] == "model" and "not a sequence classifier" in err.value.message


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cross_encoder_rerank_sorts_by_the_models_scores(url, direct, path):
    body = post(url, path, {"model": XENC, "query": QUERY, "documents": DOCS}).json()
    expected = cross_encoder_scores(direct, QUERY, DOCS)
    results = body["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in results],
                               np.sort(expected)[::-1], atol=1e-5)
    assert [r["document"]["text"] for r in results] == [DOCS[r["index"]] for r in results]
    assert body["id"].startswith("rerank-") and body["usage"]["total_tokens"] > 0


def test_rerank_top_n_and_document_objects(url):
    full = post(url, "/v1/rerank", {"model": XENC, "query": QUERY, "documents": DOCS}).json()
    top = post(url, "/v1/rerank", {"model": XENC, "query": QUERY, "top_n": 2,
                                   "return_documents": False,
                                   "documents": [{"text": d} for d in DOCS]}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    assert all("document" not in r for r in top["results"])
    many = post(url, "/v1/rerank", {"model": XENC, "query": QUERY, "documents": DOCS,
                                    "top_n": 50}).json()
    assert len(many["results"]) == len(DOCS)


def test_embedding_model_reranks_by_cosine(url, direct):
    body = post(url, "/v1/rerank", {"model": EMBED, "query": QUERY, "documents": DOCS}).json()
    expected = cosine_scores(direct, QUERY, DOCS)
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                               np.sort(expected)[::-1], atol=1e-5)
    # a real model: the packing documents rank above the weather and the cat
    assert {r["index"] for r in body["results"][:2]} <= {0, 2, 3}


def test_score_one_against_many_and_pairwise(url, direct):
    body = post(url, "/v1/score", {"model": XENC, "text_1": QUERY, "text_2": DOCS[:3]}).json()
    assert body["object"] == "list" and [d["object"] for d in body["data"]] == ["score"] * 3
    np.testing.assert_allclose([d["score"] for d in body["data"]],
                               cross_encoder_scores(direct, QUERY, DOCS[:3]), atol=1e-5)
    firsts = [QUERY, "weather", "padding"]
    pairwise = post(url, "/score", {"model": XENC, "text_1": firsts, "text_2": DOCS[:3]}).json()
    np.testing.assert_allclose([d["score"] for d in pairwise["data"]],
                               cross_encoder_scores(direct, firsts, DOCS[:3]), atol=1e-5)
    cos = post(url, "/v1/score", {"model": EMBED, "text_1": [QUERY], "text_2": DOCS}).json()
    np.testing.assert_allclose([d["score"] for d in cos["data"]],
                               cosine_scores(direct, QUERY, DOCS), atol=1e-5)


def error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_bad_input_gets_400s_naming_the_limit(url):
    err = error(post(url, "/v1/rerank", {"model": XENC, "query": QUERY, "documents": []}))
    assert err["param"] == "documents" and "at least 1 item" in err["message"]
    err = error(post(url, "/v1/rerank", {"model": XENC, "query": QUERY,
                                         "documents": ["d"] * 2049}))
    assert err["param"] == "documents" and "2049 items" in err["message"]
    assert "limit of 2048" in err["message"]
    long_doc = " ".join(["packing"] * 600)
    err = error(post(url, "/v1/rerank", {"model": XENC, "query": QUERY,
                                         "documents": ["short", long_doc]}))
    assert "documents[1]" in err["message"] and "max_model_len=512" in err["message"]
    err = error(post(url, "/v1/rerank", {"model": EMBED, "query": QUERY,
                                         "documents": [long_doc]}))
    assert "documents[0]" in err["message"] and "max_model_len=512" in err["message"]
    err = error(post(url, "/v1/classify", {"model": CLS, "input": ["ok", long_doc]}))
    assert "input[1]" in err["message"] and "max_model_len=512" in err["message"]
    err = error(post(url, "/v1/classify", {"model": CLS, "input": []}))
    assert err["param"] == "input"
    err = error(post(url, "/v1/rerank", {"model": CLS, "query": QUERY, "documents": DOCS}))
    assert err["param"] == "model" and "3 labels" in err["message"]
    err = error(post(url, "/v1/score", {"model": XENC, "text_1": ["a", "b"], "text_2": DOCS}))
    assert "text_1 has 2 texts and text_2 has 5" in err["message"]
    err = error(post(url, "/v1/rerank", {"model": XENC, "query": QUERY, "documents": DOCS,
                                         "max_chunks_per_doc": 3}))
    assert "max_chunks_per_doc: unknown field" in err["message"]
    err = error(post(url, "/v1/rerank", {"model": XENC, "query": QUERY, "documents": DOCS,
                                         "top_n": -1}))
    assert err["param"] == "top_n"
    assert error(post(url, "/v1/classify", {"model": "nope", "input": "x"}), 404)["param"] == "model"
    err = error(post(url, "/v1/classify", {"model": CLS, "input": [[1, 10 ** 6]]}))
    assert "10000" in err["message"] or "vocabulary" in err["message"]
