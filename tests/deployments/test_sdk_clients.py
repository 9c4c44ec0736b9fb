"""The bodies real SDKs send, each through the library that sends it, over real Ray Serve
(one app for the module; the random-weight smoke decoder): instructor (TOOLS and
JSON_SCHEMA modes, nested models), ``openai.pydantic_function_tool``, langchain-openai
(chat: batch, a tool loop, structured output; legacy completions over a prompt list),
litellm, llama-index's OpenAILike, and the raw ``openai`` client with vLLM's fields,
nulls, ``seed: -1`` and unknown fields (accepted, named in ``x-packserve-ignored-fields``).
The model's text is noise: only deterministic facts are asserted (statuses, shapes,
indexes, headers, and schema validity of output a grammar constrains)."""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.deployments.conftest import KEY, decoder_args, drained_app
from tests.deployments.test_edge import eventually, node_metrics, serve_logs

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for litellm

GEN, APP, PREFIX = "smoke-sdk", "sdk", "/sdk"
ARGS = decoder_args(GEN)
USER = [{"role": "user", "content": "Tell me about a person."}]


class Address(BaseModel):
    city: str = Field(max_length=6)
    zip: int = Field(ge=0, le=999)


class Person(BaseModel):
    """A person and where they live (a nested model: its schema has $defs)."""

    name: str = Field(max_length=6)
    address: Address


ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "required": ["a", "b"], "additionalProperties": False,
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                       "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}}


@pytest.fixture(scope="module")
def url(serve_url):
    with drained_app(serve_url, ARGS, APP, PREFIX) as app_url:
        yield app_url


@pytest.fixture(scope="module")
def base(url):
    return f"{url}/v1"


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


# ---- instructor --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_nested_model(client, mode):
    import instructor

    ins = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    person = ins.chat.completions.create(model=GEN, messages=USER, response_model=Person,
                                         max_tokens=300, temperature=1.0, seed=3,
                                         max_retries=0)
    assert isinstance(person, Person) and isinstance(person.address, Address)


def test_json_object_with_a_schema_under_response_format(client):
    """The JSON-mode form of Together, Anyscale and instructor's JSON modes: a ``schema``
    directly under ``response_format``; the output follows it."""
    got = client.chat.completions.create(model=GEN, messages=USER, max_tokens=300, seed=5,
                                         response_format={"type": "json_object",
                                                          "schema": Person.model_json_schema()})
    Person.model_validate_json(got.choices[0].message.content)


