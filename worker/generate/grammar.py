"""Structured outputs: a grammar per request, a token mask per step (llguidance).

A request's ``SamplingParams.structured`` names a constraint (``Structured``: a JSON
schema, any JSON object, a regex, a choice of strings, or a Lark grammar). The engine
compiles it once per distinct constraint (cached) and gives the sequence its own matcher
(``Grammars.matcher``). Each step, for the rows that have one:

1. before the forward, every constrained row's allowed tokens start being computed on a
   thread of their own (``fill_async``: one ``LLExecutor`` call for all rows, into a
   bitmask [rows, ceil(vocab / 32)] int32), so the host computes them while the CPU or
   the GPU runs the forward;
2. after the forward, the mask sets the disallowed logits to -inf (``apply_bitmask``:
   unpacked by numpy on CPU; on a GPU copied packed and unpacked there by a shift and an
   and per 32 tokens; no Python loop over rows);
3. once the token is sampled, the row's matcher consumes it (``advance``); a matcher
   that reaches the end of its grammar finishes the sequence with "stop".

Rows without a constraint are untouched and cost nothing. A constraint that does not
compile is an ``InvalidRequestError`` naming ``response_format`` and llguidance's reason,
raised when the request is submitted. Why llguidance over xgrammar and outlines-core:
docs/decisions.md ("Structured outputs use llguidance").

llguidance is imported on first use: an engine without it serves everything else, and a
constrained request then gets an error naming the missing package.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from worker.core.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
_SETTING = "response_format"


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


class Grammars:
    """One engine's grammar compiler: its tokenizer as llguidance sees it, compiled
    grammars cached by constraint, and the parallel executor for masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lib = None
        self._lltok = None
        self._executor = None
        self._mask: torch.Tensor | None = None  # [rows, words] int32, host (pinned on CUDA)
        self._loading = threading.Lock()  # the ingress checks from several threads
        self._thread: ThreadPoolExecutor | None = None  # computes masks during forwards
        self._compile = functools.lru_cache(maxsize=256)(self._compile_uncached)

    @property
    def words(self) -> int:
        return (self.vocab_size + 31) // 32

    def check(self, structured: Structured) -> None:
        """Raise ``InvalidRequestError`` if ``structured`` does not compile (cached)."""
        self._compile(structured)

    def matcher(self, structured: Structured):
        """A fresh matcher for one sequence (raises ``InvalidRequestError`` if the
        constraint does not compile)."""
        lib = self._load()
        matcher = lib.LLMatcher(self._lltok, self._compile(structured), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"response_format: the {structured.kind} constraint does not compile: "
                                      f"{matcher.get_error()}", setting=_SETTING)
        return matcher

    def _load(self):
        with self._loading:
            return self._lib or self._load_locked()

    def _load_locked(self):
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise InvalidRequestError(
                f"structured outputs need the llguidance package, which this engine cannot "
                f"import ({exc}); pip install llguidance", setting=_SETTING) from None
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            raise InvalidRequestError("structured outputs need the model's fast (Rust) "
                                      "tokenizer, and this model has none", setting=_SETTING)
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                   eos_token=eos)
        self._executor = llguidance.LLExecutor(num_threads=mask_threads())
        self._lib = llguidance
        return llguidance

    def _compile_uncached(self, structured: Structured) -> str:
        lib = self._load()
        kind, value = structured.kind, structured.value
        try:
            if kind in ("json_schema", "json_object"):
                schema = json.loads(value) if kind == "json_schema" else {"type": "object"}
                grammar = lib.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False})
            elif kind == "regex":
                grammar = lib.LLMatcher.grammar_from_regex(value)
            elif kind == "choice":
                options = json.loads(value)
                grammar = lib.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(o) for o in options))
            else:
                grammar = lib.LLMatcher.grammar_from_lark(value)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InvalidRequestError(f"response_format: the {kind} constraint does not compile: {exc}",
                                      setting=_SETTING) from None
        message = lib.LLMatcher.validate_grammar(grammar, self._lltok)
        if message and not message.startswith("WARNING"):
            raise InvalidRequestError(f"response_format: the {kind} constraint does not compile: {message}",
                                      setting=_SETTING)
        return grammar

    def fill_async(self, matchers: list) -> Future:
        """``fill`` on the grammar thread (one: a step's masks are done before the next
        step's start, so they share one buffer)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="packserve-grammar")
        return self._thread.submit(self.fill, matchers)

    def fill(self, matchers: list) -> torch.Tensor:
        """The allowed-token bitmask of each matcher -> [len(matchers), words] int32 on
        the host, in one parallel call."""
        n = len(matchers)
        if self._mask is None or self._mask.shape[0] < n:
            self._mask = torch.empty((max(n, 8), self.words), dtype=torch.int32,
                                     pin_memory=torch.cuda.is_available())
        mask = self._mask[:n]
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                               mask.data_ptr(), self.words * 4, n)
        return mask


def mask_threads() -> int:
    """Threads for the masks: half the cores, at most 16. Masks of a 64-row step take
    tens of microseconds each; more threads than that mostly add hand-offs, and the
    other half of the cores run torch (the forward on CPU, kernel launches on GPU)."""
    return max(1, min(16, (os.cpu_count() or 2) // 2))


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, at: torch.Tensor, mask: torch.Tensor) -> None:
    """Set, in place, ``logits[at[i], t] = -inf`` for every token t whose bit is 0 in
    ``mask[i]`` ([len(at), words] int32 on the host). On CPU numpy unpacks the bits; on
    a GPU the packed mask is copied (1/32 of the logits' size) and unpacked there."""
    device, vocab, n = logits.device, logits.shape[1], at.shape[0]
    if device.type == "cpu":
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")
        banned = torch.from_numpy(bits[:, :vocab]) == 0
    else:
        shifts = _SHIFTS.get(device)
        if shifts is None:
            shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
        packed = mask.to(device, non_blocking=True)
        banned = ((packed[:, :, None] >> shifts) & 1).reshape(n, -1)[:, :vocab] == 0
    if n == logits.shape[0]:  # every row constrained (at is 0..n-1, in order)
        logits.masked_fill_(banned, float("-inf"))
    else:
        logits.index_copy_(0, at, logits.index_select(0, at).masked_fill_(banned,
                                                                          float("-inf")))


def advance(matcher, token: int) -> bool:
    """The matcher consumes ``token``; True when its grammar is complete (the sequence
    must stop) or the token was refused (it cannot continue)."""
    if not matcher.consume_token(token):
        return True
    return matcher.is_stopped()


def allowed_tokens(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    """The token ids a bitmask row allows (tests and debugging)."""
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)
