"""The engine's generation API, mixed into ``Engine``: ``generate`` (sync),
``generate_async``, ``generate_stream`` (an async generator of per-step deltas) and
``abort``; the async forms take a ``Progress`` to read how far a request has come
(admission grows its lease by it, deployments/replica/deployment.py). The ``Generation`` policy
(KV cache, block manager, scheduler, runner) is built on first use, so an engine that
only embeds never allocates a KV cache.

Pooled work (embed, score) and generation share the step loop and its lock; while both
have work they take turns, one step each.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq

from worker.core.errors import InvalidRequestError, UnsupportedTaskError
from worker.generate.generation import Generation
from worker.generate.output import (
    DeltaTracker,
    GenerationDelta,
    GenerationOutput,
    stop_strings,
)
from worker.generate.rejection import Verified
from worker.generate.sampling import SamplingParams
from worker.generate.scheduler import GenSchedulerOutput
from worker.generate.sequence import Sequence
from worker.models.sources import resolve_model

logger = logging.getLogger(__name__)


class Progress:
    """How many tokens a running request has generated so far (all its prompts'
    sequences together), readable from any thread: a read of ints the step thread
    writes, never a lock."""

    __slots__ = ("_seqs",)

    def __init__(self):
        self._seqs: tuple[Sequence, ...] = ()

    @property
    def num_generated(self) -> int:
        return sum(len(s.token_ids) - s.prompt_len for s in self._seqs)


def num_emitted(sampled) -> int:
    """Tokens a step's sampling produced (a verified step: accepted proposals too)."""
    return len(sampled.sampled.token_ids if isinstance(sampled, Verified) else sampled.token_ids)


