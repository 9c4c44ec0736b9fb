"""POST /v1/responses: OpenAI's Responses API, stateless, on the chat path.

``create`` translates the body into a chat request
(``ResponsesRequest.to_chat``, deployments/http/responses_protocol.py) and runs
``OpenAIService.chat``: the same tokenizing, limits, admission, grammar (tools,
``text.format``) and engine as /v1/chat/completions. Its answer is reshaped:

- not streamed: the chat body becomes a ``Response`` (``output``: a ``message`` item with
  one ``output_text`` part, and/or one ``function_call`` item per tool call);
- streamed: the chat's SSE chunks are re-emitted as Responses events, each with its
  ``sequence_number``: ``response.created``, ``response.in_progress``; per item
  ``response.output_item.added``, then for a message ``response.content_part.added``,
  ``response.output_text.delta``..., ``response.output_text.done``,
  ``response.content_part.done`` (for a call ``response.function_call_arguments.delta``
  and ``.done``), ``response.output_item.done``; last ``response.completed`` (or
  ``response.incomplete`` when cut by ``max_output_tokens``). An error after the stream
  started is an ``error`` event followed by ``response.failed``.

Nothing is stored: ``previous_response_id`` is refused (responses_protocol.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from deployments.http.errors import APIError
from deployments.http.request_timer import UNTIMED, RequestTimer
from deployments.http.responses_protocol import ResponsesRequest, as_responses_error

logger = logging.getLogger("ray.serve")


async def create(service, body: ResponsesRequest, timer: RequestTimer = UNTIMED):
    """The ``Response`` dict, or an async iterator of SSE strings when ``body.stream``.
    Errors before the answer starts are ``APIError`` s naming this body's fields."""
    chat = body.to_chat()
    try:
        result = await service.chat(chat, timer)
    except APIError as err:
        raise as_responses_error(err) from None
    if body.stream:
        return events(body, result)
    return complete(body, result)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def skeleton(req: ResponsesRequest, created: int) -> dict:
    """The ``Response`` before any output: the request's settings echoed."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {"id": _id("resp"), "object": "response", "created_at": created,
            "status": "in_progress", "model": req.model, "output": [], "error": None,
            "incomplete_details": None, "instructions": req.instructions,
            "metadata": req.metadata, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": None, "background": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "text": {"format": fmt},
            "tool_choice": req.tool_choice or "auto", "tools": req.function_tools(),
            "truncation": "disabled", "usage": None, "user": req.user}


def usage_of(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def message_item(text: str, status: str, item_id: str | None = None) -> dict:
    content = [] if status == "in_progress" else [_part(text)]
    return {"type": "message", "id": item_id or _id("msg"), "role": "assistant",
            "status": status, "content": content}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: dict, status: str = "completed", item_id: str | None = None) -> dict:
    """A chat tool call as a ``function_call`` item (``call_id`` is the chat call's id)."""
    fn = call["function"]
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call["id"],
            "name": fn["name"], "arguments": fn["arguments"] if status != "in_progress"
            else "", "status": status}


def finish(resp: dict, output: list[dict], finish_reason: str | None,
           chat_usage: dict | None) -> dict:
    """``resp`` completed, or incomplete when the output was cut by its token limit."""
    cut = finish_reason == "length"
    resp.update(output=output, usage=usage_of(chat_usage),
                status="incomplete" if cut else "completed",
                incomplete_details={"reason": "max_output_tokens"} if cut else None)
    return resp


def complete(req: ResponsesRequest, chat: dict) -> dict:
    """The ``Response`` of a whole chat completion (one choice)."""
    choice = chat["choices"][0]
    message, reason = choice["message"], choice["finish_reason"]
    calls = message.get("tool_calls") or []
    status = "incomplete" if reason == "length" else "completed"
    output = [message_item(message.get("content") or "", status)] if (
        message.get("content") or not calls) else []
    output += [call_item(c) for c in calls]
    return finish(skeleton(req, chat["created"]), output, reason, chat.get("usage"))


