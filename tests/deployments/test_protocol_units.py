"""Request bodies without Ray (deployments/http/protocol.py, responses.py): unknown
fields accepted and named, ``null`` as the default, vLLM's extensions, engine refusals
named by the client's field, prompt lists, and legacy completion logprobs."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from deployments.http.errors import APIError
from deployments.http.protocol import (
    IGNORED_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    TokenizeRequest,
    ignored_header,
)
from deployments.http.responses import CompletionLogprobs, stop_string, top_logprobs
from worker.params import TokenLogprobs

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def refused(cls, body: dict) -> tuple[str, str]:
    """(field, message) of the first error validating ``body`` (a 400's param)."""
    with pytest.raises(ValidationError) as err:
        cls.model_validate(body)
    first = err.value.errors()[0]
    if first["type"] == "packserve_field":
        return first["ctx"]["field"], first["ctx"]["message"]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


def test_unknown_fields_are_accepted_ignored_and_named_sorted():
    body = chat(zeta=1, alpha={"x": 1}, store=True, metadata={"k": "v"}, priority=3,
                user="u", service_tier="flex", reasoning_effort="low", prompt_cache_key="p",
                safety_identifier="s")
    assert body.ignored_fields() == ["alpha", "metadata", "priority", "prompt_cache_key",
                                     "reasoning_effort", "safety_identifier", "service_tier",
                                     "store", "user", "zeta"]
    # neutral values change nothing: not named
    assert chat(store=False, priority=0, service_tier="auto", user=None).ignored_fields() == []
    nested = completion(stream=True, stream_options={"include_usage": True,
                                                      "continuous_usage_stats": True},
                        structured_outputs={"regex": "a+", "disable_fallback": True})
    assert nested.ignored_fields() == ["stream_options.continuous_usage_stats",
                                       "structured_outputs.disable_fallback"]
    assert EmbeddingRequest.model_validate({"model": "m", "input": "x", "extra": 1,
                                            "encoding_format": None}).ignored_fields() == ["extra"]


def test_the_header_and_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert ignored_header(chat(b=1, a=2)) == {IGNORED_HEADER: "a,b"}
        assert ignored_header(chat()) == {}
    assert len(caplog.records) == 1 and "a, b" in caplog.records[0].getMessage()


def test_wrong_values_of_known_fields_are_still_refused():
    assert refused(ChatCompletionRequest, {"model": "m", "messages": USER,
                                           "temperature": "1"})[0] == "temperature"
    assert refused(ChatCompletionRequest, {"model": "m", "messages": USER,
                                           "store": "yes"})[0] == "store"
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "n": 0})[0] == "n"
    assert refused(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": "x", "contnet": "typo"}]})[0] == "messages.0.contnet"


NULLS = ["temperature", "top_p", "n", "stream", "stream_options", "logprobs", "top_logprobs",
         "presence_penalty", "frequency_penalty", "parallel_tool_calls", "max_tokens",
         "max_completion_tokens", "stop", "seed", "tools", "tool_choice", "response_format",
         "user"]


def test_null_means_the_default():
    body = chat(**dict.fromkeys(NULLS))
    default = chat()
    for name in NULLS:
        assert getattr(body, name) == getattr(default, name), name
    assert body.ignored_fields() == []
    c = completion(echo=None, logprobs=None, n=None, temperature=None)
    assert (c.echo, c.n, c.temperature) == (False, 1, 1.0)
    assert EmbeddingRequest.model_validate({"model": "m", "input": "x",
                                            "encoding_format": None}).encoding_format == "float"


def test_seed_minus_one_is_no_seed():
    assert chat(seed=-1).seed is None
    assert chat(seed=-1).sampling_params(4, None).seed is None
    assert refused(ChatCompletionRequest, {"model": "m", "messages": USER, "seed": -2})[0] == "seed"


def test_sdk_fields_on_assistant_messages_are_ignored():
    dumped = {"role": "assistant", "content": None, "refusal": None, "audio": None,
              "function_call": None, "annotations": [], "reasoning_content": "r", "name": "bot",
              "tool_calls": [{"id": "call_1", "index": 0, "type": "function",
                              "function": {"name": "f", "arguments": "{}"}}]}
    body = chat(messages=[*USER, dumped, {"role": "tool", "tool_call_id": "call_1",
                                          "content": "4"}])
    assert body.messages[1].rendered() == {  # what the template sees: none of them
        "role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert body.ignored_fields() == []


def test_a_tool_message_needs_its_tool_call_id():
    field, message = refused(ChatCompletionRequest, {"model": "m", "messages": [
        *USER, {"role": "tool", "content": "4"}]})
    assert field == "messages[1].tool_call_id" and "tool_call_id" in message


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop": ""}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids")])
def test_engine_refusals_name_the_clients_field(fields, param):
    for cls, base in ((CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest,
                                                              {"messages": USER})):
        field, message = refused(cls, {"model": "m", **base, **fields})
        assert field == param and "SamplingParams" not in message, message


def test_sampling_params_refusals_are_400s_naming_the_clients_field():
    body = chat(max_completion_tokens=5)
    with pytest.raises(APIError) as err:
        body.sampling_params(0, None)  # the engine refuses max_tokens=0
    assert err.value.status == 400 and err.value.param == "max_completion_tokens"
    assert "SamplingParams" not in err.value.message
    with pytest.raises(APIError) as err:
        chat(logprobs=True).sampling_params(4, 99)
    assert err.value.param == "top_logprobs"


