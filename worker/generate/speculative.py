"""Speculative decoding: proposals, the load rule, and what a step verified.

A running decode may *propose* up to k tokens d_1..d_k besides its last token; the
step then computes the k + 1 tokens in one packed forward (the varlen path takes
several query tokens per sequence anyway), and ``worker.generate.rejection`` accepts a
prefix of the proposals and samples one more token, so that every token emitted has
exactly the target model's distribution (greedy: exactly its argmax). The KV of the
rejected proposals is rolled back (``GenScheduler.advance`` trims the blocks past the
accepted tokens; only full blocks of accepted tokens reach the prefix cache).

Who proposes (``EngineConfig.speculative.method``):

- ``ngram`` (prompt lookup, no second model): the longest suffix of the sequence, n
  tokens from ``prompt_lookup_max`` down to ``prompt_lookup_min``, is looked up in the
  prompt and output so far; the k tokens that followed its most recent earlier
  occurrence with k tokens after it (else its earliest) are proposed (``NgramProposer``; numpy over the row's tokens, no loop
  over positions). Its proposal distribution is a point mass.
- ``draft``: a small causal LM of the same vocabulary runs k one-token steps with its
  own paged KV cache (``worker.generate.draft``), sampling each proposal from its own
  distribution q (greedy rows: its argmax).

How many each sequence proposes (``SpecLoad``): the positions whose chance of being
accepted beats what a step's tokens cost at the current batch size, from the
sequence's own acceptance record and the step cost the engine measures; the cluster's
admission controller may cap k further (``cap``: 0 turns speculation off across
replicas under cluster load). Why this rule and its constants: docs/decisions.md
("Speculation by load").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from worker.core.config import SpeculativeConfig


class NgramProposer:
    """Prompt lookup over a row of token ids (see the module docstring)."""

    def __init__(self, n_max: int, n_min: int):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({n_min}) <= prompt_lookup_max "
                             f"({n_max})")
        self.n_max, self.n_min = n_max, n_min

    def propose(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` tokens continuing ``tokens`` [N] int64 (the sequence so far): those
        after the most recent earlier occurrence of its longest suffix of n in
        [n_min, n_max] tokens; empty when no suffix of ``n_min`` recurs."""
        n_total = tokens.shape[0]
        if k <= 0 or n_total <= self.n_min:
            return _EMPTY
        last = n_total - 1
        # Occurrences of a suffix of n tokens end at j < last: first n = 1, then narrowed.
        cand = np.flatnonzero(tokens[:last] == tokens[last])
        best = cand if self.n_min == 1 else _EMPTY
        for n in range(2, min(self.n_max, n_total - 1) + 1):  # per suffix length, <= n_max
            cand = cand[cand >= n - 1]
            cand = cand[tokens[cand - (n - 1)] == tokens[last - (n - 1)]]
            if not cand.size:
                break
            if n >= self.n_min:
                best = cand
        if not best.size:
            return _EMPTY
        # The most recent occurrence followed by k tokens, else the earliest (the longest
        # continuation: in a loop the most recent one is right behind the suffix).
        full = best[best + k < n_total]
        start = int(full[-1] if full.size else best[0]) + 1
        return tokens[start: min(start + k, n_total)]


_EMPTY = np.zeros(0, np.int64)


ACCEPTANCE_PRIOR = 0.8  # a new sequence's acceptance estimate: optimistic, so it tries
PRIOR_WEIGHT = 1.0  # the prior's weight, in verified positions
MEMORY = 0.8  # per step, the weight left to a sequence's past verifications (~5 steps)
DEFAULT_OVERHEAD_TOKENS = {"cpu": 32.0, "cuda": 256.0}  # F until the steps measured it
MIN_COST_SAMPLES = 16  # steps before the measured F replaces the default
DRAFT_RETRY_STEPS = 64  # steps without a draft step, then its cost is estimated afresh


