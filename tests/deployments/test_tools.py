"""Tool calling over real Ray Serve with the official ``openai`` client, on the
random-weight smoke decoder (its chat template renders tools in the Qwen2.5 / Hermes
format): ``required`` and named choices always return parseable calls whose arguments
are valid against the tool's schema; calls stream as ``tool_calls`` deltas; a tool's
result is accepted in the next turn; bad tool fields get 400s naming them. An app of its
own: the smoke tokenizer spends ~500 tokens on two tool definitions, more than the shared
app's max_model_len of 512."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.deployments.conftest import KEY, decoder_args, drained_app, wait_drained

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                      "b": {"type": "integer", "minimum": -99, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
GEN, APP = "smoke-tools", "tools"
ARGS = decoder_args(GEN)


@pytest.fixture(scope="module")
def url(serve_url):
    with drained_app(serve_url, ARGS, APP, "/tools") as app_url:
        yield app_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def check_calls(calls, names=SCHEMAS) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_always_returns_valid_calls(client, url):
    for seed in (0, 8):  # 16 samples: n=8 twice, at temperature 1
        got = client.chat.completions.create(model=GEN, messages=MESSAGES, tools=TOOLS,
                                             tool_choice="required", n=8, seed=seed,
                                             temperature=1.0, max_tokens=1000)
        for choice in got.choices:
            assert choice.finish_reason == "tool_calls", choice.message.content
            check_calls(choice.message.tool_calls)
    single = client.chat.completions.create(model=GEN, messages=MESSAGES, tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False,
                                            seed=3, temperature=1.0, max_tokens=1000)
    assert len(single.choices[0].message.tool_calls) == 1
    wait_drained(url, [GEN], KEY, app=APP)


def test_a_named_function_is_the_one_called(client):
    got = client.chat.completions.create(
        model=GEN, messages=MESSAGES, tools=TOOLS, n=4, seed=1, temperature=1.0,
        max_tokens=1000, tool_choice={"type": "function", "function": {"name": "add"}})
    for choice in got.choices:
        assert [c.function.name for c in choice.message.tool_calls] == ["add"]
        check_calls(choice.message.tool_calls, {"add": ADD})


def test_calls_stream_as_tool_call_deltas(client):
    stream = client.chat.completions.create(model=GEN, messages=MESSAGES, tools=TOOLS,
                                            tool_choice="required", seed=5, temperature=1.0,
                                            max_tokens=1000, stream=True)
    deltas, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and [d.index for d in deltas] == list(range(len(deltas)))
    check_calls(deltas)


def test_auto_and_none_answer_in_text_or_calls_and_results_go_back(client):
    """The random model rarely opens a call by itself under ``auto``: what it returns
    must be either content or well-formed calls; ``none`` never returns calls."""
    auto = client.chat.completions.create(model=GEN, messages=MESSAGES, tools=TOOLS, n=4,
                                          seed=2, temperature=1.0, max_tokens=24)
    for choice in auto.choices:
        if choice.message.tool_calls:
            check_calls(choice.message.tool_calls)
        else:
            assert isinstance(choice.message.content, str)
    none = client.chat.completions.create(model=GEN, messages=MESSAGES, tools=TOOLS,
                                          tool_choice="none", max_tokens=16, temperature=0)
    assert none.choices[0].message.tool_calls is None
    first = client.chat.completions.create(model=GEN, messages=MESSAGES, tools=TOOLS,
                                           tool_choice="required", seed=4, temperature=1.0,
                                           max_tokens=1000)
    call = first.choices[0].message.tool_calls[0]
    follow_up = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    second = client.chat.completions.create(model=GEN, messages=follow_up, tools=TOOLS,
                                            max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the template rendered the call and its result into the prompt
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


@pytest.mark.parametrize("body,field,needles", [
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice", ["'mul'", "get_weather, add"]),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools",
     ["function names", "bad name!"]),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice", ["cannot be combined"]),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}],
      "tool_choice": "required"}, "tools", ["does not compile", "nope"]),
])
def test_bad_tool_fields_get_a_400(url, body, field, needles):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": GEN, "messages": MESSAGES, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert field in (error["param"] or "") or field in error["message"], error
    for needle in needles:
        assert needle in error["message"], error