class GenerateAPI:
    """Generation methods of ``Engine`` (which provides the step lock, loop and config)."""

    _gen: Generation | None = None
    _gen_turn: bool = False

    @property
    def generation(self) -> Generation:
        """The generation policy, built (and its KV cache allocated) on first use.

        Once built it is read without the step lock: the step thread holds that lock
        through every step and takes it back at once, so an event loop that waited for
        it per request (``generate_stream``, ``generate_async``) admitted a burst of
        200 streams one step apart, seconds before any of them saw a token."""
        gen = self._gen
        if gen is not None:  # set once, never replaced
            return gen
        with self._step_lock:
            if self._gen is None:
                self._gen = self._build_generation()
            return self._gen

    def generate(self, token_id_lists: Seq, params: SamplingParams | Seq | None = None,
                 lora: str | Seq | None = None) -> list[GenerationOutput]:
        """Generate for every prompt (token ids) on the caller's thread; outputs in input
        order. ``params``: one ``SamplingParams`` for all, or one per prompt; ``lora``:
        one registered adapter's name for all, or one per prompt (None: the base model).
        Raises the first invalid prompt's typed error before running any (a constraint's
        compile is waited for here, on the caller's thread)."""
        gen = self.generation
        seqs = self._make_sequences(gen, token_id_lists, params, lora)
        _wait_for_grammars(seqs)
        self._check_alive()
        self._submit(gen, seqs)
        while not all(s.finished for s in seqs):  # per request, per step
            if not self.step() and gen.scheduler.waiting_for_lora and not gen.scheduler.running:
                time.sleep(0.001)  # only adapter loads are left to wait for: let them read
        return [self._result(gen, s) for s in seqs]

    async def generate_async(self, token_id_lists: Seq, params: SamplingParams | Seq | None = None,
                             progress: Progress | None = None, lora: str | Seq | None = None
                             ) -> list[GenerationOutput]:
        """``generate`` through the background step loop."""
        gen = self.generation
        seqs = self._make_sequences(gen, token_id_lists, params, lora)
        if progress is not None:
            progress._seqs = tuple(seqs)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in seqs]
        for seq, future in zip(seqs, futures):
            seq.on_finish = functools.partial(_call_threadsafe, loop, _settle, future, gen)
        self._check_alive()
        self._start_loop()
        self._submit(gen, seqs)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for seq in seqs:  # cancelled: the caller left, free their KV now
                if not seq.finished:
                    self.abort(seq.seq_id)

    async def generate_stream(self, token_ids, params: SamplingParams | None = None,
                              progress: Progress | None = None, lora: str | None = None
                              ) -> AsyncIterator[GenerationDelta]:
        """Yield a ``GenerationDelta`` per step that adds tokens; the last one carries the
        finish reason. Closing the generator early (or cancelling its task) aborts the
        request and frees its KV blocks."""
        gen = self.generation
        seq = self._make_sequences(gen, [token_ids], params, lora)[0]
        if progress is not None:
            progress._seqs = (seq,)
        if seq.params.stop:  # what a stream may send is held back by these: build them here
            stop_strings(seq).prefixes()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seq.on_update = functools.partial(_stream_update, loop, queue, DeltaTracker(seq))
        self._check_alive()
        self._start_loop()
        self._submit(gen, [seq])
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.abort(seq.seq_id)

    def abort(self, request_id: int) -> bool:
        """Finish a generation request as aborted and free its KV blocks now (waits for
        a step in flight). False when it is unknown or already finished."""
        with self._step_lock:
            return self._gen is not None and self._gen.abort(request_id)

    def check_kv_invariants(self) -> None:
        """No leaked or double-owned KV block (tests call this after every test)."""
        with self._step_lock:
            if self._gen is not None:
                self._gen.check_invariants()

    # ---- stepping -------------------------------------------------------------------

    def _generation_turn(self) -> bool:
        """Whether this step is generation's: always when only it has work, every other
        step when pooled work waits too."""
        if self._gen is None or not self._gen.has_work():
            return False
        if not self.pooled.has_work():
            return True
        self._gen_turn = not self._gen_turn
        return self._gen_turn

    def _count_generation(self, out: GenSchedulerOutput, result) -> None:
        s = self._stats  # the step is counted before any caller can see its results
        s.num_steps += 1
        s.num_tokens += out.num_tokens
        s.num_generated_tokens += num_emitted(result[1])
        s.prefix_cache_queries += out.num_prefix_queries
        s.prefix_cache_hits += out.num_prefix_hits

    def _after_generation_step(self, out: GenSchedulerOutput, finished: list) -> int:
        gen, s = self._gen, self._stats
        s.prefix_cache_evictions = gen.blocks.pool.num_evictions
        s.num_requests_finished += len(finished)
        s.gen_token_budget = gen.scheduler.max_num_batched_tokens  # may have regrown
        if gen.spec_load is not None:
            s.spec_num_steps, s.spec_k = gen.spec_num_steps, gen.spec_k
            s.spec_proposed_by_position = tuple(gen.spec_proposed.tolist())
            s.spec_accepted_by_position = tuple(gen.spec_accepted.tolist())
            s.spec_num_proposed = sum(s.spec_proposed_by_position)
            s.spec_num_accepted = sum(s.spec_accepted_by_position)
        if self._obs is not None:
            self._obs.generation_step(gen, out, self.num_waiting)
        return len(finished)

    def _recover_generation_oom(self, gen: Generation, out: GenSchedulerOutput) -> int:
        """The step's forward ran out of memory; nothing was postprocessed. Free the
        allocator cache, shrink the step budget, and let the next step reschedule."""
        self.device.empty_cache()
        before = gen.scheduler.max_num_batched_tokens
        failed = gen.recover_from_oom(out, self.config.align)
        s = self._stats
        s.num_oom += 1
        s.num_requests_failed += len(failed)
        s.gen_token_budget = gen.scheduler.max_num_batched_tokens
        logger.warning("out of memory on a generation step of %d tokens (%d sequences): step "
                       "budget %d -> %d, %d running, %d failed", out.num_tokens, len(out.seqs),
                       before, s.gen_token_budget, len(gen.scheduler.running), len(failed))
        if self._obs is not None:
            self._obs.generation_oom(gen, self.num_waiting)
        return len(failed)

    def _generation_has_work(self) -> bool:
        return self._gen is not None and self._gen.has_work()

    def _fail_generation(self, err: BaseException) -> None:
        if self._gen is not None:
            with self._step_lock:
                self._gen.fail_all(err)

    # ---- helpers --------------------------------------------------------------------

    def _build_generation(self) -> Generation:
        plan = self.memory
        if plan.generation_error is not None:
            raise plan.generation_error
        if plan.kv is None:
            kind = "a sequence classifier" if self.spec.is_classifier else "an encoder"
            raise UnsupportedTaskError(f"generate needs a causal LM; this model is {kind}",
                                       value="generate", setting="model")
        self._stats.gen_token_budget = plan.generation.max_num_batched_tokens
        gen = Generation(self.runner.model, self.device, plan.generation, plan.kv,
                         max_model_len=plan.max_model_len, vocab_size=self.spec.vocab_size,
                         tokenizer=_load_tokenizer(self.config), wake=self._wake_loop,
                         loras=self.loras, speculative=self.config.speculative,
                         draft_model=self.draft_model)
        gen.set_speculation_cap(self._spec_cap)
        return gen

    def _wake_loop(self) -> None:
        """A compile ended (on its thread): the step loop admits or fails its requests."""
        loop = self._loop
        if loop is not None:
            loop.wake()

    def _make_sequences(self, gen: Generation, token_id_lists: Seq, params,
                        lora=None) -> list[Sequence]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_id_lists)
        elif len(params) != len(token_id_lists):
            raise InvalidRequestError(f"{len(params)} SamplingParams for {len(token_id_lists)} "
                                      "prompts; give one, or one per prompt", setting="params")
        if lora is None or isinstance(lora, str):
            lora = [lora] * len(token_id_lists)
        elif len(lora) != len(token_id_lists):
            raise InvalidRequestError(f"{len(lora)} adapters for {len(token_id_lists)} prompts; "
                                      "give one, or one per prompt", setting="lora")
        seqs = []
        for i, (ids, p, name) in enumerate(zip(token_id_lists, params, lora)):
            try:
                seqs.append(gen.make_sequence(ids, p, name))
            except InvalidRequestError as exc:
                exc.add_note(f"(prompt {i} of the {len(token_id_lists)} given)")
                raise
        return seqs

    def _submit(self, gen: Generation, seqs: list[Sequence]) -> None:
        if self._obs is not None:
            self._obs.stamp(seqs)
        for seq in seqs:
            gen.submit(seq)
        if self._loop is not None:
            self._loop.wake()

    @staticmethod
    def _result(gen: Generation, seq: Sequence) -> GenerationOutput:
        if seq.error is not None:
            raise seq.error
        return gen.processor.output(seq)


