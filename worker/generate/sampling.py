"""Sampling parameters and the sampler: next tokens from a step's logits, batched.

Greedy rows (``temperature`` below ``MIN_TEMPERATURE``) are one argmax. The other rows
form one sub-batch: logits / temperature, then top-k (one ``topk`` with the largest k
and a per-row threshold), then top-p (one sort over the rows that use it), then min-p,
then one draw for every row by the exponential race: ``argmax(probs / E)`` with
``E ~ Exp(1)`` iid per token picks token i with probability ``probs[i] / sum(probs)``,
with no cumulative sum and no per-row ``multinomial``.

Where the noise E comes from decides reproducibility. A request with a ``seed`` owns a
``torch.Generator`` (``make_generator``) that fills its row's E and advances only when
that row draws, so its tokens depend on its seed and its own logits, never on its batch
mates or on preemption; this is the one per-row loop (over seeded rows only). Every
unseeded row shares one ``exponential_()`` from torch's default generator on the device.

Per-row parameters live in ``SamplingRows`` (numpy, one row per running sequence), are
gathered by fancy indexing and reach the device in one copy (``_Staging``).

Logprobs are those of the model's distribution (log-softmax of the raw logits, before
temperature, top-k, top-p and min-p), as vLLM reports them by default, computed for the
rows that asked only and read back with the tokens in one transfer
(``worker.generate.logprobs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worker.core.errors import InvalidRequestError
from worker.generate.grammar import Structured
from worker.generate.logprobs import SampledTokens, read_step

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


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator when it has a ``seed``; None for greedy requests (they
    draw nothing) and for unseeded ones (they share the device's default generator)."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


_CLEARED = SamplingParams(temperature=0)


class SamplingRows:
    """The running sequences' sampling parameters, one row each, on the host.

    The engine gives a sequence a row in ``[0, max_num_rows)`` for its lifetime (``set``)
    and frees it when the sequence leaves (``clear``). A step gathers its rows with numpy
    fancy indexing, so no per-step work loops over requests in Python.
    """

    def __init__(self, max_num_rows: int):
        self.temperature = np.zeros(max_num_rows, np.float32)  # [rows]; 0 = greedy
        self.top_k = np.zeros(max_num_rows, np.int64)  # [rows]; 0 = off
        self.top_p = np.ones(max_num_rows, np.float32)  # [rows]; 1 = off
        self.min_p = np.zeros(max_num_rows, np.float32)  # [rows]; 0 = off
        self.logprobs = np.full(max_num_rows, -1, np.int64)  # [rows]; -1 = none, else top k
        self.seeded = np.zeros(max_num_rows, np.bool_)  # [rows]; has its own generator
        self.generators: list[torch.Generator | None] = [None] * max_num_rows  # [rows]
        # Logit processors (worker/generate/logits_process.py); ``processed`` marks the rows that
        # have any, so a step without them costs one numpy ``any``.
        self.processed = np.zeros(max_num_rows, np.bool_)  # [rows]
        self.penalized = np.zeros(max_num_rows, np.bool_)  # [rows]: reads its tokens
        self.presence = np.zeros(max_num_rows, np.float32)  # [rows]
        self.frequency = np.zeros(max_num_rows, np.float32)  # [rows]
        self.repetition = np.ones(max_num_rows, np.float32)  # [rows]
        self.prompt_len = np.zeros(max_num_rows, np.int64)  # [rows]
        self.min_tokens = np.zeros(max_num_rows, np.int64)  # [rows]
        self.suppress: list[np.ndarray | None] = [None] * max_num_rows  # [rows]: EOS and
        #   stop ids masked below min_tokens
        self.bias: list[tuple[np.ndarray, np.ndarray] | None] = [None] * max_num_rows
        #   [rows]: (token ids int64, biases float32)
        self.eos_token_ids = np.empty(0, np.int64)  # the model's, set by the engine
        self.matchers: list = [None] * max_num_rows  # [rows]: a structured row's grammar
        #   matcher (worker/generate/grammar.py), else None

    def set(self, row: int, params: SamplingParams,
            generator: torch.Generator | None = None, prompt_len: int = 0,
            matcher=None) -> None:
        """Give ``row`` to a sequence: its parameters and its generator (``make_generator``'s
        result; None = the device's shared generator). Greedy rows keep no generator.
        ``prompt_len``: where its output starts (penalties and min_tokens read it);
        ``matcher``: its grammar's state when the output is structured."""
        greedy = params.greedy
        self.temperature[row] = 0.0 if greedy else params.temperature
        self.top_k[row], self.top_p[row], self.min_p[row] = params.top_k, params.top_p, params.min_p
        self.logprobs[row] = -1 if params.logprobs is None else params.logprobs
        self.generators[row] = None if greedy else generator
        self.seeded[row] = self.generators[row] is not None
        self.penalized[row] = params.penalized
        self.presence[row], self.frequency[row] = (params.presence_penalty,
                                                   params.frequency_penalty)
        self.repetition[row] = params.repetition_penalty
        self.prompt_len[row], self.min_tokens[row] = prompt_len, params.min_tokens
        self.suppress[row] = (np.union1d(self.eos_token_ids, params.stop_token_ids)
                              .astype(np.int64) if params.min_tokens else None)
        self.bias[row] = (None if not params.logit_bias else
                          (np.array([t for t, _ in params.logit_bias], np.int64),
                           np.array([b for _, b in params.logit_bias], np.float32)))
        self.matchers[row] = matcher
        self.processed[row] = (params.penalized or params.min_tokens > 0
                               or bool(params.logit_bias) or matcher is not None)

    def clear(self, row: int) -> None:
        """Free ``row`` (its sequence finished or was preempted); it reads as greedy."""
        self.set(row, _CLEARED, None)


class Sampler:
    """Turns logits [n, vocab] into tokens, one row per sequence that samples this step.

    Built once per engine: ``device`` is where the logits live; ``max_num_rows``, the
    most rows one step samples (the engine's ``max_num_seqs``), sizes the staging buffer.
    """

    def __init__(self, device: torch.device | str = torch.device("cpu"),
                 max_num_rows: int = 256):
        self.device = torch.device(device)
        self._staging = _Staging(self.device, max_num_rows)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> SampledTokens:
        """``logits`` [n, vocab] float32; ``params``/``generators`` one per row. Builds a
        one-off ``SamplingRows``; the engine's hot path calls ``sample_rows``."""
        state = SamplingRows(len(params))
        for i, (p, g) in enumerate(zip(params, generators, strict=True)):  # one-off state
            state.set(i, p, g)
        return self.sample_rows(logits, state, np.arange(len(params), dtype=np.int64))

    def sample_rows(self, logits: torch.Tensor, state: SamplingRows, rows: np.ndarray,
                    raw: torch.Tensor | None = None) -> SampledTokens:
        """``logits`` [n, vocab] float32 on ``device``; logits row i is ``state`` row
        ``rows[i]`` (``rows`` [n] int64). An all-greedy step draws no noise. ``raw``: the
        logits before logit processors, which logprobs report (default ``logits``)."""
        rows = np.asarray(rows, dtype=np.int64)
        if logits.shape[0] != rows.size:
            raise ValueError(f"{logits.shape[0]} rows of logits for {rows.size} state rows")
        ks = state.logprobs[rows]  # [n]: top k per row, -1 = no logprobs
        asking = np.flatnonzero(ks >= 0)  # [a] positions that want logprobs
        some = asking if 0 < asking.size < rows.size else _NO_INTS  # staged when a subset
        drawing = np.flatnonzero(state.temperature[rows] > 0)  # [m] positions in logits
        if drawing.size == 0:
            tokens = logits.argmax(dim=-1)
            at = self._staging.stage(some)[0] if some.size else None
        else:
            tokens, at = self._draw(logits, state, rows, drawing, some)
        return read_step(logits if raw is None else raw, tokens, ks, asking,
                         at if some.size else None)

    def _draw(self, logits: torch.Tensor, state: SamplingRows, rows: np.ndarray,
              drawing: np.ndarray, asking: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's token [n]: the argmax, replaced at ``drawing`` by one draw from the
        tempered, filtered distribution; and ``asking`` on the device. Parameters reach
        the device in one copy."""
        n, vocab = logits.shape
        own = rows[drawing]  # [m] state rows of the drawing rows
        top_k = np.where(state.top_k[own] < vocab, state.top_k[own], 0)  # k >= vocab: off
        top_p_at = np.flatnonzero(state.top_p[own] < 1)  # [r] positions among the m
        min_p = state.min_p[own]
        use_top_k, use_min_p, subset = bool(top_k.any()), bool(min_p.any()), drawing.size < n
        at, k, p_at, asking_at, temperature, top_p, mp = self._staging.stage(
            drawing if subset else _NO_INTS, top_k if use_top_k else _NO_INTS,
            top_p_at if 0 < top_p_at.size < own.size else _NO_INTS, asking,
            state.temperature[own], state.top_p[own[top_p_at]],
            min_p if use_min_p else _NO_FLOATS)
        x = (logits.index_select(0, at) if subset else logits) / temperature[:, None]
        if use_top_k:
            _top_k(x, k, int(top_k.max()))
        if top_p_at.size:
            _top_p(x, p_at if top_p_at.size < own.size else None, top_p)
        probs = torch.softmax(x, dim=-1)
        if use_min_p:
            _min_p(probs, mp)
        drawn = _race(probs, state, own)
        tokens = logits.argmax(dim=-1).index_copy_(0, at, drawn) if subset else drawn
        return tokens, asking_at


_NO_INTS, _NO_FLOATS = np.empty(0, np.int64), np.empty(0, np.float32)


def _top_k(x: torch.Tensor, k: torch.Tensor, k_max: int) -> None:
    """Mask all but each row's ``k`` [m] largest (0 = off), in place: one ``topk`` with the
    largest k. Ties at the k-th value are all kept (a row may keep more than k)."""
    kth = torch.topk(x, k_max, dim=-1).values.gather(1, (k - 1).clamp_(min=0)[:, None])
    kth.masked_fill_(k[:, None] == 0, float("-inf"))
    x.masked_fill_(x < kth, float("-inf"))


def _top_p(x: torch.Tensor, at: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """Keep each row's most likely tokens until their mass reaches its ``top_p`` (at least
    one), in place: one sort over the rows ``at`` [r] (every row when None)."""
    sub = x if at is None else x.index_select(0, at)
    sorted_x, order = torch.sort(sub, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
    drop_sorted[:, 0] = False
    sub.masked_fill_(torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted), float("-inf"))
    if at is not None:
        x.index_copy_(0, at, sub)


def _min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """Zero, in place, the tokens below ``min_p`` [m] x their row's largest probability."""
    floor = probs.amax(dim=-1, keepdim=True).mul_(min_p[:, None])
    probs.masked_fill_(probs < floor, 0.0)


def _race(probs: torch.Tensor, state: SamplingRows, own: np.ndarray) -> torch.Tensor:
    """One draw per row, ``argmax(probs / E)`` with E ~ Exp(1) iid per token: token i wins
    with probability ``probs[i] / sum(probs)`` (``probs`` need not be normalised)."""
    noise = torch.empty_like(probs)
    seeded = np.flatnonzero(state.seeded[own])
    if seeded.size < own.size:
        noise.exponential_()  # every unseeded row: one draw from the shared generator
    for j in seeded.tolist():  # per seeded row, every step: each has its own generator
        noise[j].exponential_(generator=state.generators[own[j]])
    # exponential_ may return 0 in float32; then a filtered token's 0 / 0 = nan would win.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


class _Staging:
    """A step's per-row parameters, packed into one byte buffer and copied to the device
    once (the device reads dtype views of the copy).

    ==========  =============================================================
    offset      each array (int64 or float32) in turn, 8-byte aligned
    host        uint8, pinned on CUDA (``pin_memory=True`` raises without it)
    dev         uint8 on the device; the host buffer itself on CPU
    ==========  =============================================================

    The host waits for every step's tokens, so the buffer is never refilled while its
    copy is in flight. Sized once; grows (a new buffer) only if a step needs more.
    """

    _DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}
    _BYTES_PER_ROW = 4 * 8 + 3 * 4  # four int64 and three float32 arrays of <= one per row

    def __init__(self, device: torch.device, max_num_rows: int):
        self.device = device
        self._allocate(max_num_rows * self._BYTES_PER_ROW + 8 * 8)

    def _allocate(self, num_bytes: int) -> None:
        cuda = self.device.type == "cuda"
        self.host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=cuda)
        self.dev = (self.host if self.device.type == "cpu"
                    else torch.empty(num_bytes, dtype=torch.uint8, device=self.device))
        self._host_np = self.host.numpy()

    def stage(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Device views of ``arrays``, after one host-to-device copy."""
        offsets, used = [], 0
        for a in arrays:
            offsets.append(used)
            used += -(-a.nbytes // 8) * 8
        if used > self.host.numel():
            self._allocate(2 * used)
        for a, off in zip(arrays, offsets):
            self._host_np[off: off + a.nbytes].view(a.dtype)[:] = a
        if self.dev is not self.host:
            self.dev[:used].copy_(self.host[:used], non_blocking=True)
        return [self.dev[off: off + a.nbytes].view(self._DTYPES[a.dtype])
                for a, off in zip(arrays, offsets)]
