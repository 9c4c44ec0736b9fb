"""Structured outputs over real Ray Serve with the official ``openai`` client:
``response_format`` (json_object, json_schema) and vLLM's ``guided_*`` fields on the
random-weight smoke decoder, whose unconstrained output is noise, so every valid output
is the grammar's doing. On the session's shared app (tests/deployments/conftest.py)."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.deployments.conftest import GEN, KEY, SHARED_APP, SHARED_MODELS, wait_drained

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {"type": "object",
                     "properties": {"name": {"type": "string", "maxLength": 10},
                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                     "required": ["name", "age"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"scores": {"type": "array", "minItems": 2, "maxItems": 4,
                                  "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
        "required": ["scores"], "additionalProperties": False,
    },
}
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def client(shared_url):
    return openai.OpenAI(base_url=f"{shared_url}/v1", api_key=KEY, max_retries=0, timeout=300)


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_always_parse_and_validate(client, shared_url, name):
    """20 seeds per schema (two requests of n=10: choice i runs with seed + i), and 5
    more streamed; sampled at temperature 1 from a random model."""
    texts = []
    for seed in (0, 10):
        got = client.chat.completions.create(model=GEN, messages=MESSAGES, n=10, seed=seed,
                                             temperature=1.0, max_tokens=200,
                                             response_format=json_schema_format(name))
        assert [c.finish_reason for c in got.choices] == ["stop"] * 10
        texts += [c.message.content for c in got.choices]
    stream = client.chat.completions.create(model=GEN, messages=MESSAGES, n=5, seed=100,
                                            temperature=1.0, max_tokens=200, stream=True,
                                            response_format=json_schema_format(name))
    streamed = [""] * 5
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    texts += streamed
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert len(set(texts)) > 5  # sampled, not one forced answer
    wait_drained(shared_url, SHARED_MODELS, KEY, app=SHARED_APP)


def test_json_object_and_vllm_guided_fields(client):
    # Any object: keys and strings are unbounded, so a random model may run out of
    # tokens inside one; every choice that finished is an object.
    got = client.completions.create(model=GEN, prompt="{", max_tokens=120, temperature=1.0,
                                    seed=3, n=8,
                                    extra_body={"response_format": {"type": "json_object"}})
    finished = [c.text for c in got.choices if c.finish_reason == "stop"]
    assert finished
    for text in finished:
        assert isinstance(json.loads(text), dict)
    choice = client.completions.create(model=GEN, prompt="pick", max_tokens=10, seed=1,
                                       temperature=1.0, n=6,
                                       extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert {c.text for c in choice.choices} <= {"alpha", "beta", "gamma"}
    regex = client.completions.create(model=GEN, prompt="code", max_tokens=20, seed=2,
                                      temperature=1.0,
                                      extra_body={"guided_regex": r"[A-Z]{3}-\d{4}"})
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", regex.choices[0].text)
    text = client.completions.create(model=GEN, prompt="x", max_tokens=60, seed=4,
                                     temperature=1.0,
                                     extra_body={"guided_json": json.dumps(SCHEMAS["enums"])})
    jsonschema.validate(json.loads(text.choices[0].text), SCHEMAS["enums"])


class Item(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    count: int = pydantic.Field(ge=0, le=50)
    color: Literal["red", "blue"]
    sizes: list[Literal["S", "M", "L"]] = pydantic.Field(max_length=2)


def test_the_openai_clients_parse_helper_gets_a_model(client):
    for seed in range(3):
        got = client.chat.completions.parse(model=GEN, messages=MESSAGES, response_format=Item,
                                            temperature=1.0, seed=seed, max_tokens=200)
        item = got.choices[0].message.parsed
        assert isinstance(item, Item), got.choices[0].message.content


@pytest.mark.parametrize("body,needles", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     ["response_format", "frobnicate"]),
    ({"extra": {"guided_regex": "([a-"}}, ["regex", "does not compile"]),
    ({"response_format": {"type": "json_schema"}}, ["json_schema is required"]),
    ({"response_format": {"type": "json_object"}, "extra": {"guided_regex": "a+"}},
     ["one output constraint", "response_format", "guided_regex"]),
    ({"extra": {"guided_json": "{not json"}}, ["guided_json", "not valid JSON"]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_constraint_that_does_not_compile_is_a_400(shared_url, body, needles, stream):
    payload = {"model": GEN, "messages": MESSAGES, "max_tokens": 8, "stream": stream,
               **{k: v for k, v in body.items() if k != "extra"}, **body.get("extra", {})}
    r = httpx.post(f"{shared_url}/v1/chat/completions", json=payload, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message


# A grammar whose two words are followed by a lexeme no text matches: llguidance compiles
# it and cannot tell at compile time (the choice is not forced), so the matcher dead-ends
# after the word. The engine finishes "error"; the client must never see a "stop".
DEAD_END = 'start: "yes" dead | "no" dead\ndead: /[^\\x00-\\U0010FFFF]/'


def _post(url: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


def test_an_output_that_dead_ends_is_an_error_never_a_stop(shared_url):
    payload = {"model": GEN, "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0,
               "guided_grammar": DEAD_END}
    r = _post(shared_url, payload)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "constraint_failed"
    assert "could not follow" in r.json()["error"]["message"]
    r = _post(shared_url, {**payload, "stream": True})
    assert r.status_code == 200
    events = [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
              for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "constraint_failed"
    chunks = [e for e in events[:-2]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks if c["choices"])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text in ("yes", "no")  # the valid prefix, then the error


@pytest.mark.parametrize("extra,param,needle", [
    ({"guided_regex": "[^\\x00-\\U0010FFFF]"}, "guided_regex", "can never be satisfied"),
    ({"guided_choice": [f"o{i}" for i in range(10_001)]}, "guided_choice",
     "max_grammar_choices=10000"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "wide", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2_001)}}}}},
     "response_format", "max_grammar_object_properties=2000"),
])
def test_unsatisfiable_and_oversized_constraints_are_400s_naming_the_field(
        shared_url, extra, param, needle):
    for stream in (False, True):
        r = _post(shared_url, {"model": GEN, "messages": MESSAGES, "max_tokens": 8,
                               "stream": stream, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"], err


def test_huge_grammars_at_once_leave_a_plain_request_unharmed(shared_url):
    """4 choice lists of 50,000 options (the size that stalled the replica) sent at
    once with a plain request: the big ones are refused by the edge's limits, the plain
    one completes, and the replica stays admitted (no 503)."""
    import concurrent.futures

    huge = {"model": GEN, "messages": MESSAGES, "max_tokens": 2,
            "guided_choice": [f"option-{i}" for i in range(50_000)]}
    plain = {"model": GEN, "messages": MESSAGES, "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        bigs = [pool.submit(_post, shared_url, huge) for _ in range(4)]
        probe = pool.submit(_post, shared_url, plain)
        statuses = [f.result().status_code for f in bigs]
        assert probe.result().status_code == 200, probe.result().text
    assert statuses == [400] * 4
    assert _post(shared_url, plain).status_code == 200
