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

import numpy as np
import torch

from worker.generate.logprobs import SampledTokens, read_step
from worker.params import (  # noqa: F401 - re-exported: the sampler's own names
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MIN_TEMPERATURE,
    InvalidSamplingParamsError,
    SamplingParams,
    parse_logit_bias,
)


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
        subset = drawing.size < n
        arrays = _filter_arrays(state, own, vocab)
        at, asking_at, *params = self._staging.stage(drawing if subset else _NO_INTS, asking,
                                                     *arrays)
        probs = _filtered(logits.index_select(0, at) if subset else logits, _k_max(arrays),
                          *params)
        drawn = _race(probs, state, own)
        tokens = logits.argmax(dim=-1).index_copy_(0, at, drawn) if subset else drawn
        return tokens, asking_at

    def probs(self, logits: torch.Tensor, state: SamplingRows, own: np.ndarray
              ) -> torch.Tensor:
        """The distribution each row of ``logits`` [m, vocab] (``state`` rows ``own``,
        none greedy) draws from: tempered, top-k, top-p, min-p, normalised [m, vocab]
        (what speculative verification accepts against, ``worker.generate.rejection``)."""
        arrays = _filter_arrays(state, own, logits.shape[1])
        probs = _filtered(logits, _k_max(arrays), *self._staging.stage(*arrays))
        return probs.div_(probs.sum(dim=-1, keepdim=True))


def _filter_arrays(state: SamplingRows, own: np.ndarray, vocab: int) -> tuple[np.ndarray, ...]:
    """The host arrays ``_filtered`` reads, for the drawing state rows ``own`` [m]: top k
    (empty when no row uses it), the positions using top-p (empty when all or none do),
    temperatures, their top-p, min-p (empty when none uses it)."""
    top_k = np.where(state.top_k[own] < vocab, state.top_k[own], 0)  # k >= vocab: off
    top_p_at = np.flatnonzero(state.top_p[own] < 1)  # [r] positions among the m
    min_p = state.min_p[own]
    return (top_k if top_k.any() else _NO_INTS,
            top_p_at if 0 < top_p_at.size < own.size else _NO_INTS,
            state.temperature[own], state.top_p[own[top_p_at]],
            min_p if min_p.any() else _NO_FLOATS)


def _k_max(arrays: tuple[np.ndarray, ...]) -> int:
    return int(arrays[0].max()) if arrays[0].size else 0


def _filtered(x: torch.Tensor, k_max: int, k: torch.Tensor, p_at: torch.Tensor, temperature: torch.Tensor,
              top_p: torch.Tensor, mp: torch.Tensor) -> torch.Tensor:
    """Probabilities (unnormalised after min-p) of the logits ``x`` [m, vocab] tempered
    and filtered by ``_filter_arrays``' staged arrays (``k_max``: their largest top k)."""
    x = x / temperature[:, None]
    if k_max:
        _top_k(x, k, k_max)
    if top_p.numel():
        _top_p(x, p_at if p_at.numel() else None, top_p)
    probs = torch.softmax(x, dim=-1)
    if mp.numel():
        _min_p(probs, mp)
    return probs


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
