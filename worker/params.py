"""What a request asks of the engine, as plain values: sampling parameters and output
constraints. Torch-free: the HTTP edge validates bodies with these same classes, and
the engine runs them (``worker/generate/sampling.py`` samples, ``grammar.py``
compiles), so a limit is checked in one place and means the same on both sides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from worker.core.errors import InvalidRequestError

_SETTING = "response_format"

# ---- output constraints (structured outputs) --------------------------------------

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True)
class Structured:
    """One output constraint. ``value``: the schema as JSON text (``json_schema``), the
    regex, the choices as a JSON list, or the Lark grammar; "" for ``json_object``."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {KINDS}, got "
                                      f"{self.kind!r}", value=self.kind, setting=_SETTING)

    @classmethod
    def json(cls, schema: dict | None) -> Structured:
        """A JSON schema (dict), or any JSON object when None. Objects that do not say
        otherwise get no properties beyond those listed (``closed``)."""
        if schema is None:
            return cls("json_object")
        return cls("json_schema", json.dumps(closed(schema), sort_keys=True))

    @classmethod
    def choice(cls, options: list[str]) -> Structured:
        return cls("choice", json.dumps(list(options)))


_SUBSCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and says nothing about more: what OpenAI's strict structured outputs
    require and xgrammar's default strict mode assumes. Unconstrained extra keys would let
    a model (a random one always does) run on to ``max_tokens`` inside an object the
    client never asked for. A schema that sets ``additionalProperties`` keeps it."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    return out


# ---- sampling parameters ---------------------------------------------------------

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI allows
MIN_TEMPERATURE = 1e-5  # below it a request is greedy: dividing by it would overflow


class InvalidSamplingParamsError(InvalidRequestError):
    """A ``SamplingParams`` field is out of range; names the field, limit and value."""

    def __init__(self, field_name: str, requirement: str, value):
        super().__init__(f"SamplingParams.{field_name} must be {requirement}, got {value!r}",
                         limit=requirement, value=value, setting=f"SamplingParams.{field_name}")
        self.field = field_name


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. Lists given for ``stop``/``stop_token_ids`` become tuples."""

    max_tokens: int = 16  # generated tokens at most (>= 1)
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with probability >= top_p; (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off (negative values are refused)
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability; [0, 1]
    seed: int | None = None  # own generator seed; None = the device's shared generator
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); not part of the output
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens, kept in the output like EOS
    ignore_eos: bool = False  # do not stop at the model's EOS token(s)
    logprobs: int | None = None  # None = none; k = the sampled token's logprob and the top k
    skip_special_tokens: bool = True  # for .text only
    # Logit processors (worker/generate/logits_process.py), applied before temperature and filters:
    presence_penalty: float = 0.0  # minus this once for each token already generated; [-2, 2]
    frequency_penalty: float = 0.0  # minus this times the count of each generated token; [-2, 2]
    repetition_penalty: float = 1.0  # tokens of the prompt or output: logit / p if > 0, else
    #   x p (HF's and vLLM's rule); 1 = off, > 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit),
    #   at most MAX_LOGIT_BIAS, each in [-100, 100] (OpenAI's limits); a dict is accepted
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many are generated
    structured: Structured | None = None  # the output follows this grammar (worker/generate/grammar.py)

    def __post_init__(self) -> None:
        _int_at_least("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, lambda t: t >= 0, ">= 0 (0 = greedy)")
        _number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _int_at_least("top_k", self.top_k, 0, "an integer >= 0 (0 = off)")
        _number("min_p", self.min_p, lambda p: 0 <= p <= 1, "in [0, 1] (0 = off)")
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidSamplingParamsError("logprobs", f"<= {MAX_LOGPROBS}", self.logprobs)
        object.__setattr__(self, "stop", _strings("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        for name in ("presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2] (0 = off)")
        _number("repetition_penalty", self.repetition_penalty, lambda v: v > 0,
                "> 0 (1 = off)")
        _int_at_least("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError("min_tokens", f"<= max_tokens ({self.max_tokens})",
                                             self.min_tokens)
        object.__setattr__(self, "logit_bias", parse_logit_bias(self.logit_bias))
        if self.structured is not None and not isinstance(self.structured, Structured):
            raise InvalidSamplingParamsError("structured", "a worker.generate.grammar.Structured",
                                             self.structured)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingParamsError(name, "a bool", getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether a penalty reads the tokens so far (worker/generate/logits_process.py)."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1)


def _int_at_least(name: str, value, minimum: int, requirement: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidSamplingParamsError(name, requirement or f"an integer >= {minimum}", value)


def _number(name: str, value, ok, requirement: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not ok(value)):
        raise InvalidSamplingParamsError(name, requirement, value)


def _strings(name: str, value) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        raise InvalidSamplingParamsError(name, "a string or a list of strings", value) from None
    if not all(isinstance(s, str) and s for s in items):
        raise InvalidSamplingParamsError(name, "a list of non-empty strings", value)
    return items


def _token_ids(value) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise InvalidSamplingParamsError("stop_token_ids", "a list of integers", value) from None
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items):
        raise InvalidSamplingParamsError("stop_token_ids", "a list of integers >= 0", value)
    return items


def parse_logit_bias(value) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs; a dict maps ids (ints or their
    strings, as JSON keys are) to biases. The HTTP edge checks bodies with it too."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise InvalidSamplingParamsError("logit_bias", "a dict of token id -> bias, or "
                                         "(token id, bias) pairs", value) from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidSamplingParamsError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries",
                                         f"{len(pairs)} entries")
    out = {}
    for key, bias in pairs:
        token = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidSamplingParamsError("logit_bias", "keyed by token ids (integers >= 0)",
                                             key)
        _number("logit_bias", bias, lambda b: -100 <= b <= 100,
                f"biases in [-100, 100] (token {token})")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


# ---- what a request gets back per token ------------------------------------------

@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one generated token (the model's raw distribution)."""

    logprob: float  # log p(the generated token)
    top: tuple[tuple[int, float], ...]  # [k] (token id, logprob), most likely first
