"""The OpenAI API over real Ray Serve, driven by the official ``openai`` client: every
endpoint (streaming included) returns what the engine returns when called directly,
bad input gets a 4xx naming the limit and the value, and a client that leaves
mid-stream frees its tokens. On the session's shared app (tests/deployments/conftest.py):
the real all-MiniLM-L6-v2 and the smoke-test decoder (random weights, trained BPE
tokenizer with a chat template)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from tests.deployments.conftest import (
    EMBED,
    EMBED_ENGINE,
    GEN,
    GEN_ENGINE,
    KEY,
    SHARED_APP,
    SHARED_MODELS,
    wait_drained,
)

MODELS = SHARED_MODELS
BODY_LIMIT = 4 << 20  # http.max_body_bytes' default
PROMPTS = ["Hello there, how are", "The packer sorts lengths", "a"]


@pytest.fixture(scope="module")
def url(shared_url):
    return shared_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct():
    """The engines called directly, as the replicas are configured."""
    from transformers import AutoTokenizer

    from worker import Engine, EngineConfig
    from worker.models.sources import resolve_model

    engines = {
        EMBED: Engine(EngineConfig(model="packaged:all-MiniLM-L6-v2", **EMBED_ENGINE)),
        GEN: Engine(EngineConfig(model="smoke:decoder", **GEN_ENGINE)),
    }
    toks = {m: AutoTokenizer.from_pretrained(resolve_model(e.config.model))
            for m, e in engines.items()}
    yield engines, toks
    for e in engines.values():
        e.shutdown()


def greedy(max_tokens, **kw):
    from worker.generate.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_models_lists_both_and_labels_the_smoke_model(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(MODELS)
    smoke = models[GEN].model_extra["packserve"]
    assert smoke["smoke_test"] is True and "random weights" in models[GEN].model_extra["description"]
    assert models[EMBED].model_extra["packserve"]["smoke_test"] is False
    assert models[EMBED].model_extra["packserve"]["dimensions"] == 384
    # the family each model is, and that the family matrix proves it (docs/models.md)
    assert (smoke["family"], smoke["proven"], smoke["unproven"]) == ("qwen2", True, [])
    assert models[EMBED].model_extra["packserve"]["family"] == "bert"


def test_embeddings_equal_the_engine(client, direct):
    engines, toks = direct
    texts = ["A man is eating food.", "packserve never computes on padding", "x"]
    ids = [toks[EMBED](t)["input_ids"] for t in texts]
    want = engines[EMBED].embed(ids, normalize=True)
    got = client.embeddings.create(model=EMBED, input=texts)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert got.usage.prompt_tokens == sum(len(i) for i in ids)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    by_ids = client.embeddings.create(model=EMBED, input=ids)  # token arrays
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), want, atol=1e-5)
    raw = httpx.post(f"{client.base_url}embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": EMBED, "input": texts[0], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want[0], atol=1e-5)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_the_engine(client, direct, prompt):
    engines, toks = direct
    ids = toks[GEN](prompt)["input_ids"]
    want = engines[GEN].generate([ids], greedy(12))[0]
    got = client.completions.create(model=GEN, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason.value
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    by_ids = client.completions.create(model=GEN, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want.text


def test_completion_stream_equals_the_whole(client):
    whole = client.completions.create(model=GEN, prompt=PROMPTS[0], max_tokens=20,
                                      temperature=0)
    chunks = list(client.completions.create(model=GEN, prompt=PROMPTS[0], max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 20


def test_seeded_sampling_is_reproducible(client):
    a, b = (client.completions.create(model=GEN, prompt=PROMPTS[1], max_tokens=10,
                                      temperature=1.0, top_p=0.9, seed=7,
                                      extra_body={"top_k": 50})
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_chat_equals_the_engine_on_the_template(client, direct):
    engines, toks = direct
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is packing?"}]
    ids = toks[GEN].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = engines[GEN].generate([ids], greedy(10))[0]
    got = client.chat.completions.create(model=GEN, messages=messages, max_tokens=10,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=GEN, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason.value


def test_echo_with_zero_max_tokens_scores_the_prompt(client, direct):
    engines, toks = direct
    ids = toks[GEN](PROMPTS[1])["input_ids"]
    want = engines[GEN].score([ids])[0]
    got = client.completions.create(model=GEN, prompt=PROMPTS[1], max_tokens=0, echo=True,
                                    logprobs=1)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    assert got.usage.completion_tokens == 0


def test_generation_logprobs_have_top_k(client, direct):
    engines, toks = direct
    ids = toks[GEN](PROMPTS[0])["input_ids"]
    want = engines[GEN].generate([ids], greedy(5, logprobs=2))[0]
    got = client.completions.create(model=GEN, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                    logprobs=2)
    lp = got.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, [e.logprob for e in want.logprobs], atol=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=GEN, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3)
    assert all(len(e.top_logprobs) == 3 for e in chat.choices[0].logprobs.content)


def _post(url, path, body, *, raw=None, headers=None):
    h = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    if raw is not None:
        h["Content-Type"] = "application/json"
        return httpx.post(f"{url}{path}", content=raw, headers=h, timeout=60)
    return httpx.post(f"{url}{path}", json=body, headers=h, timeout=60)


@pytest.mark.parametrize("path,body,status,needles", [
    ("/v1/completions", {"model": GEN, "prompt": "word " * 600, "max_tokens": 4}, 400,
     ["max_model_len=512", "tokens"]),
    ("/v1/completions", {"model": GEN, "prompt": "hi", "max_tokens": 512}, 400,
     ["max_tokens 512", "max_model_len=512"]),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404,
     ["no-such-model", GEN]),
    ("/v1/completions", {"model": GEN, "prompt": "hi", "max_tokens": 0}, 400, ["max_tokens"]),
    ("/v1/completions", {"model": GEN, "prompt": "hi", "max_tokens": -3}, 400,
     ["max_tokens", "-3"]),
    ("/v1/completions", {"model": GEN, "prompt": "", "max_tokens": 3}, 400, ["empty"]),
    ("/v1/completions", {"model": GEN, "prompt": "hi", "max_tokens": "3"}, 400,
     ["max_tokens", "'3'"]),
    ("/v1/completions", {"model": GEN, "prompt": "hi", "n": 0}, 400, ["n", "0"]),
    ("/v1/completions", {"model": GEN, "prompt": [5, 99999]}, 400,
     ["prompt[1]", "99999", "vocabulary", "4096"]),
    ("/v1/completions", {"model": GEN, "prompt": "hi", "temperature": 7}, 400,
     ["temperature", "7"]),
    ("/v1/completions", {"model": EMBED, "prompt": "hi"}, 400, ["embedding model"]),
    ("/v1/chat/completions", {"model": GEN, "messages": []}, 400, ["messages"]),
    ("/v1/embeddings", {"model": EMBED, "input": "word " * 600}, 400,
     ["max_model_len=512"]),
    ("/v1/embeddings", {"model": EMBED, "input": "hi", "dimensions": 12}, 400,
     ["dimensions=12", "384"]),
])
def test_bad_input_gets_a_clear_4xx(url, path, body, status, needles):
    r = _post(url, path, body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message


def test_an_unknown_field_is_accepted_ignored_and_named(url):
    """A misspelt ``max_token`` runs with the default max_tokens, and the response names
    it (``x-packserve-ignored-fields``; the ingress logs it as one WARNING line)."""
    r = _post(url, "/v1/completions", {"model": GEN, "prompt": "hi", "max_token": 3})
    assert r.status_code == 200, r.text
    assert r.headers["x-packserve-ignored-fields"] == "max_token"
    assert r.json()["usage"]["completion_tokens"] <= 16


def test_malformed_json_and_oversize_body(url):
    r = _post(url, "/v1/completions", None, raw=b'{"model": "x", "prompt": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": GEN, "prompt": "x" * (BODY_LIMIT + 10)}).encode()
    r = _post(url, "/v1/completions", None, raw=big)
    assert r.status_code == 413, r.text
    assert str(BODY_LIMIT) in r.json()["error"]["message"]


def test_api_key_is_required_except_for_health(url):
    r = httpx.post(f"{url}/v1/completions", json={"model": GEN, "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    health = httpx.get(f"{url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["replicas"] == {EMBED: 1, GEN: 1}


def test_client_leaving_mid_stream_cancels_and_frees(url):
    body = {"model": GEN, "prompt": "go on", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert first  # tokens are flowing; now leave before the 400 tokens are done
    wait_drained(url, MODELS, KEY, app=SHARED_APP)  # lease released, request aborted, KV freed
