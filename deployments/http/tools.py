"""Tool calling on chat: the constraint for ``tool_choice``, and tool calls parsed from
the model's text in the Hermes / Qwen2.5 format, whole or streamed.

The tools reach the model through its chat template (``apply_chat_template(tools=...)``),
which tells it to answer a call as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

| ``tool_choice``     | generation                                             | response            |
|---------------------|--------------------------------------------------------|---------------------|
| ``none``            | free text (the tools are still in the prompt)          | content             |
| ``auto`` (default)  | free text                                              | the calls found in the text, if any, else content |
| ``required``        | constrained (llguidance Lark with embedded JSON        | one or more calls   |
|                     | schemas) to calls of the given tools, arguments valid  |                     |
| a named function    | constrained to one call of that function               | that call           |

A response with calls has ``finish_reason: "tool_calls"`` and the text outside the
blocks (if any) as ``content``. Streamed, content is sent as it comes except a tail that
may be the start of ``<tool_call>``; from the first block on, the text is held and the
calls go out as one ``tool_calls`` delta with the last chunk. A call cut by
``max_tokens`` (finish ``length``: the text ends inside a block, or in a prefix of
``<tool_call>``) is dropped: its markup never reaches ``content``, whole or streamed.

A function's ``parameters`` may use ``$defs`` (or ``definitions``) and ``$ref`` (nested
pydantic models: ``openai.pydantic_function_tool``, instructor): embedded under
``arguments`` their ``#/$defs/...`` references would not resolve, so the definitions
are hoisted to the root of the call's schema (as vLLM does) and other local references
re-pointed under ``arguments``.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from deployments.http.errors import bad_request
from worker.params import Structured, closed

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NO_WHITESPACE = {"whitespace_flexible": False}  # llguidance: compact JSON only


def constraint(tools: list[dict], mode: str, parallel: bool,
               named: str | None = None) -> Structured | None:
    """The output constraint for a ``tool_choice`` (None for ``none`` and ``auto``).
    ``tools``: OpenAI function definitions; ``mode``: "none", "auto", "required" or
    "named" (then ``named`` is the function)."""
    if mode in ("none", "auto"):
        return None
    chosen = [(i, t) for i, t in enumerate(tools) if mode == "required" or t["name"] == named]
    defs: dict[str, dict] = {}
    many = len(chosen) > 1
    schemas = [_call_schema(t, i, f"#/anyOf/{j}/properties/arguments" if many
                            else "#/properties/arguments", defs)
               for j, (i, t) in enumerate(chosen)]
    call = {"anyOf": schemas} if many else schemas[0]
    call.update({key: value for key, value in defs.items() if value})
    call["x-guidance"] = _NO_WHITESPACE
    block = f'"{OPEN}\\n" %json {json.dumps(call)} "\\n{CLOSE}"'
    many = parallel and mode == "required"
    more = ' ("\\n" call)*' if many else ""
    grammar = f"start: call{more}\ncall: {block}\n"
    return Structured("lark", grammar)


_DEFS = ("$defs", "definitions")


def _call_schema(tool: dict, index: int, at: str, defs: dict[str, dict]) -> dict:
    """The schema of one call of ``tool`` (``tools[index]``), its ``parameters``
    embedded at the JSON pointer ``at``; their definitions go into ``defs`` (shared by
    the calls of one grammar: a name two tools define differently is a 400)."""
    parameters = closed(tool.get("parameters") or {"type": "object", "properties": {}})
    parameters = hoist_defs(parameters, at, defs, f"tools[{index}].function.parameters")
    return {"type": "object",
            "properties": {"name": {"const": tool["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def hoist_defs(schema: dict, at: str, defs: dict[str, dict], field: str) -> dict:
    """``schema`` (to be embedded at the JSON pointer ``at`` of a larger one) without
    its ``$defs``/``definitions``, which are merged into ``defs`` (keyed by
    "$defs"/"definitions") for the root; its local ``$ref`` values that point elsewhere
    in it are re-pointed under ``at``."""
    if not isinstance(schema, dict) or not any(k in schema for k in _DEFS) and not _has_ref(
            schema):
        return schema
    schema = dict(schema)
    for key in _DEFS:
        found = schema.pop(key, None)
        if found is None:
            continue
        if not isinstance(found, dict):
            raise bad_request(f"{field}.{key}: must be an object of schemas; got "
                              f"{type(found).__name__}", param=field)
        merged = defs.setdefault(key, {})
        for name, sub in found.items():
            sub = _repoint(sub, at)
            if name in merged and merged[name] != sub:
                raise bad_request(f"{field}.{key}.{name}: another tool defines {name!r} "
                                  "differently; tool_choice required compiles every tool "
                                  "into one grammar: rename one of them", param=field)
            merged[name] = sub
    return _repoint(schema, at)


def _has_ref(value) -> bool:
    if isinstance(value, dict):
        return "$ref" in value or any(_has_ref(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_ref(v) for v in value)
    return False


def _repoint(value, at: str):
    """``$ref`` values of ``value`` that are local and not into the hoisted definitions
    ("#", "#/properties/x") re-pointed under ``at``."""
    if isinstance(value, list):
        return [_repoint(v, at) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _repoint(v, at) for k, v in value.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) and not any(
            ref.startswith(f"#/{key}/") for key in _DEFS):
        out["$ref"] = at + ref[1:]
    return out


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def without_unfinished_call(text: str) -> str:
    """``text`` without a tool call that ``max_tokens`` cut: from an opening tag with no
    closing tag after it, or a trailing prefix of ``<tool_call>``."""
    start = text.rfind(OPEN)
    if start >= 0 and text.find(CLOSE, start) < 0:
        return text[:start]
    keep = _partial_open(text)
    return text[:len(text) - keep] if keep else text


def parse(text: str, names: set[str], cut: bool = False) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole answer. A block that is not a JSON object with a
    known ``name`` and an object of ``arguments`` leaves the text as content, calls none.
    ``cut`` (finish ``length``): an unfinished call at the end is dropped first."""
    if cut:
        text = without_unfinished_call(text)
    calls = []
    for block in _BLOCK.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            return text, []
        if (not isinstance(call, dict) or call.get("name") not in names
                or not isinstance(call.get("arguments", {}), dict)):
            return text, []
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": json.dumps(call.get("arguments", {}))}})
    if not calls:
        return text, []
    content = _BLOCK.sub("", text).strip()
    return content or None, calls


@dataclass
class ToolStream:
    """One streamed choice's text, split into content to send now and held tool-call text."""

    names: set[str]
    text: str = ""  # everything so far
    sent: int = 0  # characters of ``text`` sent as content
    holding: bool = False  # a tool-call block has started: the rest is held

    def feed(self, delta: str) -> str:
        """Content that can be sent now."""
        self.text += delta
        if self.holding:
            return ""
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            self.holding = True
            out, self.sent = self.text[self.sent:start], start
            return out
        keep = _partial_open(self.text)  # the tail may still grow into <tool_call>
        end = len(self.text) - keep
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self, cut: bool = False) -> tuple[str, list[dict]]:
        """(content left to send, tool calls) once the choice finished; ``cut``
        (finish ``length``): an unfinished call at the end is dropped, not sent."""
        text = without_unfinished_call(self.text) if cut else self.text
        _, calls = parse(text, self.names)
        rest, self.sent = text[self.sent:], len(self.text)
        if not calls:
            return rest, []
        return _BLOCK.sub("", rest).strip(), calls


def _partial_open(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``<tool_call>``."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
