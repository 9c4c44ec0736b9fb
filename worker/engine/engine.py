"""The per-GPU engine: ``step()`` is schedule, run, postprocess.

The sync API (``embed``, ``score``, ``classify``, ``generate``) queues its requests and
drives steps on the caller's thread until they are done. Generation
(``worker.engine.generate_api``) is a second policy behind the same three step calls;
classification (``worker.engine.classify_api``) is one more pooled task of the packed path.
The async API (``submit``, ``embed_async``, ``score_async``, ``classify_async``) queues and
returns futures; a background ``StepLoop`` thread steps.
Both may be used at once: one lock serializes steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
from collections.abc import Sequence

import numpy as np

from worker.budget.limits import resolve_max_model_len, staging_capacity
from worker.core.config import EngineConfig
from worker.core.device import make_device
from worker.core.errors import (
    EngineDeadError,
    InvalidRequestError,
)
from worker.core.request import (
    Pooling,
    Request,
    RequestLimits,
    Task,
    as_token_array,
    as_token_types,
    check_type_count,
    parse_pooling,
    parse_task,
)
from worker.core.request import validate as validate_request
from worker.engine.classify_api import ClassifyAPI
from worker.engine.executor import make_executor
from worker.engine.generate_api import GenerateAPI
from worker.engine.loop import StepLoop
from worker.engine.lora_api import LoRAAPI, make_loras
from worker.engine.memory_plan import plan_memory
from worker.engine.observe import ObserveAPI
from worker.engine.spec_api import SpecAPI, load_draft
from worker.models.loader import load_model
from worker.models.sources import checkpoint_bytes, resolve_model
from worker.packed.policy import Pooled
from worker.packed.runner import ModelRunner
from worker.packed.scheduler import Scheduler
from worker.packed.staging import Staging
from worker.parallel import launch
from worker.parallel.group import TPGroup, init_group
from worker.parallel.steps import follow

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineStats:
    """Counters since start; ``Engine.stats`` returns a snapshot."""

    num_steps: int = 0
    num_bins: int = 0  # bins run, after out-of-memory splits
    num_tokens: int = 0  # real tokens run
    num_requests_finished: int = 0
    num_requests_failed: int = 0  # failed while running (out of memory alone)
    num_oom: int = 0  # bins or generation steps that ran out of memory (each shrank a budget)
    token_budget: int = 0  # current budget per bin
    num_generated_tokens: int = 0
    gen_token_budget: int = 0  # current generation step budget (0 until generation starts)
    prefix_cache_queries: int = 0  # prompt tokens of admitted generation requests
    prefix_cache_hits: int = 0  # of those, tokens whose KV came from the prefix cache
    prefix_cache_evictions: int = 0  # cached KV blocks handed out for other tokens
    # Speculative decoding (worker/generate/speculative.py), 0 / () when it is off:
    spec_num_steps: int = 0  # generation steps that verified proposals
    spec_num_proposed: int = 0  # tokens proposed and verified
    spec_num_accepted: int = 0  # of those, accepted
    spec_proposed_by_position: tuple[int, ...] = ()  # [k] proposals verified at position j
    spec_accepted_by_position: tuple[int, ...] = ()  # [k] of those, accepted
    spec_k: int = 0  # tokens a sequence could propose at the last step (load rule, cap; 0: off)


class Engine(GenerateAPI, ClassifyAPI, LoRAAPI, SpecAPI, ObserveAPI):
    """Packed, padding-free forwards over one device. See the module docstring."""

    def __init__(self, config: EngineConfig, tp: TPGroup | None = None, *, launcher=None,
                 device: str | None = None):
        """``tp`` and ``device``: this rank's group and device when it is a follower
        (``follow_rank``). Rank 0 of a ``tensor_parallel_size`` > 1 engine starts the
        followers itself (its executor), through ``launcher`` when given (see
        ``worker.parallel.launch``; default: processes of this one)."""
        self.executor = make_executor(config, tp, follow_rank, launcher=launcher,
                                      device=device)
        self.tp = self.executor.tp
        try:
            self._build(config)
        except BaseException:
            self.executor.stop(clean=False)  # the followers fail alike, or wait: end them
            raise

    def _build(self, config: EngineConfig) -> None:
        executor = self.executor
        self.device = make_device(executor.device)
        weights = checkpoint_bytes(resolve_model(config.model)) if self.tp is not None else 0
        model, self.spec = load_model(config, self.device.device, executor.shard,
                                      reading=executor.loading(config, weights))
        self.loras = make_loras(config, model, self.spec, self._wake_loop)  # before the probe:
        #   the adapter slots are memory the plan counts
        max_model_len = resolve_max_model_len(config, self.spec)
        self.draft_model = load_draft(config, self.device, self.spec, max_model_len)  # before
        #   the probe, as the adapters: its weights and KV cache are memory the plan counts
        max_tokens, max_seqs = staging_capacity(config, max_model_len)
        self.staging = Staging(max_tokens, max_seqs, self.device,
                               token_types=self.spec.takes_token_type_ids)
        self.runner = ModelRunner(model, self.spec, self.staging, self.device)
        self.memory = plan = plan_memory(config, self.runner, self.device, executor,
                                         max_model_len=max_model_len,
                                         staging=(max_tokens, max_seqs),
                                         draft=self.draft_model)
        budget, self.budget_report = plan.probed_budget, plan.budget_report
        self.config = dataclasses.replace(  # every None resolved
            config, max_num_batched_tokens=budget, max_model_len=max_model_len,
            dtype=str(self.spec.dtype).removeprefix("torch."),
            attention_backend=self.spec.attention_backend,
        )
        self.pooled = Pooled(Scheduler(plan.token_budget, align=config.align,
                                       max_num_seqs=config.max_num_seqs,
                                       max_num_bins_per_step=config.max_num_bins_per_step),
                             self.runner)
        self.limits = RequestLimits(self.spec.vocab_size, max_model_len, budget, config.align,
                                    can_score=self.runner.head is not None,
                                    can_classify=self.runner.classifier is not None,
                                    type_vocab_size=self.spec.type_vocab_size)
        self.default_pooling = Pooling.LAST if self.spec.is_decoder else Pooling.MEAN
        self._stats = EngineStats(token_budget=plan.token_budget)
        self._step_lock = threading.RLock()  # _die() may run inside a step
        self._state_lock = threading.Lock()
        self._loop: StepLoop | None = None
        self._dead: BaseException | None = None
        if self.tp is not None:  # every rank allocates its KV cache now, all sized alike
            gen = [self.generation.runner] if plan.kv is not None else []  # not a classifier
            executor.attach(self.runner, *gen)
        logger.info("engine ready: %s", self.config)

    # ---- sync API -------------------------------------------------------------------

    def embed(self, token_id_lists: Sequence, pooling: str | None = None,
              normalize: bool = False) -> np.ndarray:
        """One pooled vector per sequence -> [n, hidden] float32. Raises the first
        request's typed error (with a note naming its index) before running any."""
        requests = self._make_all(token_id_lists, Task.EMBED, pooling, normalize)
        self._run_sync(requests)
        if not requests:
            return np.empty((0, self.spec.hidden_size), np.float32)
        return np.stack([r.output for r in requests])

    def score(self, token_id_lists: Sequence) -> list[np.ndarray]:
        """Per sequence, log p(token t | tokens < t) for t = 1..len-1 -> [len - 1] float32."""
        requests = self._make_all(token_id_lists, Task.SCORE, None, False)
        self._run_sync(requests)
        return [r.output for r in requests]

    # ---- async API ------------------------------------------------------------------

    def submit(self, token_ids, task: str | Task = Task.EMBED, *, pooling: str | None = None,
               normalize: bool = False, token_type_ids=None) -> asyncio.Future:
        """Queue one sequence; the future (of the running event loop) resolves to its
        output array, or to its typed error. Raises ``EngineDeadError`` when dead.
        ``token_type_ids``: a pair's token types (classify; see ``Engine.classify``)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._check_alive()
        try:
            request = self._make(token_ids, parse_task(task), pooling, normalize,
                                 token_type_ids)
        except InvalidRequestError as exc:
            future.set_exception(exc)
            return future
        request.on_finish = functools.partial(_settle_threadsafe, loop, future)
        future.add_done_callback(functools.partial(_mark_cancelled, request))
        self._start_loop()
        self._enqueue([request])
        return future

    async def embed_async(self, token_id_lists: Sequence, pooling: str | None = None,
                          normalize: bool = False) -> np.ndarray:
        """``embed`` through the step loop; raises the first request's error."""
        futures = [self.submit(ids, Task.EMBED, pooling=pooling, normalize=normalize)
                   for ids in token_id_lists]
        outputs = await asyncio.gather(*futures)
        if not outputs:
            return np.empty((0, self.spec.hidden_size), np.float32)
        return np.stack(outputs)

    async def score_async(self, token_id_lists: Sequence) -> list[np.ndarray]:
        """``score`` through the step loop; raises the first request's error."""
        futures = [self.submit(ids, Task.SCORE) for ids in token_id_lists]
        return list(await asyncio.gather(*futures))

    # ---- the step -------------------------------------------------------------------

    def step(self) -> int:
        """Schedule, run, postprocess one step of the policy whose turn it is (pooled
        bins, or generation: ``worker.packed.policy.Pooled`` and ``Generation`` have the
        same calls); returns the requests it finished."""
        with self._step_lock:
            self._check_alive()
            policy = self._gen if self._generation_turn() else self.pooled
            out = policy.schedule()
            if out is None:
                return 0
            budget = policy.token_budget
            try:
                result = self._run(policy, out)
            except BaseException as exc:
                self._fail_step(policy, out, exc)
                raise
            if result is None:  # a generation forward ran out of memory
                return self._recover_generation_oom(policy, out)
            self._count(policy, out, result)  # before any caller can see a result
            finished = policy.postprocess(out, result)
            return self._after_step(policy, out, result, budget, finished)

    def _run(self, policy, out):
        if policy is self._gen and self._obs is not None:
            return self._obs.run_generation(policy, out)  # timed as the step's one bin
        return policy.run(out)

    def _count(self, policy, out, result) -> None:
        if policy is self._gen:
            return self._count_generation(out, result)
        failed = policy.failed(result)
        s = self._stats
        s.num_steps += 1
        s.num_bins += result.num_bins
        s.num_tokens += out.num_tokens - sum(out.requests[i].num_tokens for i in failed)
        s.num_requests_finished += len(out.requests) - len(failed)
        s.num_requests_failed += len(failed)
        s.num_oom += len(result.oom_num_tokens)
        s.token_budget = policy.token_budget

    def _after_step(self, policy, out, result, budget: int, finished) -> int:
        if policy is self._gen:
            return self._after_generation_step(out, finished)
        if self._obs is not None:
            self._obs.forward_step(out, result, budget, policy.token_budget, self._gen,
                                   self.num_waiting)
        return finished

    # ---- lifecycle ------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """What admission and the router reserve against (``MemoryPlan.capacity_tokens``)."""
        return self.memory.capacity_tokens

    @property
    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats)

    def is_alive(self) -> bool:
        """False once shut down or once a step raised (the loop is then gone too)."""
        return self._dead is None and (self._loop is None or self._loop.is_alive())

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the step loop, fail whatever is still queued, stop the follower ranks.
        Idempotent."""
        if self._loop is not None:
            self._loop.stop(timeout)
        clean = self._dead is None  # no step died inside a collective
        self._die(EngineDeadError("the engine was shut down"))
        if self.loras is not None:
            self.loras.shutdown()
        self.executor.stop(clean)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- helpers --------------------------------------------------------------------

    def _make(self, token_ids, task: Task, pooling, normalize: bool,
              token_type_ids=None) -> Request:
        if task is not Task.EMBED and (pooling is not None or normalize):
            raise InvalidRequestError(f"{task} takes no pooling or normalize",
                                      setting="pooling")
        arr = as_token_array(token_ids)
        validate_request(arr, task, self.limits)
        types = as_token_types(token_type_ids, arr.shape[0], self.limits)
        pool = parse_pooling(pooling, self.default_pooling) if task is Task.EMBED else None
        return Request(arr, task, pool, bool(normalize), token_type_ids=types)

    def _make_all(self, lists: Sequence, task: Task, pooling, normalize,
                  token_type_ids: Sequence | None = None) -> list[Request]:
        check_type_count(token_type_ids, len(lists))
        requests = []
        for i, token_ids in enumerate(lists):
            types = None if token_type_ids is None else token_type_ids[i]
            try:
                requests.append(self._make(token_ids, task, pooling, normalize, types))
            except InvalidRequestError as exc:
                exc.add_note(f"(sequence {i} of the {len(lists)} given)")
                raise
        return requests

    def _run_sync(self, requests: list[Request]) -> None:
        self._check_alive()
        self._enqueue(requests)
        while not all(r.finished for r in requests):  # per request, per step
            self.step()
        for r in requests:
            if r.error is not None:
                raise r.error

    def _enqueue(self, requests: list[Request]) -> None:
        if self._obs is not None:
            self._obs.stamp(requests)
        self.pooled.intake.extend(requests)
        if self._loop is not None:
            self._loop.wake()

    def _start_loop(self) -> None:
        with self._state_lock:
            if self._loop is None:
                self._loop = StepLoop(self.step, self._has_work, self._on_loop_death)
                self._loop.start()

    def _has_work(self) -> bool:
        return self.pooled.has_work() or self._generation_has_work()

    def _on_loop_death(self, exc: BaseException) -> None:
        err = EngineDeadError(f"the step loop died: {exc!r}")
        err.__cause__ = exc
        self._die(err)

    def _fail_step(self, policy, out, exc: BaseException) -> None:
        kind = "a generation step" if policy is self._gen else "a step"
        err = EngineDeadError(f"{kind} failed, the engine is dead: {exc!r}")
        err.__cause__ = exc
        self._die(err)  # dead before any caller hears of it: a retry must see it dead
        policy.fail(out, err)

    def _die(self, err: BaseException) -> None:
        """Mark dead (first reason wins) and fail every queued request."""
        with self._state_lock:
            if self._dead is None:
                self._dead = err
        with self._step_lock:
            self.pooled.fail_all(self._dead)
        self._fail_generation(self._dead)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running ({self._dead})") from self._dead


def _settle_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future,
                       request: Request) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, request)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting
        pass


def _settle(future: asyncio.Future, request: Request) -> None:
    if future.done():
        return
    if request.error is not None:
        future.set_exception(request.error)
    else:
        future.set_result(request.output)


def _mark_cancelled(request: Request, future: asyncio.Future) -> None:
    if future.cancelled():
        request.cancelled = True


def follow_rank(config: EngineConfig, rank: int, size: int, port: int, device: str,
                exit_process: bool = True) -> int:
    """A follower rank (``worker.parallel.launch``): the same engine on this rank's shard,
    on ``device``, running rank 0's steps until it says stop; returns the steps it ran.
    ``exit_process``: leave the process at the end (a process of its own: see below)."""
    import os
    import sys

    import torch

    if not config.is_cuda:  # the node's cores, shared among the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = init_group(rank, size, "127.0.0.1", port, device, config.tp_step_timeout_s)
    engine = Engine(config, tp=tp, device=device)
    try:
        gen = engine.generation.runner if engine.memory.kv is not None else None
        num_steps = follow(gen, tp, engine.runner)
    finally:
        engine.shutdown()
        launch.leave_group()
    if not exit_process:
        return num_steps
    # Everything is shut down. Leave without Python's finalization: the process group's
    # C++ threads could still be joinable when its static objects are destroyed, which
    # aborts the process ("terminate called without an active exception", exit -6 in
    # about 1 run of 6 here).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
