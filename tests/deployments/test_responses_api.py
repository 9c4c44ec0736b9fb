"""POST /v1/responses over real Ray Serve with the official ``openai`` client
(``client.responses.create``), on the random-weight smoke decoder: its text is noise,
so the tests assert only what the server guarantees (shapes, usage, statuses, event
order, grammar-enforced tool calls and JSON, 400s naming the field). Every body is
also validated against the SDK's own ``Response`` model. An app of its own: two tool
definitions cost ~500 tokens of the smoke tokenizer, more than the shared app's
max_model_len of 512."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response

from tests.deployments.conftest import KEY, decoder_args, drained_app, wait_drained
from tests.deployments.test_tools import ADD, WEATHER  # the same two tool schemas

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather",
          "parameters": WEATHER, "strict": True},
         {"type": "function", "name": "add", "description": "Add two numbers",
          "parameters": ADD, "strict": True}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MOOD = {"type": "object", "additionalProperties": False, "required": ["mood", "n"],
        "properties": {"mood": {"enum": ["happy", "sad"]},
                       "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
QUESTION = "What is the weather in Paris?"
GEN, APP, PREFIX = "smoke-responses", "responses", "/responses"
ARGS = decoder_args(GEN)


@pytest.fixture(scope="module")
def url(serve_url):
    with drained_app(serve_url, ARGS, APP, PREFIX) as app_url:
        yield app_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def create(client, **params) -> Response:
    """``client.responses.create``, its raw body validated by the SDK's ``Response``."""
    raw = client.responses.with_raw_response.create(model=GEN, **params)
    Response.model_validate(json.loads(raw.text))
    return raw.parse()


def check_finished(resp: Response, max_output_tokens: int) -> None:
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == GEN
    assert isinstance(resp.output_text, str)
    u = resp.usage
    assert u.input_tokens > 0 and u.output_tokens > 0
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"
        assert u.output_tokens == max_output_tokens
    else:
        assert resp.status == "completed" and resp.incomplete_details is None
        assert u.output_tokens <= max_output_tokens


def check_calls(items, names=SCHEMAS) -> None:
    assert items
    for item in items:
        assert item.type == "function_call" and item.call_id.startswith("call_")
        assert item.id.startswith("fc_") and item.status == "completed"
        assert item.name in names
        jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])


def test_text_input_answers_with_output_text_and_usage(client):
    resp = create(client, input="Hello there", max_output_tokens=8, temperature=0,
                  metadata={"trace": "t1"}, store=False, user="u1")
    check_finished(resp, 8)
    assert [item.type for item in resp.output] == ["message"]
    message = resp.output[0]
    assert message.role == "assistant" and [p.type for p in message.content] == ["output_text"]
    assert resp.output_text == message.content[0].text
    assert resp.metadata == {"trace": "t1"} and resp.temperature == 0 and resp.user == "u1"
    assert resp.text.format.type == "text" and resp.tools == [] and resp.tool_choice == "auto"


def test_items_instructions_and_several_turns_reach_the_prompt(client):
    turns = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "tell me "},
                          {"type": "input_text", "text": "more"}]}]
    plain = create(client, input=turns, max_output_tokens=4, temperature=0)
    briefed = create(client, input=turns, instructions="Be brief.", max_output_tokens=4,
                     temperature=0)
    last = create(client, input=turns[-1:], max_output_tokens=4, temperature=0)
    for resp in (plain, briefed, last):
        check_finished(resp, 4)
    assert briefed.instructions == "Be brief."
    assert briefed.usage.input_tokens > plain.usage.input_tokens > last.usage.input_tokens
    developer = create(client, input=[{"role": "developer", "content": "Be brief."}, *turns],
                       max_output_tokens=4, temperature=0)
    assert developer.usage.input_tokens == briefed.usage.input_tokens  # a system message


def test_required_tool_choice_returns_valid_function_calls(client):
    for seed_temperature in (1.0, 0.7):
        resp = create(client, input=QUESTION, tools=TOOLS, tool_choice="required",
                      temperature=seed_temperature, max_output_tokens=1000)
        assert resp.status == "completed"
        check_calls(resp.output)
        assert resp.output_text == "" and [t.name for t in resp.tools] == ["get_weather", "add"]
    single = create(client, input=QUESTION, tools=TOOLS, tool_choice="required",
                    parallel_tool_calls=False, temperature=1.0, max_output_tokens=1000)
    assert len(single.output) == 1 and single.parallel_tool_calls is False
    named = create(client, input=QUESTION, tools=TOOLS, temperature=1.0,
                   tool_choice={"type": "function", "name": "add"}, max_output_tokens=1000)
    assert [item.name for item in named.output] == ["add"]
    check_calls(named.output, {"add": ADD})
    assert named.tool_choice.name == "add"


