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
calls go out as one ``tool_calls`` delta with the last chunk.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

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
    chosen = [t for t in tools if mode == "required" or t["name"] == named]
    call = {"anyOf": [_call_schema(t) for t in chosen]} if len(chosen) > 1 \
        else _call_schema(chosen[0])
    call["x-guidance"] = _NO_WHITESPACE
    block = f'"{OPEN}\\n" %json {json.dumps(call)} "\\n{CLOSE}"'
    many = parallel and mode == "required"
    more = ' ("\\n" call)*' if many else ""
    grammar = f"start: call{more}\ncall: {block}\n"
    return Structured("lark", grammar)


def _call_schema(tool: dict) -> dict:
    parameters = closed(tool.get("parameters") or {"type": "object", "properties": {}})
    return {"type": "object",
            "properties": {"name": {"const": tool["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole answer. A block that is not a JSON object with a
    known ``name`` and an object of ``arguments`` leaves the text as content, calls none."""
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

    def finish(self) -> tuple[str, list[dict]]:
        """(content left to send, tool calls) once the choice finished."""
        _, calls = parse(self.text, self.names)
        rest, self.sent = self.text[self.sent:], len(self.text)
        if not calls:
            return rest, []
        return _BLOCK.sub("", rest).strip(), calls


def _partial_open(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``<tool_call>``."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
