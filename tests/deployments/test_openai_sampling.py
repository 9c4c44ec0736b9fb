"""The OpenAI sampling fields beyond the basics, over real Ray Serve with the official
``openai`` client: ``n`` choices, penalties, ``logit_bias``, ``min_tokens``, ``min_p``,
and vLLM's ``/tokenize`` and ``/detokenize``. On the session's shared app (the smoke-test
decoder); every result is compared with the engine called directly."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.deployments.conftest import (
    GEN,
    GEN_ENGINE,
    KEY,
    SHARED_APP,
    SHARED_MODELS,
    wait_drained,
)

PROMPT = "The packer sorts lengths"


@pytest.fixture(scope="module")
def client(shared_url):
    return openai.OpenAI(base_url=f"{shared_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct():
    """The smoke decoder called directly, as its replica is configured, and its tokenizer."""
    from transformers import AutoTokenizer

    from worker import Engine, EngineConfig
    from worker.models.sources import resolve_model

    engine = Engine(EngineConfig(model="smoke:decoder", **GEN_ENGINE))
    yield engine, AutoTokenizer.from_pretrained(resolve_model("smoke:decoder"))
    engine.shutdown()


def engine_text(direct, prompt: str, **fields) -> tuple[str, list[int]]:
    from worker.generate.sampling import SamplingParams

    engine, tok = direct
    out = engine.generate([tok(prompt)["input_ids"]], SamplingParams(**fields))[0]
    return out.text, out.token_ids


def test_n_choices_each_equal_a_single_request_with_seed_plus_index(client, shared_url):
    fields = dict(model=GEN, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=40)
    got = client.completions.create(n=3, **fields)
    assert [c.index for c in got.choices] == [0, 1, 2]
    singles = [client.completions.create(**{**fields, "seed": 40 + i}).choices[0].text
               for i in range(3)]
    assert [c.text for c in got.choices] == singles
    assert len(set(singles)) > 1  # three samples, not one copied
    single_usage = client.completions.create(**fields).usage
    assert got.usage.prompt_tokens == single_usage.prompt_tokens  # the prompt counts once
    assert got.usage.completion_tokens == 36
    stream = client.completions.create(n=3, stream=True,
                                       stream_options={"include_usage": True}, **fields)
    texts, finished = ["", "", ""], set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 36
    assert texts == singles and finished == {0, 1, 2}
    chat = client.chat.completions.create(model=GEN, n=2, max_tokens=8, temperature=1.0,
                                          seed=5, messages=[{"role": "user", "content": "hi"}])
    alone = client.chat.completions.create(model=GEN, max_tokens=8, temperature=1.0, seed=6,
                                           messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[1].message.content == alone.choices[0].message.content
    wait_drained(shared_url, SHARED_MODELS, KEY, app=SHARED_APP)


def test_penalties_bias_and_min_tokens_equal_the_engine(client, direct):
    cases = [
        dict(presence_penalty=1.5, frequency_penalty=0.7),
        dict(extra_body={"repetition_penalty": 1.6}),
        dict(extra_body={"min_tokens": 6, "min_p": 0.05}),
        dict(logit_bias={"300": 4.0, "301": -100}),
    ]
    for case in cases:
        extra = case.pop("extra_body", {})
        got = client.completions.create(model=GEN, prompt=PROMPT, max_tokens=10,
                                        temperature=0, extra_body=extra, **case)
        bias = tuple((int(k), v) for k, v in case.pop("logit_bias", {}).items())
        want, _ = engine_text(direct, PROMPT, max_tokens=10, temperature=0, logit_bias=bias,
                              **case, **extra)
        assert got.choices[0].text == want, (case, extra)


def test_logit_bias_of_100_forces_the_token(client, direct):
    got = client.completions.create(model=GEN, prompt=PROMPT, max_tokens=6, temperature=0,
                                    logit_bias={"300": 100}, extra_body={"ignore_eos": True})
    text, ids = engine_text(direct, PROMPT, max_tokens=6, temperature=0,
                            logit_bias={300: 100}, ignore_eos=True)
    assert ids == [300] * 6 and got.choices[0].text == text


def test_tokenize_round_trips_and_counts_like_usage(client, direct):
    _, tok = direct
    r = client.post("/tokenize", cast_to=httpx.Response,
                    body={"model": GEN, "prompt": PROMPT, "return_token_strs": True})
    body = r.json()
    assert body["tokens"] == tok(PROMPT)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == GEN_ENGINE["max_model_len"]
    assert "".join(body["token_strs"]) == tok.decode(body["tokens"])
    usage = client.completions.create(model=GEN, prompt=PROMPT, max_tokens=1).usage
    assert body["count"] == usage.prompt_tokens
    back = client.post("/detokenize", cast_to=httpx.Response,
                       body={"model": GEN, "tokens": body["tokens"]}).json()
    assert back["prompt"] == tok.decode(body["tokens"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", cast_to=httpx.Response,
                       body={"model": GEN, "messages": messages}).json()
    used = client.chat.completions.create(model=GEN, messages=messages, max_tokens=1).usage
    assert chat["count"] == used.prompt_tokens


@pytest.mark.parametrize("path,body,needles", [
    ("/v1/completions", {"prompt": "hi", "n": 17}, ["n", "16"]),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}},
     ["logit_bias", "301", "300"]),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 150}},
     ["logit_bias", "150", "[-100, 100]"]),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, ["logit_bias", "abc"]),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}},
     ["logit_bias", "99999", "vocabulary"]),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, ["presence_penalty", "2"]),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0},
     ["repetition_penalty", "0"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 9},
     ["min_tokens=9", "max_tokens=4"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "frequency_penalty": -2.5}, ["frequency_penalty", "-2"]),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
     ["exactly one of prompt and messages"]),
    ("/tokenize", {}, ["exactly one of prompt and messages"]),
    ("/detokenize", {"tokens": [5, 99999]}, ["tokens[1]", "99999", "vocabulary"]),
])
def test_bad_sampling_fields_get_a_400_naming_them(shared_url, path, body, needles):
    r = httpx.post(f"{shared_url}{path}", json={"model": GEN, **body}, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message