class SpecLoad:
    """How many tokens each sequence proposes this step (see ``SpeculativeConfig``).

    The rule, per step with b sequences running: none at all from
    ``disable_by_batch_size``; else k (the config's, under the cluster's ``cap``) for
    every decode when not ``adaptive``; else, for each decode, the positions j <= k with

        a^j >= b / (F + b)

    where a is the sequence's acceptance estimate (``Acceptance``) and F the step's fixed
    cost in tokens (a step of t tokens costs c (F + t); ``StepCost`` measures F). A step
    that emits b tokens without speculation yields b / (F + b) tokens per unit of cost;
    proposal j adds one unit and yields a^j expected tokens (it counts only if every
    proposal before it is accepted), so it pays exactly when a^j beats that. At low load
    (F >> b) nearly every position pays; as the batch fills the bar rises to 1, so a
    sequence keeps proposing only while nearly everything it proposes is accepted.

    A draft model's proposals cost more: position j needs one more draft step, D target
    tokens' worth, shared by the b sequences, so the bar is (b + D) / (F + b). D is the
    draft's measured seconds per proposing step over the target's seconds per token
    (``StepCost``), or, until both are measured, the draft's share of the target's
    parameters times a target step (``draft_ratio`` x (F + b)). A measurement that
    stops the draft (one-time costs of its first steps, say: kernels compiling) is
    forgotten after ``DRAFT_RETRY_STEPS`` steps without a draft step, so the estimate
    goes back to the parameter share and the draft is tried again. The cap is set from
    any thread (the replica relays the admission controller's view)."""

    def __init__(self, config: SpeculativeConfig, device_type: str = "cpu",
                 draft_ratio: float = 0.0):
        """``draft_ratio``: the draft's parameters over the target's (0: no draft)."""
        self.k = config.num_speculative_tokens
        self.adaptive = config.adaptive
        self.off = config.disable_by_batch_size
        self.cost = StepCost(config.step_overhead_tokens,
                             DEFAULT_OVERHEAD_TOKENS.get(device_type, 256.0))
        self.draft_ratio = draft_ratio
        self.draft_step_seconds: float | None = None  # EMA over proposing steps
        self._idle_draft_steps = 0  # engine steps since the draft last proposed
        self._cap: int | None = None

    def set_cap(self, cap: int | None) -> None:
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"speculation cap must be an integer >= 0 or None, got {cap!r}")
        self._cap = cap  # one attribute store: atomic for the stepping thread's read

    def k_for(self, num_running: int) -> int:
        """The most any sequence proposes in a step with ``num_running`` running."""
        if self.off is not None and num_running >= self.off:
            return 0
        cap = self._cap
        return self.k if cap is None else min(self.k, cap)

    def threshold(self, num_running: int) -> float:
        """The acceptance probability a proposal position must reach: (b + D) / (F + b)."""
        f = self.cost.overhead_tokens
        return (num_running + self.draft_cost_tokens(num_running, f)) / (f + num_running)

    def draft_cost_tokens(self, num_running: int, overhead: float) -> float:
        """D: one draft proposing step, in target tokens (0 without a draft)."""
        if not self.draft_ratio:
            return 0.0
        per_token = self.cost.seconds_per_token
        if per_token and self.draft_step_seconds is not None:
            return self.draft_step_seconds / per_token
        return self.draft_ratio * (overhead + num_running)

    def add_draft_steps(self, seconds: float, num_steps: int) -> None:
        """The draft's ``num_steps`` proposing steps of one engine step took ``seconds``
        (0 steps: it did not propose)."""
        if not num_steps:
            self._idle_draft_steps += 1
            if self._idle_draft_steps >= DRAFT_RETRY_STEPS:
                self.draft_step_seconds, self._idle_draft_steps = None, 0
            return
        self._idle_draft_steps = 0
        per_step = seconds / num_steps
        last = self.draft_step_seconds
        self.draft_step_seconds = per_step if last is None else 0.9 * last + 0.1 * per_step

    def positions(self, acceptance: float, k: int, threshold: float) -> int:
        """How many of ``k`` positions pay at ``acceptance`` (all when not adaptive)."""
        if not self.adaptive or acceptance >= 1.0:
            return k
        if acceptance <= threshold:
            return 0
        return min(k, int(math.log(threshold) / math.log(acceptance)))


