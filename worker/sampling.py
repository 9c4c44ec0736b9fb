"""Sampling parameters and the sampler: next tokens from a step's logits.

Greedy rows (``temperature == 0``) are one batched argmax. Every other row is sampled on
its own, with its request's ``torch.Generator``: temperature, then top-k, then top-p,
then one multinomial draw. A request's draws therefore depend only on its seed and its
own logits, never on which other requests share the step (see ``Sampler.sample``).

Logprobs are those of the model's distribution (log-softmax of the raw logits, before
temperature, top-k and top-p), as vLLM reports them by default.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from worker.errors import InvalidRequestError

MAX_LOGPROBS = 20


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
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with probability >= top_p; (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off (negative values are refused)
    seed: int | None = None  # per-request generator seed; None = drawn at random
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); not part of the output
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens, kept in the output like EOS
    ignore_eos: bool = False  # do not stop at the model's EOS token(s)
    logprobs: int | None = None  # None = none; k = the sampled token's logprob and the top k
    skip_special_tokens: bool = True  # for .text only

    def __post_init__(self) -> None:
        _int_at_least("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, lambda t: t >= 0, ">= 0 (0 = greedy)")
        _number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _int_at_least("top_k", self.top_k, 0, "an integer >= 0 (0 = off)")
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidSamplingParamsError("logprobs", f"<= {MAX_LOGPROBS}", self.logprobs)
        object.__setattr__(self, "stop", _strings("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingParamsError(name, "a bool", getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (None for greedy requests, which draw nothing)."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SampledTokens:
    """One step's sampling result, on the host (one device-to-host read)."""

    token_ids: list[int]  # [n]
    logprobs: list[float] | None = None  # [n]: log p(sampled token); None when no row asked
    top_ids: list[list[int]] = field(default_factory=list)  # [n][k_max]
    top_logprobs: list[list[float]] = field(default_factory=list)  # [n][k_max]


class Sampler:
    """Turns logits [n, vocab] into tokens, one row per request that samples this step."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> SampledTokens:
        """``logits`` [n, vocab] float32; ``params``/``generators`` one per row."""
        tokens = logits.argmax(dim=-1)
        for i, p in enumerate(params):  # per sampled row, every step: each has its own generator
            if not p.greedy:
                tokens[i] = _sample_row(logits[i], p, generators[i])
        k_max = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if k_max is None:
            return SampledTokens(tokens.tolist())
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        out = SampledTokens(tokens.tolist(), chosen.tolist())
        if k_max > 0:
            top = logprobs.topk(k_max, dim=-1)
            out.top_ids, out.top_logprobs = top.indices.tolist(), top.values.tolist()
        return out


def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One draw from ``softmax(row / temperature)`` restricted by top-k and top-p.

    Ties at the k-th value are all kept (the set may exceed k by the number of ties).
    """
    x = row.float() / p.temperature
    if 0 < p.top_k < x.shape[0]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        x = _top_p(x, p.top_p)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches ``top_p`` (at least one)."""
    sorted_x, order = torch.sort(x, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[0] = False
    drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))