def test_a_function_call_and_its_output_go_back_in_input(client):
    first = create(client, input=QUESTION, tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=False, temperature=1.0, max_output_tokens=1000)
    call = first.output[0]
    history = [{"role": "user", "content": QUESTION}, *first.output,  # the SDK's own items
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "18 degrees, sunny"}]
    second = create(client, input=history, tools=TOOLS, max_output_tokens=8, temperature=0)
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens + 10  # call + result rendered
    by_dict = create(client, input=[history[0], {"type": "function_call", "call_id":
                                                 call.call_id, "name": call.name,
                                                 "arguments": call.arguments}, history[2]],
                     tools=TOOLS, max_output_tokens=8, temperature=0)
    assert by_dict.usage.input_tokens == second.usage.input_tokens


def test_json_schema_text_format_parses_and_validates(client):
    fmt = {"type": "json_schema", "name": "x", "schema": MOOD, "strict": True}
    for temperature in (1.0, 0.5, 0.0):
        resp = create(client, input="Answer in JSON.", text={"format": fmt},
                      temperature=temperature, max_output_tokens=200)
        assert resp.status == "completed", resp.output_text
        jsonschema.validate(json.loads(resp.output_text), MOOD)
        assert resp.text.format.type == "json_schema" and resp.text.format.name == "x"
    anything = create(client, input="JSON please", text={"format": {"type": "json_object"}},
                      temperature=1.0, max_output_tokens=200)
    if anything.status == "completed":
        assert isinstance(json.loads(anything.output_text), dict)


def _stream(client, **params) -> list:
    with client.responses.create(model=GEN, stream=True, **params) as stream:
        return list(stream)


def test_a_stream_sends_its_events_in_order(client, url):
    events = _stream(client, input="Once upon a time", max_output_tokens=12, temperature=0)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    final = events[-1].response
    assert kinds[-1] == ("response.incomplete" if final.status == "incomplete"
                         else "response.completed")
    check_finished(final, 12)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == events[-4].text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events[3:-2]) and final.output[0].id == item_id
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    with client.responses.create(model=GEN, input="Long story", stream=True,
                                 max_output_tokens=1000) as stream:  # left after 4 events
        for _, _event in zip(range(4), stream):
            pass
    wait_drained(url, [GEN], KEY, app=APP)


def test_a_streamed_tool_call_sends_argument_events(client):
    events = _stream(client, input=QUESTION, tools=TOOLS, tool_choice="required",
                     parallel_tool_calls=False, temperature=1.0, max_output_tokens=1000)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-5:] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    final = events[-1].response
    check_calls(final.output)
    assert events[-3].arguments == events[-4].delta == final.output[0].arguments


def test_unknown_and_ignored_fields_are_accepted(url):
    r = httpx.post(f"{url}/v1/responses", timeout=120,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": GEN, "input": "hi", "max_output_tokens": 4, "store": True,
                         "reasoning": {"effort": "low"}, "truncation": "auto",
                         "include": ["message.output_text.logprobs"], "service_tier": "auto",
                         "text": {"format": {"type": "text"}, "verbosity": "low"},
                         "a_future_field": {"x": 1}})
    assert r.status_code == 200, r.text
    Response.model_validate(r.json())


@pytest.mark.parametrize("params,param,needles", [
    ({"previous_response_id": "resp_abc"}, "previous_response_id", ["not stored", "resp_abc"]),
    ({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"}]}]},
     "input[0].content[1].type", ["input_image"]),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", ["web_search"]),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type",
     ["item_reference"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}}, "text.format",
     ["nope"]),
    ({"max_output_tokens": 5000}, "max_output_tokens", ["max_model_len"]),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(client, params, param, needles):
    body = {"input": "hi", "max_output_tokens": 4, **params}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=GEN, **body)
    error = info.value.body
    assert (error["param"] or "").startswith(param), error
    for needle in needles:
        assert needle in error["message"], error


def test_an_error_mid_stream_ends_it_with_error_and_response_failed():
    """The re-emitter alone, on chat chunks that fail after some text: every event is
    valid for the SDK, the last two are ``error`` and ``response.failed``, and the chat
    stream is closed (which releases the request's lease)."""
    import asyncio

    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from deployments.http.errors import constraint_failed
    from deployments.http.responses import sse
    from deployments.http.responses_api import events
    from deployments.http.responses_protocol import ResponsesRequest

    closed = []

    async def chunks():
        try:
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]})
            yield sse({"choices": [{"index": 0, "delta": {"content": "{\"a\""},
                                    "finish_reason": None}]})
            yield sse(constraint_failed("no continuation").body())
            yield sse("[DONE]")
        finally:
            closed.append(True)

    async def collect():
        req = ResponsesRequest.model_validate({"model": GEN, "input": "x", "stream": True})
        return [e async for e in events(req, chunks())]

    raw = asyncio.run(collect())
    assert all(e.startswith("event: ") for e in raw)
    payloads = [json.loads(e.split("data: ", 1)[1]) for e in raw]
    adapter = TypeAdapter(ResponseStreamEvent)
    kinds = [adapter.validate_python(p).type for p in payloads]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "error",
                     "response.failed"]
    assert payloads[-2]["code"] == "constraint_failed"
    failed = payloads[-1]["response"]
    assert failed["status"] == "failed" and "no continuation" in failed["error"]["message"]
    assert closed == [True]