class Acceptance:
    """A sequence's acceptance estimate: per verified position, the chance the target
    accepts it given the ones before it were. From each verification of m proposals of
    which n were accepted: n acceptances in n + [n < m] trials (a run that ends in a
    rejection, or is cut off after m), the geometric model's counts; both decay by
    ``MEMORY`` per step, towards ``ACCEPTANCE_PRIOR`` (a sequence that stopped proposing
    tries again once its bad record has faded)."""

    __slots__ = ("accepted", "trials")

    def __init__(self):
        self.accepted = self.trials = 0.0

    @property
    def value(self) -> float:
        return ((self.accepted + ACCEPTANCE_PRIOR * PRIOR_WEIGHT)
                / (self.trials + PRIOR_WEIGHT))

    def update(self, verified: int, accepted: int) -> None:
        self.accepted = self.accepted * MEMORY + accepted
        self.trials = self.trials * MEMORY + accepted + (accepted < verified)


class StepCost:
    """F, a generation step's fixed cost in tokens: a least-squares line through the
    (tokens, seconds) of recent steps, seconds = c0 + c1 tokens, F = c0 / c1, with
    exponential forgetting (half-life ~35 steps). The configured value if set; the
    device's default until ``MIN_COST_SAMPLES`` steps of different sizes were seen."""

    DECAY = 0.98

    def __init__(self, fixed: float | None, default: float):
        self.fixed, self.default = fixed, default
        self._n = self._t = self._tt = self._s = self._ts = 0.0
        self.num_samples = 0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.DECAY
        self._n = self._n * d + 1
        self._t = self._t * d + tokens
        self._tt = self._tt * d + tokens * tokens
        self._s = self._s * d + seconds
        self._ts = self._ts * d + tokens * seconds
        self.num_samples += 1

    def _fit(self) -> tuple[float, float] | None:
        """(c0, c1) of the line, or None while not measurable."""
        if self.num_samples < MIN_COST_SAMPLES:
            return None
        n, t, tt, s, ts = self._n, self._t, self._tt, self._s, self._ts
        var = tt / n - (t / n) ** 2
        if var <= 0.01 * (t / n) ** 2:  # steps all alike: the slope is not measurable
            return None
        c1 = (ts / n - (t / n) * (s / n)) / var
        c0 = s / n - c1 * t / n
        return (c0, c1) if c1 > 0 and c0 > 0 else None

    @property
    def overhead_tokens(self) -> float:
        if self.fixed is not None:
            return float(self.fixed)
        fit = self._fit()
        return self.default if fit is None else min(max(fit[0] / fit[1], 1.0), 65536.0)

    @property
    def seconds_per_token(self) -> float | None:
        """c1, the measured cost of one more token in a step (None until measured)."""
        fit = self._fit()
        return None if fit is None else fit[1]


@dataclass
class SpecStepStats:
    """What one step verified, per proposal position (for ``StepRecord`` and the
    engine's counters)."""

    proposed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [k]
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [k]

    @classmethod
    def of(cls, verified: list[int], accepted: list[int], k: int) -> SpecStepStats:
        """From each sequence's number of proposals verified and accepted."""
        v = np.asarray(verified, np.int64)
        a = np.asarray(accepted, np.int64)
        pos = np.arange(k)[:, None]
        return cls((pos < v[None, :]).sum(1), (pos < a[None, :]).sum(1))

    @property
    def num_proposed(self) -> int:
        return int(self.proposed.sum())

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())
