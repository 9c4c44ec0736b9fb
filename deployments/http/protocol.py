"""OpenAI request bodies, validated at the edge.

- Unknown top-level fields are accepted, ignored and named (vLLM's rule, and what SDKs
  that send their own extras need): ``ignored_fields()`` lists them, with the known
  fields accepted but not acted on (``store``, ``metadata``, ``priority``, ...) when sent
  with a value that would matter; the ingress logs them as one WARNING line and answers
  them in the ``x-packserve-ignored-fields`` header (``ignored_header``). Wrong values
  of known fields (types, ranges) are still 400s. Nested objects stay strict, except the
  fields OpenAI's SDK itself puts on the assistant messages it returns (``refusal``,
  ``audio``, ``annotations``, ``tool_calls[].index``, ...), which are ignored. Fields
  OpenAI defines that packserve cannot honour (``suffix``, ``best_of`` > 1) are accepted
  only at their neutral value, and refused otherwise with a message naming field and value.
- ``null`` means "the default" wherever OpenAI allows it (``temperature: null``, ...);
  ``seed: -1`` means no seed (vLLM's rule).
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
import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from deployments.http.errors import bad_request
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
IGNORED_HEADER = "x-packserve-ignored-fields"
logger = logging.getLogger("ray.serve")
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


def _prompts(value) -> list[str] | list[TokenIds]:
    """``prompt``: a string, token ids, or a list of either (one choice set per prompt)."""
    if isinstance(value, str) or (_is_ids(value) and value):
        return [value]
    if (isinstance(value, list) and value
            and (all(isinstance(p, str) for p in value) or all(_is_ids(p) for p in value))):
        return value
    if value == []:
        raise field_error("prompt", "is empty: send a string, token ids, or a non-empty list "
                          "of either")
    raise field_error("prompt", "must be a string, an array of token ids (integers), or a "
                      f"list of strings or of token-id arrays; got {short(value)}")


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
    """A body whose unknown fields are refused (the classification endpoints')."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-tracking tag

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        return valid_unicode(data)


def _extras(model: BaseModel | None, prefix: str = "") -> set[str]:
    """The unknown fields a model accepted, as paths."""
    return {prefix + name for name in (getattr(model, "model_extra", None) or ())}


class _OpenAIBody(_Body):
    """An OpenAI endpoint's body: unknown top-level fields are accepted, ignored and
    named (``ignored_fields``); ``null`` for a field in ``NULL_MEANS_DEFAULT`` is the
    field's default; a field of ``IGNORED`` is accepted and named when its value is not
    one of the neutral ones (None always is)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    NULL_MEANS_DEFAULT: ClassVar[frozenset[str]] = frozenset()
    IGNORED: ClassVar[dict[str, tuple]] = {"user": ()}

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data):
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in cls.NULL_MEANS_DEFAULT):
            data = {k: v for k, v in data.items()
                    if not (v is None and k in cls.NULL_MEANS_DEFAULT)}
        return data

    def ignored_fields(self) -> list[str]:
        """What this body asked for that has no effect here, sorted: unknown fields
        (nested ones as paths) and accepted-but-ignored ones sent with a value."""
        names = _extras(self)
        for name, neutral in self.IGNORED.items():
            value = getattr(self, name, None)
            if value is not None and value not in neutral:
                names.add(name)
        return sorted(names | self._nested_extras())

    def _nested_extras(self) -> set[str]:
        return set()


def ignored_header(body) -> dict[str, str]:
    """The response header naming ``body``'s ignored fields (empty when none), logged
    as one WARNING line: the request ran, without them."""
    names = body.ignored_fields() if isinstance(body, _OpenAIBody) else []
    if not names:
        return {}
    logger.warning("request for model %r: ignored field(s) %s (accepted, not acted on)",
                   body.model, ", ".join(names))
    return {IGNORED_HEADER: ",".join(names)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # vLLM's extras: ignored, named
    include_usage: bool | None = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = "response"
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the output always follows the schema either way
    description: str | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object,
    or one valid against ``schema`` when given: the form of Together, Anyscale and
    instructor's JSON modes) or ``json_schema`` (an object valid against
    ``json_schema.schema``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error("response_format", "response_format.json_schema is required "
                              "with type json_schema, and allowed only with it")
        if self.schema_ is not None and self.type == "text":
            raise field_error("response_format.schema", "a schema needs type json_object "
                              "or json_schema, not text")
        return self

    def output_schema(self) -> dict | None:
        """The JSON schema the output must follow (None: any JSON object)."""
        if self.json_schema is not None:
            return self.json_schema.schema_
        return self.schema_


class StructuredOutputs(BaseModel):
    """``structured_outputs``: vLLM's form of the ``guided_*`` fields (one of them)."""

    model_config = ConfigDict(extra="allow", strict=True)  # vLLM's backend options: named
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, "json_" if k == "json" else k) not in (None, False)]
        if len(given) > 1:
            raise field_error(f"structured_outputs.{given[1]}", "send one output constraint;"
                              f" got structured_outputs.{', structured_outputs.'.join(given)}")
        return self


