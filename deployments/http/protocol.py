"""OpenAI request bodies, validated at the edge.

- Unknown fields are refused (a misspelt ``max_token`` must not silently run with the
  default). Fields OpenAI defines that packserve does not implement are accepted only at
  their neutral value, and refused otherwise with a message naming field and value.
- JSON types are strict: a bool is not a number (``max_tokens: true`` is refused, not
  run as 1), a number is not a string, a text part's ``text`` is a string; NaN and
  infinities are refused.
- Text never reaches a tokenizer unless it is valid Unicode: JSON can escape a lone
  surrogate (``"a\\ud800b"``), which decodes to a string no UTF-8 encoder accepts; any
  such string anywhere in the body is refused with its path.
- Ranges are the engine's: ``seed`` fits the sampler's 63 bits, ``top_logprobs`` needs
  ``logprobs`` (as OpenAI requires), ``stream_options`` needs ``stream``.

Errors raised as ``field_error(path, message)`` carry the field's path, which becomes
the OpenAI error's ``param`` (``deployments/http/ingress.py``).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.params import (
    MAX_LOGPROBS,
    InvalidSamplingParamsError,
    SamplingParams,
    Structured,
    parse_logit_bias,
)

MAX_SEED = 2**63 - 1  # the sampler seeds a torch.Generator: a signed 64-bit value
MAX_N = 16  # choices per request (each runs as its own sequence and lease)
FIELD_ERROR = "packserve_field"
_SURROGATE = re.compile("[\ud800-\udfff]")

TokenIds = list[int]


def field_error(path: str, message: str) -> PydanticCustomError:
    """A validation error for ``path`` (reported as the error's ``param``)."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": path, "message": message})


def short(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (bodies can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def find_surrogate(value, path: str = "") -> tuple[str, int, str] | None:
    """(path, index, character) of the first lone surrogate in any string of ``value``."""
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (path, match.start(), match.group()) if match else None
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        found = find_surrogate(item, where.lstrip("."))
        if found:
            return found
    return None


def valid_unicode(data):
    """``data`` if no string in it holds a lone surrogate, else the field's error."""
    found = find_surrogate(data)
    if found:
        path, index, char = found
        raise field_error(path, f"lone surrogate {char!r} at character {index} is not "
                          "valid Unicode text; send UTF-8 text (surrogates only in pairs)")
    return data


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def _one_prompt(value) -> str | TokenIds:
    """``prompt``: a string or token ids; a list holding one of them is unwrapped."""
    if isinstance(value, str) or _is_ids(value):
        return value
    if isinstance(value, list) and all(isinstance(p, str) or _is_ids(p) for p in value):
        if len(value) != 1:
            raise field_error("prompt", f"one prompt per request (n=1); got a list of "
                              f"{len(value)} prompts")
        return value[0]
    raise field_error("prompt", "must be a string, an array of token ids (integers), or a "
                      f"list holding one of those; got {short(value)}")


def _inputs(value) -> list[str] | list[TokenIds]:
    """``input``: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if _is_ids(value) and value:
        return [value]
    if isinstance(value, list) and (all(isinstance(x, str) for x in value)
                                    or all(_is_ids(x) for x in value)):
        return value
    raise field_error("input", "must be a string, a list of strings, an array of token ids "
                      f"(integers), or a list of such arrays; got {short(value)}")


def _invalid(message: str) -> ValueError:
    """A field's error (a ValueError even for a wrong type: pydantic reports only
    ValueErrors and AssertionErrors as validation errors)."""
    return ValueError(message)


def _content(value) -> str:
    """A message's ``content``: a string, null, or a list of text parts, as one string."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise _invalid(f"must be a string or a list of text parts; got {short(value)}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _invalid(f"part {j}: only text parts are supported; got type {kind!r}")
        if set(part) - {"type", "text"}:
            raise ValueError(f"part {j}: unknown field(s) {sorted(set(part) - {'type', 'text'})}")
        if not isinstance(part.get("text"), str):
            raise _invalid(f"part {j}: text must be a string; got {short(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-tracking tag

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        return valid_unicode(data)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = "response"
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the output always follows the schema either way
    description: str | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object)
    or ``json_schema`` (an object valid against ``json_schema.schema``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error("response_format", "response_format.json_schema is required "
                              "with type json_schema, and allowed only with it")
        return self


class _Sampling(_Body):
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension (vLLM's); 0 = off
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # an extension (vLLM's)
    ignore_eos: bool = False  # an extension (vLLM's)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)  # choices: n sequences of the prompt
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias
    repetition_penalty: float = Field(1.0, gt=0)  # an extension (vLLM's); 1 = off
    min_p: float = Field(0.0, ge=0, le=1)  # an extension (vLLM's); 0 = off
    min_tokens: int = Field(0, ge=0)  # an extension (vLLM's): EOS held back until this many
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions (at most one constraint per request):
    guided_json: dict | str | None = None  # a JSON schema (object, or its JSON text)
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None  # a Lark grammar (llguidance's dialect)

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [f for f in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise field_error(given[1], f"send one output constraint; got {', '.join(given)}")
        if isinstance(self.guided_json, str):
            try:
                schema = json.loads(self.guided_json)
            except ValueError as exc:
                raise field_error("guided_json", f"not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise field_error("guided_json", "must be a JSON schema object")
        return self

    def structured(self) -> Structured | None:
        """The request's output constraint for the engine, if any."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return Structured.json(None)
        if fmt is not None and fmt.type == "json_schema":
            return Structured.json(fmt.json_schema.schema_)
        if self.guided_json is not None:
            schema = self.guided_json
            return Structured.json(json.loads(schema) if isinstance(schema, str) else schema)
        if self.guided_regex is not None:
            return Structured("regex", self.guided_regex)
        if self.guided_choice is not None:
            return Structured.choice(self.guided_choice)
        if self.guided_grammar is not None:
            return Structured("lark", self.guided_grammar)
        return None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        """The engine's own check (count, key form, range), before any work."""
        if value:
            try:
                parse_logit_bias(value)
            except InvalidSamplingParamsError as exc:
                raise ValueError(str(exc).removeprefix("SamplingParams.")) from None
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "stream_options is allowed only with "
                              "stream: true")
        return self

    @model_validator(mode="after")
    def _min_tokens_within_max_tokens(self):
        limit = getattr(self, "token_limit", lambda: self.max_tokens)()
        if limit is not None and self.min_tokens > limit:
            raise field_error("min_tokens", f"min_tokens={self.min_tokens} is more than "
                              f"max_tokens={limit}")
        return self

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        choice: int = 0) -> SamplingParams:
        """The engine's parameters for choice ``choice`` of ``n``: its seed is ``seed +
        choice`` (vLLM's rule), so each choice equals a single request with that seed."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p,
            seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            min_tokens=min(self.min_tokens, max_tokens), structured=self.structured())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``echo`` with ``max_tokens: 0`` and ``logprobs`` scores the
    prompt (log p of each prompt token given the ones before it)."""

    prompt: Annotated[str | TokenIds, PlainValidator(
        _one_prompt, json_schema_input_type=str | list[str] | TokenIds | list[TokenIds])]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)  # deprecated by OpenAI; use n


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an earlier assistant turn made (sent back in ``messages``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, PlainValidator(
        _content, json_schema_input_type=str | list[dict] | None)] = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def rendered(self) -> dict:
        """What the chat template sees."""
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128  # OpenAI's limit


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # calls follow the schema either way when constrained

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value):
        if not _FUNCTION_NAME.match(value):
            raise ValueError(f"function names are 1-64 letters, digits, _ or -; got "
                             f"{short(value)}")
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self):
        choice = self.tool_choice
        if choice is None or choice == "none":
            return self
        if not self.tools:
            raise field_error("tool_choice", f"tool_choice={short(self.tool_choice_name())}"
                              " needs tools")
        names = [t.function.name for t in self.tools]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise field_error("tool_choice", f"tool_choice names {choice.function.name!r}, "
                              f"which is not among the tools ({', '.join(names)})")
        if choice != "auto" and self.structured() is not None:
            raise field_error("tool_choice", f"tool_choice={self.tool_choice_name()!r} "
                              "constrains the output; it cannot be combined with "
                              "response_format or guided_* fields")
        return self

    def tool_choice_name(self) -> str:
        """"none", "auto", "required", or the named function's name (tools default to
        auto); ``tool_mode`` tells a function named "auto" from the mode."""
        return self.tool_mode()[1] or self.tool_mode()[0]

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required", None), or ("named", the function's name)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named", choice.function.name
        return choice or ("auto" if self.tools else "none"), None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", f"top_logprobs={self.top_logprobs} needs "
                              "logprobs: true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    input: Annotated[list[str] | list[TokenIds], PlainValidator(
        _inputs, json_schema_input_type=str | list[str] | TokenIds | list[TokenIds])]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's shape): a ``prompt`` as completions encode it, or
    ``messages`` as chat renders them; ``count`` equals the ``usage.prompt_tokens`` that
    endpoint reports for the same input."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True  # messages: open the assistant's turn, as chat does
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise field_error("prompt", "send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    tokens: TokenIds
