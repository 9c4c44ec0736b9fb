"""POST /v1/responses bodies, and their translation into a chat request.

The Responses API is served statelessly on the chat path: ``ResponsesRequest.to_chat``
turns ``instructions`` + ``input`` into ``messages``, flat function ``tools`` into chat
tools, ``text.format`` into ``response_format`` and ``max_output_tokens`` into
``max_tokens``; ``deployments/http/responses_api.py`` runs it through
``OpenAIService.chat`` and shapes the answer as a ``Response``.

- Unknown fields, and known ones with no effect here (``metadata``, ``store``,
  ``reasoning``, ``truncation``, ``include``, ``service_tier``, ...), are accepted and
  ignored.
- What needs stored state (``previous_response_id``, ``conversation``, ``background``,
  ``prompt`` templates, ``item_reference`` items) is a 400 naming the field: nothing is
  stored, so send the whole conversation in ``input``.
- What a text model cannot serve (image, file or audio parts; built-in tools such as
  ``web_search``) is a 400 naming the field's path (``input[0].content[1].type``,
  ``tools[0].type``) and the value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.http.errors import APIError, bad_request
from deployments.http.protocol import (
    FIELD_ERROR,
    ChatCompletionRequest,
    field_error,
    short,
    valid_unicode,
)

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
STATEFUL = {  # fields that need responses stored server-side
    "previous_response_id": "previous_response_id refers to a stored response",
    "conversation": "conversation refers to a stored conversation",
    "prompt": "prompt refers to a stored prompt template",
}
# chat's field names as this endpoint's (errors raised on the chat path name the former)
CHAT_TO_RESPONSES = {"messages": "input", "max_tokens": "max_output_tokens",
                     "response_format": "text.format"}


class ResponsesRequest(BaseModel):
    """POST /v1/responses (see the module docstring for what is honoured)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    stream: bool = False
    user: str | None = None
    metadata: dict | None = None  # echoed, not stored
    previous_response_id: str | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    background: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        return valid_unicode(data)

    @model_validator(mode="after")
    def _stateless(self):
        for name, why in STATEFUL.items():
            if getattr(self, name) is not None:
                raise field_error(name, f"{why} ({short(getattr(self, name))}), but this "
                                  "server is stateless: responses are not stored; send the "
                                  "whole conversation in input instead")
        if self.background:
            raise field_error("background", "background: true needs stored responses to "
                              "poll; responses are not stored (this server is stateless)")
        return self

    # ---- the translation --------------------------------------------------------------

    def function_tools(self) -> list[dict]:
        """``tools`` in the Responses shape (flat), checked: function tools only."""
        out = []
        for i, tool in enumerate(self.tools or ()):
            kind = tool.get("type")
            if kind != "function":
                raise bad_request(f"tools[{i}].type: tool type {short(kind)} is not supported; "
                                  "only function tools are (this server runs no built-in "
                                  "tools such as web_search or file_search)", f"tools[{i}].type")
            if not isinstance(tool.get("name"), str):
                raise bad_request(f"tools[{i}].name: a function tool needs a name (a string); "
                                  f"got {short(tool.get('name'))}", f"tools[{i}].name")
            out.append({"type": "function", "name": tool["name"],
                        **{k: tool[k] for k in ("description", "parameters", "strict")
                           if tool.get(k) is not None}})
        return out

    def chat_tool_choice(self):
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return choice
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise bad_request(f"tool_choice: {short(choice)} is not supported; send none, auto, "
                          "required or {\"type\": \"function\", \"name\": ...}", "tool_choice")

    def response_format(self) -> dict | None:
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise bad_request("text.format.schema: json_schema needs a schema (an object);"
                                  f" got {short(fmt.get('schema'))}", "text.format.schema")
            spec = {"name": fmt.get("name") or "response", "schema": fmt["schema"],
                    **{k: fmt[k] for k in ("strict", "description") if fmt.get(k) is not None}}
            return {"type": "json_schema", "json_schema": spec}
        raise bad_request(f"text.format.type: {short(kind)} is not supported; send text, "
                          "json_object or json_schema", "text.format.type")

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request that answers this one (a 400 naming this body's fields)."""
        body: dict = {"model": self.model, "messages": messages(self.instructions, self.input),
                      "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        tools = self.function_tools()
        optional = {"max_tokens": self.max_output_tokens, "temperature": self.temperature,
                    "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
                    "tool_choice": self.chat_tool_choice(), "user": self.user,
                    "response_format": self.response_format(),
                    "tools": [{"type": "function", "function": {
                        k: v for k, v in t.items() if k != "type"}} for t in tools] or None}
        body.update({k: v for k, v in optional.items() if v is not None})
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise chat_validation_error(exc) from None


def messages(instructions: str | None, items: str | list[dict]) -> list[dict]:
    """Chat messages of ``instructions`` (a system message first) and ``input``."""
    out = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not items:
        raise bad_request("input: must not be empty", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise bad_request(f"{where}.role: must be one of {', '.join(ROLES)}; got "
                                  f"{short(role)}", f"{where}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function", "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant":  # the calls of one assistant turn
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": text_of(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier reasoning: no effect on a model that does not reason
        else:
            why = ("refers to stored items; nothing is stored (the server is stateless)"
                   if kind == "item_reference" else "is not supported; send message, "
                   "function_call or function_call_output items")
            raise bad_request(f"{where}.type: item type {short(kind)} {why}", f"{where}.type")
    return out


def text_of(content, where: str) -> str:
    """A string, or a list of text parts (``input_text``, ``output_text``, ``refusal``)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{where}: must be a string or a list of content parts; got "
                          f"{short(content)}", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in (*TEXT_PARTS, "refusal"):
            raise bad_request(f"{at}.type: content of type {short(kind)} is not supported; "
                              "this server takes text only (input_text, output_text)",
                              f"{at}.type")
        if not isinstance(part.get(key), str):
            raise bad_request(f"{at}.{key}: must be a string; got {short(part.get(key))}",
                              f"{at}.{key}")
        texts.append(part[key])
    return "".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    if not isinstance(item.get(key), str):
        raise bad_request(f"{where}.{key}: must be a string; got {short(item.get(key))}",
                          f"{where}.{key}")
    return item[key]


def renamed(name: str | None) -> str | None:
    """A chat field's path as this endpoint's (``tools[0].function.name`` ->
    ``tools[0].name``, ``max_tokens`` -> ``max_output_tokens``)."""
    if not name:
        return name
    head, dot, rest = name.partition(".")
    base, bracket, index = head.partition("[")
    if base in CHAT_TO_RESPONSES:
        return CHAT_TO_RESPONSES[base] + (bracket + index if base != "messages" else "") + (
            dot + rest if base == "response_format" and rest else "")
    return name.replace(".function.", ".")


def as_responses_error(err: APIError) -> APIError:
    """An error of the chat path, naming this endpoint's fields."""
    message = err.message
    for chat, ours in CHAT_TO_RESPONSES.items():
        if chat != "messages":
            message = message.replace(chat, ours)
    return APIError(err.status, message, type=err.type, param=renamed(err.param),
                    code=err.code, retry_after_s=err.retry_after_s)


def chat_validation_error(exc: ValidationError) -> APIError:
    """The translated chat body failed validation: a 400 in this endpoint's names."""
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == FIELD_ERROR:
            where, msg = err["ctx"]["field"], err["ctx"]["message"]
        else:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            msg, got = err.get("msg", "").removeprefix("Value error, "), short(err.get("input"))
            msg = msg if got in msg else f"{msg} (got {got})"
        where = renamed(where.lstrip(".")) or "body"
        param = param or where
        parts.append(f"{where}: {msg}")
    return as_responses_error(APIError(400, "; ".join(parts), param=param))