def test_vllm_extensions_are_honoured():
    body = chat(skip_special_tokens=False, chat_template_kwargs={"enable_thinking": False},
                continue_final_message=True, truncate_prompt_tokens=3,
                include_stop_str_in_output=True, stop=["x"])
    assert body.sampling_params(4, None).skip_special_tokens is False
    assert body.template_options() == {"add_generation_prompt": False,
                                       "continue_final_message": True,
                                       "template_kwargs": {"enable_thinking": False}}
    assert body.truncated(list(range(10)), 100) == [7, 8, 9]
    assert chat(truncate_prompt_tokens=-1).truncated(list(range(10)), 4) == [6, 7, 8, 9]
    assert body.ignored_fields() == []
    assert refused(ChatCompletionRequest, {"model": "m", "messages": USER,
                                           "continue_final_message": True,
                                           "add_generation_prompt": True})[0] == \
        "continue_final_message"
    assert refused(ChatCompletionRequest, {"model": "m", "messages": USER,
                                           "chat_template_kwargs": {"tokenize": False}})[0] == \
        "chat_template_kwargs.tokenize"
    assert refused(ChatCompletionRequest, {"model": "m", "messages": USER,
                                           "truncate_prompt_tokens": 0})[0] == \
        "truncate_prompt_tokens"
    tok = TokenizeRequest.model_validate({"model": "m", "messages": USER,
                                          "chat_template_kwargs": {"x": 1}})
    assert tok.template_options()["template_kwargs"] == {"x": 1}


@pytest.mark.parametrize(("so", "kind"), [
    ({"json": {"type": "object"}}, "json_schema"), ({"json": '{"type": "object"}'}, "json_schema"),
    ({"regex": "a+"}, "regex"), ({"choice": ["a", "b"]}, "choice"),
    ({"grammar": 'start: "a"'}, "lark"), ({"json_object": True}, "json_object")])
def test_structured_outputs_is_guided_in_vllms_new_form(so, kind):
    assert completion(structured_outputs=so).structured().kind == kind
    guided = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
              "grammar": "guided_grammar"}
    key = next(iter(so))
    if key in guided:
        assert completion(**{guided[key]: so[key]}).structured() == \
            completion(structured_outputs=so).structured()
    assert refused(CompletionRequest, {"model": "m", "prompt": "x", "structured_outputs": so,
                                       "guided_regex": "b"})[0] in ("guided_regex",
                                                                    "structured_outputs")


def test_response_format_shapes_of_sdks():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    named = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "M", "schema": schema, "strict": True}}).structured()
    flat = chat(response_format={"type": "json_object", "schema": schema}).structured()
    assert named == flat and named.kind == "json_schema"
    assert chat(response_format={"type": "json_object"}).structured().kind == "json_object"


def test_prompt_lists():
    assert completion(prompt=["a", "b"]).prompt == ["a", "b"]
    assert completion(prompt=[[1, 2], [3]]).prompt == [[1, 2], [3]]
    assert completion(prompt=[1, 2]).prompt == [[1, 2]]
    assert completion(prompt="a").prompt == ["a"]
    assert refused(CompletionRequest, {"model": "m", "prompt": ["a", [1]]})[0] == "prompt"
    assert refused(CompletionRequest, {"model": "m", "prompt": []})[0] == "prompt"


class FakeTokenizer:
    """Token i is the text TEXTS[i] (two ids share a text)."""

    TEXTS = {0: "a", 1: "b", 2: "a", 3: "c", 7: "<s>"}

    def token_text(self, token_id: int) -> str:
        return self.TEXTS[token_id]

    @property
    def tokenizer(self):
        return self

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.TEXTS[i] for i in ids if not (skip_special_tokens and i == 7))


def test_top_logprobs_hold_the_sampled_token_and_keep_the_best_of_equal_texts():
    tok = FakeTokenizer()
    # sampled token 3 ("c") is not in the top 2; ids 0 and 2 are both "a"
    entry = TokenLogprobs(-3.0, ((0, -0.5), (2, -0.1)))
    assert top_logprobs(tok, 3, entry) == {"a": -0.1, "c": -3.0}
    assert list(top_logprobs(tok, 3, entry)) == ["a", "c"]  # most likely first
    same = TokenLogprobs(-0.1, ((2, -0.1), (0, -0.5)))  # a lower "a" never overwrites
    assert top_logprobs(tok, 2, same) == {"a": -0.1}


def test_echoed_prompt_logprobs_and_offsets_per_choice():
    tok = FakeTokenizer()
    prompt = CompletionLogprobs(tok).prompt([0, 1, 3], [-1.0, -2.0])
    assert prompt["token_logprobs"] == [None, -1.0, -2.0]
    assert prompt["top_logprobs"] == [None, {"b": -1.0}, {"c": -2.0}]
    assert prompt["text_offset"] == [0, 1, 2]
    generated = CompletionLogprobs(tok, 3).generated([1], [TokenLogprobs(-0.2, ((1, -0.2),))])
    assert generated["text_offset"] == [3] and generated["top_logprobs"] == [{"b": -0.2}]


def test_the_stop_string_that_ended_the_text():
    tok = FakeTokenizer()
    assert stop_string(tok, [0, 1, 3], "a", ("x", "bc"), True) == "bc"
    assert stop_string(tok, [0, 1], "ab", ("c",), True) == ""  # ended otherwise
    assert stop_string(tok, [0], "a", (), True) == ""
