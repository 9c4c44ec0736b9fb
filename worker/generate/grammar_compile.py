"""Compiling output constraints: bounded in size and time, never on the step loop.

A constraint (``worker.params.Structured``) compiles once per engine into a *prototype*
llguidance ``LLMatcher``; each sequence gets a deep copy (microseconds: the copies share
the compiled lexer, so even their first mask is cheap). A compile runs on a small thread
pool (``engine.max_num_grammar_threads``): llguidance drops the GIL while it
builds a matcher and while it computes a mask (measured: a 20,000-option compile of about
1 s on a thread left a busy Python loop on the main thread running, its longest pause
12 ms, the same as with an idle thread), so neither the event loop nor the step loop
waits for it. What a compile does, in order, each step able to refuse the constraint
with an ``InvalidRequestError`` (a 400 at the HTTP edge):

1. size, before anything is queued: the text over ``max_grammar_bytes``;
2. shape: more options than ``max_grammar_choices``, an object schema listing more properties
   than ``max_grammar_object_properties``;
3. llguidance's compile (``LLMatcher``), under ``LLParserLimits`` whose
   ``max_items_in_row`` fits those limits (llguidance's default, 2,000 Earley items in
   a row, ends a 500-optional-property object or a 2,000-option choice after its first
   token; 4 items per optional property, 1 per option);
4. the first mask (warms the prototype, and finds a language with no output at all:
   ``[^\\x00-\\U0010FFFF]``, a ``$ref`` to itself), then the forced tokens from the start
   and the mask after them (finds a forced dead end: an object that must contain
   itself);
5. time: a compile still running ``grammar_compile_timeout_s`` after it started fails (its
   thread runs on; the size limits bound how long).

Results, refusals included, are cached by constraint (LRU, ``CACHE_SIZE``), so the edge's
``Grammars.check`` and the engine share one compile.

Measured on the 2-vCPU CI machine (llguidance 1.9.1; 4,096- and 128,000-token byte-level
BPE vocabularies, nearly the same): compile + first mask, worst mask of a random walk:

==========================  ================  ====================  =============
constraint                  bytes             compile + 1st mask    worst mask
==========================  ================  ====================  =============
1,000 choices               16 KB             7-11 ms               0.3 ms
10,000 choices              165 KB            160-180 ms            0.6 ms
50,000 choices              823 KB            2.4-2.7 s             0.7-1.5 ms
1,000 optional properties   30 KB             80-93 ms              0.8-4.5 ms
2,000 optional properties   61 KB             270-360 ms            1.4-15 ms
5,000 optional properties   154 KB            1.6-3.0 s             3-84 ms
5,000 required properties   218 KB            240-330 ms            0.4 ms
==========================  ================  ====================  =============
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from worker.core.config import GrammarLimits
from worker.core.errors import InvalidRequestError

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled constraints (and refusals) kept per engine
_SETTING = "response_format"


def over_limit(what: str, value, limits: GrammarLimits, name: str) -> InvalidRequestError:
    limit = getattr(limits, name)
    return InvalidRequestError(
        f"the constraint {what} {value}, more than {name}={limit}; "
        f"simplify it, or raise engine.{name}", limit=limit, value=value,
        setting=f"engine.{name}")


def check_size(structured, limits: GrammarLimits) -> None:
    """Refuse a constraint whose text is over ``max_grammar_bytes`` (O(1) for ASCII)."""
    n = len(structured.value)
    if n <= limits.max_grammar_bytes // 4:  # even at 4 bytes a character
        return
    size = n if n > limits.max_grammar_bytes else len(structured.value.encode())
    if size > limits.max_grammar_bytes:
        raise over_limit("text has", f"{'at least ' if size == n else ''}{size} bytes",
                         limits, "max_grammar_bytes")


def check_shape(structured, limits: GrammarLimits) -> None:
    """Refuse too many choices, or an object schema listing too many properties."""
    if structured.kind == "choice":
        n = len(json.loads(structured.value))
        if n > limits.max_grammar_choices:
            raise over_limit("has", f"{n} options", limits, "max_grammar_choices")
    elif structured.kind == "json_schema":
        n = max_properties(json.loads(structured.value))
        if n > limits.max_grammar_object_properties:
            raise over_limit("has an object with", f"{n} properties", limits,
                             "max_grammar_object_properties")


def max_properties(schema) -> int:
    """The most properties any object schema in ``schema`` lists (iterative: a deeply
    nested schema must not hit the recursion limit)."""
    most, stack = 0, [schema]
    while stack:  # once per node of the schema
        node = stack.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                most = max(most, len(props))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return most


def grammar_text(lib, structured) -> str:
    """llguidance's grammar for ``structured`` (cheap: a translation, no compile)."""
    kind, value = structured.kind, structured.value
    if kind in ("json_schema", "json_object"):
        schema = json.loads(value) if kind == "json_schema" else {"type": "object"}
        return lib.LLMatcher.grammar_from_json_schema(schema,
                                                      defaults={"whitespace_flexible": False})
    if kind == "regex":
        return lib.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        return lib.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o) for o in json.loads(value)))
    return lib.LLMatcher.grammar_from_lark(value)