def _wait_for_grammars(seqs: list[Sequence]) -> None:
    """Give each sequence whose constraint is compiling its matcher, waiting; raises the
    first failed compile's ``InvalidRequestError`` naming its prompt."""
    for i, seq in enumerate(seqs):
        if seq.grammar is None:
            continue
        try:
            seq.matcher, seq.grammar = seq.grammar.wait(), None
        except InvalidRequestError as exc:
            exc.add_note(f"(prompt {i} of the {len(seqs)} given)")
            raise


def _load_tokenizer(config):
    """The checkpoint's tokenizer, or None when it ships none (text is then None)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(config.model),
                                             trust_remote_code=config.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer", logged
        logger.info("no tokenizer for %s (%s): outputs carry token ids only", config.model,
                    type(exc).__name__)
        return None


def _call_threadsafe(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting
        pass


def _settle(future: asyncio.Future, gen: Generation, seq: Sequence) -> None:
    if future.done():
        return
    if seq.error is not None:
        future.set_exception(seq.error)
    else:
        future.set_result(gen.processor.output(seq))


def _stream_update(loop, queue: asyncio.Queue, tracker: DeltaTracker, seq: Sequence) -> None:
    item = seq.error if seq.error is not None else tracker.delta()
    _call_threadsafe(loop, queue.put_nowait, item)