def _json_schema_text(value: dict | str, field: str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except ValueError as exc:
        raise field_error(field, f"not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise field_error(field, "must be a JSON schema object")
    return schema


# InvalidSamplingParamsError.field -> the body field a client sent (where they differ)
_ENGINE_TO_CLIENT: dict[str, str] = {}


def _engine_message(exc: InvalidSamplingParamsError) -> str:
    """The engine's message without its class name (``SamplingParams.stop must be``)."""
    return str(exc).removeprefix(f"SamplingParams.{exc.field} ")


class _Sampling(_OpenAIBody):
    NULL_MEANS_DEFAULT = frozenset({
        "temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
        "logprobs", "echo", "parallel_tool_calls", "top_k", "min_p", "repetition_penalty",
        "ignore_eos", "min_tokens", "skip_special_tokens", "include_stop_str_in_output",
        "add_generation_prompt", "continue_final_message"})
    # accepted, not acted on: named when sent with a value other than these
    IGNORED = {"user": (), "store": (False,), "metadata": ({},), "service_tier": (
        "auto", "default"), "reasoning_effort": (), "prompt_cache_key": (),
        "safety_identifier": (), "priority": (0,)}

    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension (vLLM's); 0 (or vLLM's -1) = off
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # -1 (vLLM's "none") is None
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
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None  # a JSON schema (object, or its JSON text)
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None  # a Lark grammar (llguidance's dialect)
    # vLLM's other extensions, honoured:
    skip_special_tokens: bool = True  # the text leaves out special tokens
    include_stop_str_in_output: bool = False  # the stop string that ended it is kept
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the last N; -1: all
    # accepted and ignored (named in the response's header when they would matter):
    priority: int | None = None  # vLLM's priority scheduling: packserve has none
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no key
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _seed_minus_one_is_none(cls, data):
        if isinstance(data, dict) and type(data.get("seed")) is int and data["seed"] == -1:
            data = {**data, "seed": None}
        if isinstance(data, dict) and type(data.get("top_k")) is int and data["top_k"] == -1:
            data = {**data, "top_k": 0}
        return data

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_not_zero(cls, value):
        if value == 0:
            raise ValueError("must be >= 1 (keep the last N prompt tokens) or -1 (keep all)")
        return value

    def _nested_extras(self) -> set[str]:
        return _extras(self.stream_options, "stream_options.") | _extras(
            self.structured_outputs, "structured_outputs.")

    def _constraints(self) -> list[str]:
        given = [f for f in ("structured_outputs", "guided_json", "guided_regex",
                             "guided_choice", "guided_grammar") if getattr(self, f) is not None]
        if self.structured_outputs is not None and not any(
                getattr(self.structured_outputs, k) not in (None, False)
                for k in ("json_", "regex", "choice", "grammar", "json_object")):
            given.remove("structured_outputs")  # {} or only backend options: no constraint
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    @model_validator(mode="after")
    def _one_constraint(self):
        given = self._constraints()
        if len(given) > 1:
            raise field_error(given[1], f"send one output constraint; got {', '.join(given)}")
        if isinstance(self.guided_json, str):
            _json_schema_text(self.guided_json, "guided_json")
        so = self.structured_outputs
        if so is not None and isinstance(so.json_, str):
            _json_schema_text(so.json_, "structured_outputs.json")
        return self

    def structured(self) -> Structured | None:
        """The request's output constraint for the engine, if any."""
        fmt = self.response_format
        if fmt is not None and fmt.type in ("json_object", "json_schema"):
            return Structured.json(fmt.output_schema())
        so = self.structured_outputs
        guided_json = self.guided_json if so is None or so.json_ is None else so.json_
        if guided_json is not None:
            return Structured.json(_json_schema_text(guided_json, "guided_json"))
        regex = self.guided_regex if so is None or so.regex is None else so.regex
        if regex is not None:
            return Structured("regex", regex)
        choice = self.guided_choice if so is None or so.choice is None else so.choice
        if choice is not None:
            return Structured.choice(choice)
        grammar = self.guided_grammar if so is None or so.grammar is None else so.grammar
        if grammar is not None:
            return Structured("lark", grammar)
        if so is not None and so.json_object:
            return Structured.json(None)
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

    @model_validator(mode="after")
    def _engine_accepts(self):
        """The engine's checks of what the body leaves to it (``stop: ""``,
        ``stop_token_ids: [-1]``), at the edge: a 400 naming the client's field."""
        try:  # the values as sent, so that the message quotes them
            SamplingParams(stop=() if self.stop is None else self.stop,
                           stop_token_ids=self.stop_token_ids or ())
        except InvalidSamplingParamsError as exc:
            raise field_error(self.client_field(exc.field), _engine_message(exc)) from None
        return self

    def client_field(self, engine_field: str) -> str:
        """The body's field that an engine parameter (``SamplingParams.<field>``) came
        from: what an error's ``param`` names."""
        if engine_field == "max_tokens":
            return ("max_completion_tokens" if getattr(self, "max_completion_tokens", None)
                    else "max_tokens")
        if engine_field == "logprobs" and hasattr(self, "top_logprobs"):
            return "top_logprobs"
        if engine_field == "structured":
            return "response_format"
        return _ENGINE_TO_CLIENT.get(engine_field, engine_field)

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        choice: int = 0) -> SamplingParams:
        """The engine's parameters for choice ``choice`` of ``n``: its seed is ``seed +
        choice`` (vLLM's rule), so each choice equals a single request with that seed.
        An engine refusal is a 400 naming the body's field, never ``SamplingParams.*``."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                top_k=self.top_k, min_p=self.min_p,
                seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
                stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
                min_tokens=min(self.min_tokens, max_tokens), structured=self.structured())
        except InvalidSamplingParamsError as exc:
            field = self.client_field(exc.field)
            raise bad_request(f"{field}: {_engine_message(exc)}", param=field) from None

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's ids after ``truncate_prompt_tokens`` (the last N kept; -1: as
        many as the context holds)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        k = max_model_len if k == -1 else k
        return ids[-k:] if len(ids) > k else ids

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``echo`` with ``max_tokens: 0`` and ``logprobs`` scores the
    prompt (log p of each prompt token given the ones before it). ``prompt`` may be a
    list: ``n`` choices per prompt, choice ``index`` = prompt index x n + i (OpenAI's)."""

    prompt: Annotated[list[str] | list[TokenIds], PlainValidator(
        _prompts, json_schema_input_type=str | list[str] | TokenIds | list[TokenIds])]
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
    index: int | None = None  # a streamed call's position (SDKs send it back): ignored


class ChatMessage(BaseModel):
    """One message. Other unknown fields are refused, but not those that OpenAI's SDK
    (``model_dump()`` of the assistant message it returned), litellm and langchain send
    back on assistant turns: they are ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, PlainValidator(
        _content, json_schema_input_type=str | list[dict] | None)] = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool's result: the call it answers
    # what SDKs send back on assistant messages, ignored:
    refusal: Any = None
    audio: Any = None
    function_call: Any = None
    annotations: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    provider_specific_fields: Any = None  # litellm's
    thinking_blocks: Any = None  # litellm's

    def rendered(self) -> dict:
        """What the chat template sees."""
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude={"index"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


# keyword arguments of apply_chat_template that chat_template_kwargs may not set
TEMPLATE_RESERVED = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
    "return_assistant_tokens_mask", "padding", "truncation", "max_length",
    "tokenizer_kwargs", "add_special_tokens"})
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


class _ChatTemplate(BaseModel):
    """vLLM's chat-template options (chat and /tokenize)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    chat_template_kwargs: dict | None = None  # passed to the template (enable_thinking, ...)
    add_generation_prompt: bool = True  # open the assistant's turn
    continue_final_message: bool = False  # continue the last (assistant) message instead

    @model_validator(mode="after")
    def _template_options(self):
        if self.continue_final_message and self.add_generation_prompt and (
                "add_generation_prompt" in self.model_fields_set):
            raise field_error("continue_final_message", "continue_final_message and "
                              "add_generation_prompt cannot both be true")
        reserved = sorted(set(self.chat_template_kwargs or ()) & TEMPLATE_RESERVED)
        if reserved:
            raise field_error(f"chat_template_kwargs.{reserved[0]}", "is set by the server "
                              "(send it as a top-level field, if at all)")
        return self

    def template_options(self) -> dict:
        """``ModelTokenizer.chat``'s keyword arguments for this body's template options."""
        return {"add_generation_prompt": self.add_generation_prompt
                and not self.continue_final_message,
                "continue_final_message": self.continue_final_message,
                "template_kwargs": self.chat_template_kwargs}


class ChatCompletionRequest(_Sampling, _ChatTemplate):
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
    def _tool_results_name_their_call(self):
        for i, m in enumerate(self.messages):
            if m.role == "tool" and m.tool_call_id is None:
                raise field_error(f"messages[{i}].tool_call_id", "a tool message needs the "
                                  "tool_call_id of the call it answers")
        return self

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


class EmbeddingRequest(_OpenAIBody):
    """POST /v1/embeddings."""

    NULL_MEANS_DEFAULT = frozenset({"encoding_format"})

    input: Annotated[list[str] | list[TokenIds], PlainValidator(
        _inputs, json_schema_input_type=str | list[str] | TokenIds | list[TokenIds])]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class TokenizeRequest(_OpenAIBody, _ChatTemplate):
    """POST /tokenize (vLLM's shape): a ``prompt`` as completions encode it, or
    ``messages`` (and ``tools``) as chat renders them, with chat's template options;
    ``count`` equals the ``usage.prompt_tokens`` that endpoint reports for the same
    input."""

    NULL_MEANS_DEFAULT = frozenset({"add_generation_prompt", "continue_final_message",
                                    "return_token_strs"})

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise field_error("prompt", "send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_OpenAIBody):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    tokens: TokenIds


class LoadLoRARequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's shape; ``base_model_name`` picks the model when
    several serve adapters)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_path: str
    base_model_name: str | None = None


class UnloadLoRARequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's shape; ``lora_int_id`` is accepted, unused)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_int_id: int | None = None