def reason(matcher) -> str:
    """llguidance's error, on one line (its non-verbose marker dropped)."""
    text = matcher.get_error().replace("<non-verbose/>", "")
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())[:500]


def build(lib, lltok, structured, limits: GrammarLimits):
    """The warmed prototype matcher of ``structured`` (steps 2-4 of the module
    docstring); raises ``InvalidRequestError``."""
    kind = structured.kind
    try:
        check_shape(structured, limits)
        grammar = grammar_text(lib, structured)
    except InvalidRequestError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:  # not JSON, not a JSON object
        raise InvalidRequestError(f"the {kind} constraint does not compile: "
                                  f"{exc}", setting=_SETTING) from None
    parser = lib.LLParserLimits(max_items_in_row=limits.max_items_in_row, verbose_errors=False)
    matcher = lib.LLMatcher(lltok, grammar, log_level=0, limits=parser)
    if matcher.is_error():
        raise InvalidRequestError(f"the {kind} constraint does not compile: "
                                  f"{reason(matcher)}", setting=_SETTING)
    matcher.compute_bitmask()
    probe = matcher
    if not matcher.is_error():
        probe = matcher.deep_copy()
        forced = probe.compute_ff_tokens()
        if not forced or probe.consume_tokens(forced):
            probe.compute_bitmask()
    if probe.is_error():
        raise InvalidRequestError(f"the {kind} constraint can never be "
                                  f"satisfied: {reason(probe)}", setting=_SETTING)
    return matcher


class Compiled:
    """One constraint's compile, in flight or done, shared by every request for it."""

    def __init__(self, structured):
        self.structured = structured
        self.future: Future = Future()  # -> the prototype LLMatcher, or InvalidRequestError
        self.seconds: float | None = None  # how long the compile ran, once it ended
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self.future.done()

    def add_done_callback(self, fn) -> None:
        """``fn(self)`` once done, on the thread that finished it (now if done)."""
        self.future.add_done_callback(lambda _: fn(self))

    def matcher(self):
        """A fresh matcher for one sequence; raises the compile's ``InvalidRequestError``.
        Call once ``done()``."""
        return self.future.result(timeout=0).deep_copy()

    def wait(self):
        """``matcher()`` once done (the compile's own deadline bounds the wait)."""
        self.future.result()
        return self.matcher()

    def settle(self, result=None, error: BaseException | None = None) -> bool:
        """Set the outcome unless already set (by the deadline); True if this did."""
        with self._lock:
            if self.future.done():
                return False
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
            return True


class GrammarCompiler:
    """The compile pool and cache of one engine (or of the HTTP edge's checks)."""

    def __init__(self, load, limits: GrammarLimits):
        self._load = load  # () -> (llguidance, LLTokenizer); raises InvalidRequestError
        self.limits = limits
        self._cache: OrderedDict = OrderedDict()  # Structured -> Compiled, least recent first
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def start(self, structured) -> Compiled:
        """The (cached) compile of ``structured``, queued if new; never blocks on one.
        Raises ``InvalidRequestError`` at once when the text is too large."""
        check_size(structured, self.limits)  # first: hashing a huge text is not O(1)
        with self._lock:
            job = self._cache.get(structured)
            if job is not None:
                self._cache.move_to_end(structured)
            else:
                job = self._cache[structured] = Compiled(structured)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.limits.max_num_grammar_threads,
                                                    thread_name_prefix="packserve-compile")
                self._pool.submit(self._run, job)
            return job

    def _run(self, job: Compiled) -> None:
        start = time.monotonic()
        timer = threading.Timer(self.limits.grammar_compile_timeout_s, self._expire, (job,))
        timer.daemon = True
        timer.start()
        try:
            lib, lltok = self._load()
            result, error = build(lib, lltok, job.structured, self.limits), None
        except InvalidRequestError as exc:
            result, error = None, exc
        except Exception as exc:
            logger.exception("compiling a %s constraint failed", job.structured.kind)
            result, error = None, InvalidRequestError(
                f"the {job.structured.kind} constraint could not be "
                f"compiled: {exc!r}", setting=_SETTING)
        finally:
            timer.cancel()
        job.seconds = time.monotonic() - start
        if not job.settle(result, error):
            logger.warning("a %s constraint compiled in %.2f s, after its %.2f s budget "
                           "(grammar_compile_timeout_s) had refused it", job.structured.kind,
                           job.seconds, self.limits.grammar_compile_timeout_s)

    def _expire(self, job: Compiled) -> None:
        limit = self.limits.grammar_compile_timeout_s
        job.settle(error=InvalidRequestError(
            f"the {job.structured.kind} constraint took more than "
            f"grammar_compile_timeout_s={limit} s to compile; simplify it, or raise "
            "engine.grammar_compile_timeout_s", limit=limit, value=f"> {limit} s",
            setting="engine.grammar_compile_timeout_s"))