def test_pydantic_function_tool_with_defs(client, url):
    tool = openai.pydantic_function_tool(Person)
    assert "$defs" in tool["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "Person"}}):
        got = client.chat.completions.create(model=GEN, messages=USER, tools=[tool],
                                             tool_choice=choice, max_tokens=300, seed=1)
        call = got.choices[0].message.tool_calls[0]
        Person.model_validate_json(call.function.arguments)
    bad = {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}}}
    r = post(url, "/v1/chat/completions",
             {"model": GEN, "messages": USER, "tools": [bad], "tool_choice": "required"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools[0].function.parameters"
    assert "response_format" not in r.json()["error"]["message"]


# ---- langchain ---------------------------------------------------------------------

def test_langchain_chat_batch_tools_loop_and_structured_output(base):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base, api_key=KEY, model=GEN, max_tokens=8, max_retries=0)
    answers = llm.batch(["Hello", "Bonjour"])
    assert len(answers) == 2 and all(isinstance(a.content, str) for a in answers)
    tooled = llm.bind_tools([ADD], tool_choice="add").bind(max_tokens=100)
    messages = [HumanMessage("What is 2 + 3?")]
    ai = tooled.invoke(messages)
    assert [c["name"] for c in ai.tool_calls] == ["add"]
    messages += [ai, ToolMessage("5", tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.invoke(messages)  # the assistant's call and the result go back
    assert isinstance(final.content, str)
    big = ChatOpenAI(base_url=base, api_key=KEY, model=GEN, max_tokens=300, max_retries=0)
    assert isinstance(big.with_structured_output(Person).invoke("Who?"), Person)
    by_tool = big.with_structured_output(Person, method="function_calling")  # $defs, named
    assert isinstance(by_tool.invoke("Who?"), Person)


def test_langchain_legacy_completions_of_a_prompt_list(base, url):
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=base, api_key=KEY, model=GEN, max_tokens=4, max_retries=0)
    result = llm.generate(["one", "two", "three"])
    assert len(result.generations) == 3
    assert all(len(g) == 1 and isinstance(g[0].text, str) for g in result.generations)


# ---- litellm and llama-index -------------------------------------------------------

def test_litellm_plain_and_with_tools(base):
    import litellm

    plain = litellm.completion(model=f"openai/{GEN}", api_base=base, api_key=KEY,
                               messages=USER, max_tokens=6)
    assert plain.choices[0].message.role == "assistant"
    tooled = litellm.completion(model=f"openai/{GEN}", api_base=base, api_key=KEY,
                                messages=USER, tools=[ADD, openai.pydantic_function_tool(Person)],
                                tool_choice="required", parallel_tool_calls=False,
                                max_tokens=300, seed=4)
    call = tooled.choices[0].message.tool_calls[0]
    schema = {"add": lambda a: set(json.loads(a)) == {"a", "b"},
              "Person": lambda a: Person.model_validate_json(a) is not None}
    assert schema[call.function.name](call.function.arguments)


def test_llama_index_openai_like_chat_and_structured_predict(base):
    from llama_index.core.llms import ChatMessage
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=GEN, api_base=base, api_key=KEY, is_chat_model=True,
                     is_function_calling_model=True, max_tokens=300, context_window=2048,
                     max_retries=0)
    reply = llm.chat([ChatMessage(role="user", content="hi")], max_tokens=6)
    assert reply.message.role == "assistant"
    person = llm.structured_predict(Person, PromptTemplate("Describe {who}."), who="a person")
    assert isinstance(person, Person)


# ---- the raw client: vLLM's fields, nulls, unknown fields --------------------------

def test_vllm_fields_nulls_seed_and_the_ignored_fields_header(client):
    raw = client.chat.completions.with_raw_response.create(
        model=GEN, messages=USER, max_tokens=4, seed=-1, temperature=None, top_p=None,
        n=None, stream=None, logprobs=None, top_logprobs=None, presence_penalty=None,
        frequency_penalty=None, stop=None, tools=None, tool_choice=None,
        response_format=None, user=None, parallel_tool_calls=None,
        extra_body={"chat_template_kwargs": {"enable_thinking": False},
                    "add_generation_prompt": True, "skip_special_tokens": False,
                    "include_stop_str_in_output": True, "truncate_prompt_tokens": 6,
                    "priority": 5, "structured_outputs": {"choice": ["yes", "no"]},
                    "store": True, "metadata": {"k": "v"}, "service_tier": "auto",
                    "reasoning_effort": "low", "prompt_cache_key": "k",
                    "safety_identifier": "s", "zzz_unknown": 1, "aaa_unknown": {"x": 1}})
    assert raw.headers["x-packserve-ignored-fields"] == (
        "aaa_unknown,metadata,priority,prompt_cache_key,reasoning_effort,safety_identifier,"
        "store,zzz_unknown")
    got = raw.parse()
    assert got.choices[0].message.content in ("yes", "no")  # structured_outputs honoured
    assert got.usage.prompt_tokens == 6  # truncate_prompt_tokens kept the last 6
    clean = client.chat.completions.with_raw_response.create(model=GEN, messages=USER,
                                                             max_tokens=2)
    assert "x-packserve-ignored-fields" not in clean.headers
    stream = client.completions.with_raw_response.create(
        model=GEN, prompt="hi", max_tokens=2, stream=True, extra_body={"unknown_x": 1})
    assert stream.headers["x-packserve-ignored-fields"] == "unknown_x"
    assert list(stream.parse())
    echoed = client.completions.create(model=GEN, prompt="hi", max_tokens=3, echo=None,
                                       logprobs=None, n=None, seed=-1, stop=None,
                                       extra_body={"stop": ["\n"], "include_stop_str_in_output":
                                                   True})
    assert len(echoed.choices) == 1


def test_completions_prompt_lists_index_and_usage(client):
    prompts = ["one", "two words", "three more words"]
    singles = [client.completions.create(model=GEN, prompt=p, max_tokens=3, temperature=0)
               for p in prompts]
    got = client.completions.create(model=GEN, prompt=prompts, max_tokens=3, n=2,
                                    temperature=0)
    assert [c.index for c in got.choices] == list(range(6))
    for j, single in enumerate(singles):  # greedy: each prompt's choices equal its own run
        assert got.choices[2 * j].text == got.choices[2 * j + 1].text == single.choices[0].text
    assert got.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert got.usage.completion_tokens == sum(c.usage.completion_tokens for c in singles) * 2
    ids = client.completions.create(model=GEN, prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    chunks = list(client.completions.create(model=GEN, prompt=prompts, max_tokens=3, n=2,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert {i: texts[i] for i in range(6)} == {c.index: c.text for c in got.choices}
    assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens


def test_legacy_logprobs_hold_the_sampled_token_and_echo_scores_the_prompt(client):
    got = client.completions.create(model=GEN, prompt="Once upon a", max_tokens=6,
                                    temperature=1.0, seed=11, logprobs=1)
    lp = got.choices[0].logprobs
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert token in top  # the sampled token, even when it is not the most likely
    echo = client.completions.create(model=GEN, prompt="Once upon a", max_tokens=2,
                                     temperature=0, echo=True, logprobs=1)
    elp = echo.choices[0].logprobs
    num_prompt = echo.usage.prompt_tokens
    assert len(elp.tokens) == num_prompt + echo.usage.completion_tokens
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(v is not None for v in elp.token_logprobs[1:])
    assert all(t is not None and elp.tokens[i + 1] in t
               for i, t in enumerate(elp.top_logprobs[1:num_prompt]))
    assert elp.text_offset == sorted(elp.text_offset)


# ---- refusals ----------------------------------------------------------------------

def test_a_tool_message_without_its_call_id_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=GEN, max_tokens=2, messages=[
            *USER, {"role": "tool", "content": "5"}])
    assert err.value.body["param"] == "messages[1].tool_call_id"


REFUSED = [({"stop": ""}, "stop"), ({"stop": [""]}, "stop"),
           ({"stop_token_ids": [-1]}, "stop_token_ids")]


def test_engine_refusals_are_400s_naming_the_field_and_counted_as_400(url):
    """They were 500s (``SamplingParams.stop`` escaped the route with a traceback): now
    the body's validation refuses them, so they count as 400 under the model the body
    names (a body naming no served model counts under "unknown") and log one WARNING."""
    def count(status: str, model: str) -> float:
        return sum(node_metrics("ray_packserve_requests_total", status=status, model=model,
                                endpoint="completions"))

    before, unknown = count("400", GEN), count("400", "unknown")
    for fields, param in REFUSED:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": USER})):
            r = post(url, path, {"model": GEN, "max_tokens": 2, **body, **fields})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and "SamplingParams" not in err["message"], err
    assert eventually(lambda: count("400", GEN) >= before + len(REFUSED))
    r = post(url, "/v1/completions", {"model": "no-such-model", "prompt": "hi", "stop": ""})
    assert r.status_code == 400, r.text
    assert eventually(lambda: count("400", "unknown") >= unknown + 1)
    assert not count("500", GEN) and not count("500", "unknown")
    for param in ("stop", "stop_token_ids"):
        assert eventually(lambda p=param: serve_logs(f"{p}: must be"))
        assert "WARNING" in serve_logs(f"{param}: must be")
    assert not serve_logs("SamplingParams.stop")


# ---- a tool call cut by max_tokens -------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 3, 8])
def test_a_tool_call_cut_by_max_tokens_never_leaks_into_content(client, max_tokens):
    named = {"type": "function", "function": {"name": "add"}}
    got = client.chat.completions.create(model=GEN, messages=USER, tools=[ADD],
                                         tool_choice=named, max_tokens=max_tokens, seed=2)
    choice = got.choices[0]
    assert choice.finish_reason == "length"
    assert "<tool" not in (choice.message.content or "") and not choice.message.tool_calls
    assert "<" not in (choice.message.content or "")
    content = ""
    for chunk in client.chat.completions.create(model=GEN, messages=USER, tools=[ADD],
                                                tool_choice=named, max_tokens=max_tokens,
                                                seed=2, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            assert not c.delta.tool_calls
    assert "<" not in content