class _Events:
    """The Responses events of one streamed answer, built from its chat chunks."""

    def __init__(self, req: ResponsesRequest, created: int):
        self.resp = skeleton(req, created)
        self.seq = 0
        self.output: list[dict] = []
        self.message: dict | None = None  # the open message item
        self.texts: list[str] = []
        self.reason: str | None = None
        self.usage: dict | None = None

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def start(self) -> list[str]:
        return [self.event(k, response=dict(self.resp))
                for k in ("response.created", "response.in_progress")]

    def _open_message(self) -> list[str]:
        self.message = message_item("", "in_progress")
        at = {"item_id": self.message["id"], "output_index": len(self.output)}
        return [self.event("response.output_item.added", output_index=len(self.output),
                           item=dict(self.message)),
                self.event("response.content_part.added", **at, content_index=0,
                           part=_part(""))]

    def choice(self, choice: dict) -> list[str]:
        out, text = [], (choice.get("delta") or {}).get("content")
        if text:
            if self.message is None:
                out += self._open_message()
            self.texts.append(text)
            out.append(self.event("response.output_text.delta", item_id=self.message["id"],
                                  output_index=len(self.output), content_index=0,
                                  delta=text, logprobs=[]))
        if choice.get("finish_reason") is not None:
            self.reason = choice["finish_reason"]
            calls = (choice.get("delta") or {}).get("tool_calls") or []
            if self.message is None and not calls:
                out += self._open_message()  # an empty answer is still a message
            if self.message is not None:
                out += self._close_message()
            for call in calls:
                out += self._call(call)
        return out

    def _close_message(self) -> list[str]:
        text, index = "".join(self.texts), len(self.output)
        status = "incomplete" if self.reason == "length" else "completed"
        item = message_item(text, status, self.message["id"])
        at = {"item_id": item["id"], "output_index": index, "content_index": 0}
        self.output.append(item)
        self.message = None
        return [self.event("response.output_text.done", **at, text=text, logprobs=[]),
                self.event("response.content_part.done", **at, part=_part(text)),
                self.event("response.output_item.done", output_index=index, item=item)]

    def _call(self, call: dict) -> list[str]:
        index, item_id = len(self.output), _id("fc")
        item = call_item(call, item_id=item_id)
        at = {"item_id": item_id, "output_index": index}
        self.output.append(item)
        return [self.event("response.output_item.added", output_index=index,
                           item=call_item(call, "in_progress", item_id)),
                self.event("response.function_call_arguments.delta", **at,
                           delta=item["arguments"]),
                self.event("response.function_call_arguments.done", **at,
                           arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def end(self) -> list[str]:
        if self.message is not None:  # the chat stream ended without a finish
            out = self._close_message()
        else:
            out = []
        resp = finish(self.resp, self.output, self.reason, self.usage)
        kind = "response.incomplete" if resp["status"] == "incomplete" else "response.completed"
        return out + [self.event(kind, response=resp)]

    def fail(self, error: dict) -> list[str]:
        """An error after the stream started: an ``error`` event, then ``response.failed``."""
        self.resp.update(status="failed", output=self.output, usage=usage_of(self.usage),
                         error={"code": _failure_code(error), "message": error["message"]})
        return [self.event("error", code=error.get("code") or error.get("type"),
                           message=error["message"], param=error.get("param")),
                self.event("response.failed", response=self.resp)]


def _failure_code(error: dict) -> str:
    kind = error.get("type")
    if kind == "rate_limit_error":
        return "rate_limit_exceeded"
    return "invalid_prompt" if kind == "invalid_request_error" else "server_error"


async def events(req: ResponsesRequest, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The Responses SSE body made of a chat stream's chunks (``data: {...}`` strings).
    Closing it closes the chat stream (cancelling the generation, releasing its lease)."""
    state = _Events(req, int(time.time()))
    try:
        for event in state.start():
            yield event
        async for raw in chunks:
            payload = raw.removeprefix("data: ").strip()
            if payload == "[DONE]":
                break
            data = json.loads(payload)
            if "error" in data:
                logger.warning("responses stream %s failed: %s", state.resp["id"],
                               data["error"].get("message"))
                for event in state.fail(data["error"]):
                    yield event
                return
            if data.get("usage"):
                state.usage = data["usage"]
            for choice in data.get("choices") or ():
                for event in state.choice(choice):
                    yield event
        for event in state.end():
            yield event
    finally:
        await chunks.aclose()
