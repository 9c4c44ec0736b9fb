"""Continuous batching: each step, how many tokens for which sequence.

A step holds at most ``max_num_batched_tokens`` tokens, filled in this order (first
come, first served within each group, so no request starves):

1. every running decode gets its one token (stall-free: a long prefill never delays a
   decode; ``max_num_seqs <= max_num_batched_tokens`` guarantees they all fit);
2. running sequences still prefilling get their next chunk;
3. waiting sequences are admitted from the head of the queue while the budget,
   ``max_num_seqs`` and the free KV blocks allow; admission never skips the head, save
   for a sequence that waits for a shared prefix (below).
   With prefix caching, an admitted sequence first takes the longest chain of cached
   full blocks matching its tokens (never its last token: that one must be computed to
   sample), and only the rest is prefilled. After each step, the full blocks a sequence
   computed are registered under their chained hashes. A waiting sequence whose next
   uncached block a running prefill is computing right now (``n`` choices of one prompt,
   or many requests behind one system prompt, arriving together) is passed over until
   that block is cached, so a shared prompt is prefilled once, not once per copy: the
   sequences behind it are admitted meanwhile (SGLang deprioritizes in-batch prefix
   sharers the same way). It never waits longer than the running prefill takes to get
   past the shared blocks.

A chunk is at most ``max_prefill_chunk`` tokens (0 = no cap besides the budget).
Several prompts share a step, and a step is one packed forward, so filling the budget
in arrival order with chunking leaves no room unused: there is nothing for FFD to pack.

Out of KV blocks: a decode, or a prefill that cannot fit even one token, preempts the
newest running sequence not yet scheduled this step (recompute: its blocks are freed at
once and it goes back to the waiting queue in arrival order; its tokens are kept and
prefilled again). A decode that is itself the newest preempts itself.

Out of device memory (the step's forward raised): ``undo`` returns the step's slot
reservations, then ``shrink_budget`` sets the budget to 90% of the failed step (aligned
down), for good. Every running sequence must keep its decode row, so at most ``budget``
sequences run: when the new budget is below the running count, the newest running
sequences are preempted (recompute) down to it, and admission stops at the budget too.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

from worker.core.memory import shrunk_budget
from worker.generate.sequence import FinishReason, SeqStatus, Sequence
from worker.kv.block_manager import AllocStatus, BlockInvariantError, BlockManager
from worker.kv.block_pool import chain_hashes, root_hash

logger = logging.getLogger(__name__)


class StopReason(str, enum.Enum):
    """Why a step stopped taking prefill work."""

    NOTHING_WAITING = "nothing waiting"
    TOKEN_BUDGET = "token budget used"
    MAX_NUM_SEQS = "max_num_seqs running"
    OUT_OF_BLOCKS = "out of KV blocks"
    PREFIX_PENDING = "the rest wait for a shared prefix a running prefill computes"
    LORA_LOADING = "the rest wait for their LoRA adapters to load"


@dataclass(frozen=True)
class GenSchedulerOutput:
    """What one step runs: ``seqs[i]`` computes its next ``num_new_tokens[i]`` tokens."""

    seqs: list[Sequence]  # [B]: the num_decodes decodes first, then prefill chunks
    num_new_tokens: list[int]  # [B]
    num_decodes: int
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting
    stop: StopReason = StopReason.NOTHING_WAITING
    num_prefix_queries: int = 0  # tokens of the sequences admitted this step
    num_prefix_hits: int = 0  # of those, tokens found in the prefix cache

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class GenScheduler:
    """Waiting queue and running set over one ``BlockManager``."""

    # After an out-of-memory shrink, this many clean steps in a row double the budget
    # again, up to the configured one: a transient spike (another process, a burst of
    # long prompts) must not cap the engine for the rest of its life.
    regrow_after_steps = 256

    def __init__(self, blocks: BlockManager, *, max_num_batched_tokens: int,
                 max_num_seqs: int, max_prefill_chunk: int = 0,
                 enable_prefix_caching: bool = False, cache_salt: str = "", loras=None):
        if not 1 <= max_num_seqs <= max_num_batched_tokens:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) must be in [1, "
                             f"max_num_batched_tokens ({max_num_batched_tokens})]: every "
                             "running decode must fit in one step")
        self.blocks = blocks
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.configured_num_batched_tokens = max_num_batched_tokens  # the regrow ceiling
        self._clean_steps = 0  # steps since the last out-of-memory shrink
        self.max_prefill_chunk = max_prefill_chunk
        self.waiting: deque[Sequence] = deque()  # arrival order
        self.running: list[Sequence] = []  # arrival order; every one holds blocks
        self._arrivals = itertools.count()
        self.prefix_caching = enable_prefix_caching
        self._cache_salt = cache_salt
        self._root_hash = root_hash(cache_salt)  # a first block's parent: the model's id
        self.loras = loras  # worker.lora.manager.LoRAManager, or None (no adapters served)
        self.waiting_for_lora = False  # the last step left sequences waiting for a load
        self.num_prefix_queries = 0  # tokens of admitted sequences, since start
        self.num_prefix_hits = 0  # of those, tokens taken from the prefix cache
        self.speculating = False  # decodes may carry proposals (Sequence.spec_want)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> GenSchedulerOutput | None:
        """The next step's work; ``None`` when nothing is waiting or running."""
        if not self.running and not self.waiting:
            return None
        step = _Step(self.max_num_batched_tokens)
        append_slot = self.blocks.append_slot
        for seq in [s for s in self.running if s.is_decode]:  # per running decode, every step
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this step
            if append_slot(seq.seq_id) or self._reserve_decode(seq, step):
                step.add(seq, 1)
        num_decodes = len(step.seqs)
        if self.speculating:
            self._speculate(step, num_decodes)
        stop = self._continue_prefills(step)
        if stop is None:
            stop = self._admit(step)
        return GenSchedulerOutput(step.seqs, step.counts, num_decodes, step.preempted, stop,
                                  step.num_queried, step.num_hit)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish ``seq`` (running or waiting) and free its blocks now. Idempotent."""
        if seq.finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release_lora(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def advance(self, out: GenSchedulerOutput, computed: list[int] | None = None
                ) -> list[Sequence]:
        """After the step ran: the scheduled tokens' K/V are now in the cache, and the
        blocks they filled are registered in the prefix cache. ``computed`` [B]: the
        tokens each sequence keeps (default ``out.num_new_tokens``); a speculative decode
        keeps its last token and its accepted proposals, and the slots of the rejected
        ones are returned (their K/V is never read, and never cached). Returns the
        sequences trimmed so: their block tables lost a suffix."""
        bs = self.blocks.block_size
        trimmed = []
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens)):  # per scheduled seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            if computed is not None and computed[i] < n:
                self.blocks.trim(seq.seq_id, seq.num_computed + computed[i])
                n = computed[i]
                trimmed.append(seq)
            seq.num_computed += n
            full = seq.num_computed // bs
            if self.prefix_caching and full > seq.num_registered:  # once per block
                self.blocks.register(seq.seq_id, seq.num_registered, self._hashes(seq, full),
                                     full)
                seq.num_registered = full
        self._maybe_regrow()
        return trimmed

    def _maybe_regrow(self) -> None:
        if self.max_num_batched_tokens >= self.configured_num_batched_tokens:
            return
        self._clean_steps += 1
        if self._clean_steps >= self.regrow_after_steps:
            self._clean_steps = 0
            self.max_num_batched_tokens = min(self.configured_num_batched_tokens,
                                              2 * self.max_num_batched_tokens)
            logger.info("generation step budget regrown to %d tokens",
                        self.max_num_batched_tokens)

    def undo(self, out: GenSchedulerOutput) -> None:
        """``out`` did not run: return the slots it reserved (a running sequence holds
        exactly its ``num_computed`` tokens between steps). Admitted sequences stay
        running, with no slots."""
        for seq in out.seqs:  # per scheduled sequence of the failed step
            if seq.status is SeqStatus.RUNNING:
                self.blocks.trim(seq.seq_id, seq.num_computed)

    def shrink_budget(self, failed_num_tokens: int, align: int) -> list[Sequence]:
        """After a step of ``failed_num_tokens`` ran out of memory (and ``undo``): the
        budget becomes 90% of it, aligned down to ``align`` when at least that, and at
        least 1; ``regrow_after_steps`` clean steps later it doubles again (up to the
        configured budget). The newest running sequences are preempted until every
        running decode fits the budget; returns them."""
        self._clean_steps = 0
        self.max_num_batched_tokens = min(self.max_num_batched_tokens,
                                          shrunk_budget(failed_num_tokens, align, minimum=1))
        preempted = []
        while len(self.running) > self.max_num_batched_tokens:  # newest first
            preempted.append(self.running[-1])
            self._preempt(self.running[-1])
        return preempted

    def check_invariants(self) -> None:
        """Blocks are consistent and owned exactly by the running sequences."""
        self.blocks.check_invariants()
        for seq in self.waiting:
            if self.blocks.has(seq.seq_id):
                raise BlockInvariantError(f"waiting sequence {seq.seq_id} holds KV blocks")
        for seq in self.running:
            if self.blocks.num_tokens(seq.seq_id) < seq.num_computed:
                raise BlockInvariantError(f"sequence {seq.seq_id} computed {seq.num_computed} "
                                          f"tokens but holds slots for "
                                          f"{self.blocks.num_tokens(seq.seq_id)}")
        if self.blocks.stats().num_seqs != len(self.running):
            raise BlockInvariantError("a sequence that is not running holds KV blocks")

    # ---- helpers ------------------------------------------------------------------

    def _reserve_decode(self, seq: Sequence, step: _Step) -> bool:
        """One slot for ``seq``'s decode, preempting the newest others as needed."""
        while self.blocks.allocate(seq.seq_id, 1) is AllocStatus.OUT_OF_BLOCKS:
            victim = self.running[-1]
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _speculate(self, step: _Step, num_decodes: int) -> None:
        """Slots for the proposals of the decodes that asked (``Sequence.spec_want``, set
        by the proposer for this step): after every decode has its token, from what is
        left of the budget, never preempting anyone for them."""
        for i in range(num_decodes):  # per scheduled decode
            seq = step.seqs[i]
            want, seq.spec_want = min(seq.spec_want, step.budget), 0
            if want > 0 and self.blocks.allocate(seq.seq_id, want) is AllocStatus.OK:
                step.counts[i] += want
                step.budget -= want

    def _continue_prefills(self, step: _Step) -> StopReason | None:
        for seq in [s for s in self.running if not s.is_decode]:  # per prefilling sequence
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this step
            n = min(self._chunk(seq, step.budget), self._room(seq))
            while n == 0 and step.budget > 0 and self._preempt_newer(seq, step):
                n = min(self._chunk(seq, step.budget), self._room(seq))
            if n == 0:
                return StopReason.TOKEN_BUDGET if step.budget == 0 else StopReason.OUT_OF_BLOCKS
            self.blocks.allocate(seq.seq_id, n)
            step.add(seq, n)
        return None

    def _admit(self, step: _Step) -> StopReason:
        pending = self._pending_blocks()
        at = 0  # the waiting sequence considered: the head, unless some wait for a prefix
        lora_waits = False  # some were passed over: their adapter is not resident yet
        self.waiting_for_lora = False
        while at < len(self.waiting):  # per admitted sequence
            seq = self.waiting[at]
            if seq in step.preempted:  # just lost its blocks: admitting it again would thrash
                return StopReason.OUT_OF_BLOCKS
            if len(self.running) >= min(self.max_num_seqs, self.max_num_batched_tokens):
                return StopReason.MAX_NUM_SEQS  # the budget caps it after an OOM shrink
            if step.budget == 0:
                return StopReason.TOKEN_BUDGET
            if pending and self._waits_for_prefix(seq, pending):
                at += 1
                continue
            if seq.lora is not None and not self._acquire_lora(seq):
                at += 1  # its adapter loads meanwhile; the others go on
                lora_waits = self.waiting_for_lora = True
                continue
            hit = self._take_prefix(seq)
            n = self._chunk(seq, step.budget)
            if self.blocks.allocate(seq.seq_id, n) is AllocStatus.OUT_OF_BLOCKS:
                self.blocks.free(seq.seq_id)  # the prefix goes back to the cache
                seq.num_computed = seq.num_registered = 0
                self._release_lora(seq)
                return StopReason.OUT_OF_BLOCKS
            del self.waiting[at]
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_by_arrival)
            step.add(seq, n)
            if seq.num_cached_tokens is None:  # the first admission's, as vLLM reports it
                seq.num_cached_tokens = hit
            if self.prefix_caching:
                pending.update(seq.block_hashes[seq.num_registered:])
                step.num_queried += seq.num_tokens
                step.num_hit += hit
                self.num_prefix_queries += seq.num_tokens
                self.num_prefix_hits += hit
        if lora_waits:
            return StopReason.LORA_LOADING
        return StopReason.PREFIX_PENDING if at else StopReason.NOTHING_WAITING

    def _acquire_lora(self, seq: Sequence) -> bool:
        slot = self.loras.acquire(seq.lora)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _release_lora(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.loras.release(seq.lora_slot)
            seq.lora_slot = -1

    def _root(self, seq: Sequence) -> bytes:
        """A first block's parent hash: the model's, salted by the sequence's adapter (two
        adapters, or an adapter and the base, never share KV: their K/V differ)."""
        if seq.lora is None:
            return self._root_hash
        return root_hash(f"{self._cache_salt}|lora:{self.loras.salt(seq.lora)}")

    def _pending_blocks(self) -> set[bytes]:
        """Hashes of the full blocks running prefills have yet to compute (and register):
        a waiting sequence that needs one next will find it cached once they have."""
        pending: set[bytes] = set()
        if self.prefix_caching and self.waiting:
            for seq in self.running:  # per running sequence, while some wait
                if seq.num_registered < len(seq.block_hashes):
                    pending.update(seq.block_hashes[seq.num_registered:])
        return pending

    def _waits_for_prefix(self, seq: Sequence, pending: set[bytes]) -> bool:
        """Whether ``seq``'s first full block missing from the cache is in ``pending``."""
        hashes = self._prefix_hashes(seq)
        num_cached = self.blocks.num_cached_prefix(hashes)
        return num_cached < len(hashes) and hashes[num_cached] in pending

    def _take_prefix(self, seq: Sequence) -> int:
        """Tokens of ``seq`` found in the prefix cache (it takes their blocks), at most
        all its full blocks but the one holding its last token."""
        if not self.prefix_caching:
            return 0
        taken = self.blocks.take_prefix(seq.seq_id, self._prefix_hashes(seq))
        seq.num_registered = taken
        seq.num_computed = taken * self.blocks.block_size
        return seq.num_computed

    def _prefix_hashes(self, seq: Sequence) -> list[bytes]:
        """The chained hashes of ``seq``'s full blocks but the one holding its last token
        (the blocks it may take from the cache)."""
        max_blocks = (seq.num_tokens - 1) // self.blocks.block_size
        return self._hashes(seq, max_blocks)[:max_blocks]

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """``seq``'s chained block hashes, extended to at least ``num_blocks`` full blocks."""
        have = len(seq.block_hashes)
        if have < num_blocks:
            parent = seq.block_hashes[-1] if have else self._root(seq)
            seq.block_hashes += chain_hashes(seq.token_ids, self.blocks.block_size, parent,
                                             have, num_blocks)
        return seq.block_hashes

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed, budget)
        return min(n, self.max_prefill_chunk) if self.max_prefill_chunk else n

    def _room(self, seq: Sequence) -> int:
        """Tokens ``seq`` can still add without new preemptions."""
        bs = self.blocks.block_size
        slack = -self.blocks.num_tokens(seq.seq_id) % bs
        return slack + self.blocks.num_free_blocks * bs

    def _preempt_newer(self, seq: Sequence, step: _Step) -> bool:
        for victim in reversed(self.running):  # newest first
            if victim.arrival <= seq.arrival:
                return False
            if victim not in step.scheduled:  # scheduled ones already hold this step's slots
                self._preempt(victim)
                step.preempted.append(victim)
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_lora(seq)
        self.blocks.free(seq.seq_id)  # full blocks stay cached: recompute may hit them
        seq.num_computed, seq.num_registered, seq.status = 0, 0, SeqStatus.WAITING
        seq.num_preemptions += 1
        seq.spec_want = 0
        i = 0
        while i < len(self.waiting) and self.waiting[i].arrival < seq.arrival:
            i += 1  # preempted sequences are older than most waiting ones: a short scan
        self.waiting.insert(i, seq)


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


class _Step:
    """The step being filled; thrown away once the output is built."""

    def __init__(self, budget: int):
        self.budget = budget
        self.seqs: list[Sequence] = []
        self.counts: list[int] = []
        self.scheduled: set[Sequence] = set()  # Sequence hashes by identity
        self.preempted: list[Sequence] = []
        self.num_queried = 0  # prefix cache: tokens of the sequences admitted
        self.num_hit = 0  # of those, tokens found cached

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.counts.append(n)
        self.scheduled.add(seq)
        self.budget -= n
