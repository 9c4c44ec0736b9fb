"""Tool calls without Ray: the Hermes-format parser, the streaming splitter, and the
constraint each ``tool_choice`` compiles to (checked by llguidance with the smoke
decoder's tokenizer)."""

from __future__ import annotations

import json

import pytest

from deployments.http import tools

ADD = {"name": "add", "parameters": {"type": "object", "required": ["a", "b"],
                                     "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}}}}
NOW = {"name": "now"}  # no parameters: arguments is an empty object
BLOCK = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_parse_finds_calls_and_keeps_the_rest_as_content():
    content, calls = tools.parse(f"Sure.\n{BLOCK}\n{BLOCK}", {"add"})
    assert content == "Sure."
    assert [c["function"]["name"] for c in calls] == ["add", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    assert tools.parse(BLOCK, {"add"})[0] is None  # nothing but the call: no content


@pytest.mark.parametrize("text", [
    "no call here",
    BLOCK.replace('"add"', '"sub"'),  # not one of the tools
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',
])
def test_anything_else_stays_content(text):
    assert tools.parse(text, {"add"}) == (text, [])


def test_stream_sends_content_and_holds_calls_across_chunk_boundaries():
    stream = tools.ToolStream({"add"})
    pieces = ["Let me add. <to", "ol_ca", "ll>\n{\"name\": \"add\", ", "\"arguments\": {}}\n</tool",
              "_call>"]
    sent = [stream.feed(p) for p in pieces]
    assert sent == ["Let me add. ", "", "", "", ""]
    rest, calls = stream.finish()
    assert rest == "" and calls[0]["function"]["name"] == "add"
    lookalike = tools.ToolStream({"add"})
    assert [lookalike.feed(p) for p in ["a <t", "able> b"]] == ["a ", "<table> b"]
    assert lookalike.finish() == ("", [])


@pytest.fixture(scope="module")
def grammars():
    from transformers import AutoTokenizer

    from worker.generate.grammar import Grammars
    from worker.models.sources import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smoke:decoder"))
    return Grammars(tok, len(tok), frozenset([tok.eos_token_id]))


@pytest.mark.parametrize(("mode", "named", "parallel"), [
    ("required", None, True), ("required", None, False), ("named", "add", True),
    ("named", "now", False)])
def test_constraints_compile(grammars, mode, named, parallel):
    structured = tools.constraint([ADD, NOW], mode, parallel, named)
    assert structured.kind == "lark" and tools.OPEN in structured.value
    grammars.check(structured)
    assert ('("\\n" call)*' in structured.value) == (parallel and mode == "required")
    if named is not None:  # only the named function's schema is in the grammar
        other = "now" if named == "add" else "add"
        assert f'"const": "{named}"' in structured.value
        assert f'"const": "{other}"' not in structured.value
    assert tools.constraint([ADD], "auto", True) is None
    assert tools.constraint([ADD], "none", True) is None


# ---- $defs of nested models, hoisted; calls cut by max_tokens never leak ----------------

NESTED = {"name": "save", "parameters": {
    "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string",
                                                                 "maxLength": 8}},
                       "required": ["name"]}},
    "type": "object", "properties": {"home": {"$ref": "#/$defs/City"},
                                     "same": {"$ref": "#/properties/home"}},
    "required": ["home"]}}


def _call_schema(structured) -> dict:
    grammar = structured.value
    start = grammar.index("%json ") + len("%json ")
    return json.JSONDecoder().raw_decode(grammar[start:])[0]


def test_defs_are_hoisted_to_the_root_of_the_call_schema(grammars):
    structured = tools.constraint([ADD, NESTED], "named", True, "save")
    call = _call_schema(structured)
    assert "City" in call["$defs"] and "$defs" not in call["properties"]["arguments"]
    args = call["properties"]["arguments"]
    assert args["properties"]["home"] == {"$ref": "#/$defs/City"}
    assert args["properties"]["same"] == {"$ref": "#/properties/arguments/properties/home"}
    grammars.check(structured)  # the references resolve: it compiles
    both = tools.constraint([ADD, NESTED], "required", True)
    assert _call_schema(both)["anyOf"][1]["properties"]["arguments"]["properties"]["same"] == {
        "$ref": "#/anyOf/1/properties/arguments/properties/home"}
    grammars.check(both)


def test_a_pydantic_function_tool_compiles(grammars):
    import openai
    from pydantic import BaseModel

    class Address(BaseModel):
        city: str

    class Person(BaseModel):
        name: str
        address: Address

    tool = openai.pydantic_function_tool(Person)["function"]
    assert "$defs" in tool["parameters"]
    grammars.check(tools.constraint([tool], "required", False))


def test_conflicting_definitions_name_the_tool():
    from deployments.http.errors import APIError

    other = json.loads(json.dumps(NESTED).replace('"maxLength": 8', '"maxLength": 9'))
    other["name"] = "save2"
    with pytest.raises(APIError) as err:
        tools.constraint([NESTED, other], "required", True)
    assert err.value.param == "tools[1].function.parameters"
    assert "response_format" not in err.value.message


@pytest.mark.parametrize("tail", ["<", "<tool", "<tool_call", "<tool_call>", "<tool_call>\n{",
                                  '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool'])
def test_a_call_cut_by_max_tokens_never_reaches_content(tail):
    text = "Sure. " + tail
    assert tools.parse(text, {"add"}, cut=True) == ("Sure. ", [])
    stream = tools.ToolStream({"add"})
    sent = "".join(stream.feed(ch) for ch in text)  # one character per delta
    rest, calls = stream.finish(cut=True)
    assert sent + rest == "Sure. " and calls == []
    whole = tools.ToolStream({"add"})
    assert whole.feed(text) + whole.finish(cut=True)[0] == "Sure. "


def test_a_complete_call_before_a_cut_one_is_kept():
    text = f"{BLOCK}\n<tool_call>\n{{\"name\""
    content, calls = tools.parse(text, {"add"}, cut=True)
    assert content is None and len(calls) == 1
    stream = tools.ToolStream({"add"})
    assert stream.feed(text) == ""
    rest, found = stream.finish(cut=True)
    assert rest == "" and len(found) == 1
