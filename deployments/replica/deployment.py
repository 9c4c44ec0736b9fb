"""The engine replica: one per GPU, a thin Serve deployment over ``worker.Engine``.

Start-up loads the model and runs the Phase-0 budget probe (inside ``Engine``); a
decoder with a tokenizer also sizes and allocates its KV cache now, so the capacity it
reports is measured, not assumed. Then, every ``heartbeat_s``, the replica tells the
admission controller its capacity, the leases it is serving and what each holds by the
lease rule (a generation's grows with the tokens it generated: ``LeaseRule``), its pace
(seconds per decode step) and whether it is under KV pressure (``ReplicaPace``); the
controller's answer caps its speculative decoding (off while the model's pool is nearly
full: ``deployments/admission/speculation.py``). Every ``stats_period_s`` Serve asks
``record_routing_stats`` for the router. A dead engine loop fails the health check, so
Serve replaces the replica and the controller, no longer hearing from it, reclaims its
leases.

| capacity_tokens (what admission reserves against, per replica)                 |
|---------------------------------------------------------------------------------|
| generation models: KV cache tokens = num_kv_blocks x kv_block_size              |
| embedding models: 2 x max_num_bins_per_step x max_num_batched_tokens (one step |
| running, one staged)                                                           |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

import numpy as np
import torch
from ray import serve

from deployments.admission.ledger import LeaseRule
from deployments.app.config import AdmissionArgs, ModelArgs
from deployments.app.metrics import ReplicaMetrics
from deployments.app.process import rss_bytes, trim_memory
from deployments.replica.ranks import launch_ranks
from deployments.replica.streams import StreamSender, StreamSink, entry_of
from deployments.replica.work import (
    ClassifyWork,
    EmbedWork,
    GenerateWork,
    ModelInfo,
    Refusal,
    ScoreWork,
    Work,
)
from worker import Engine
from worker.core.errors import InvalidRequestError
from worker.engine.generate_api import Progress
from worker.engine.observe import StepKind, StepRecord
from worker.generate.output import GenerationDelta, GenerationOutput
from worker.models.sources import is_smoke_test

logger = logging.getLogger("ray.serve")

TRIM_AFTER_TOKENS = 8192  # after a request this large, give freed heap back to the OS


class EngineReplica:
    """Serves one model on one device. Deployed once per model by ``build_app``."""

    async def __init__(self, model_args: dict, admission_args: dict, admission=None):
        self.args = ModelArgs.model_validate(model_args)
        self.admission_args = AdmissionArgs.model_validate(admission_args)
        config = self.args.engine_config()
        if config.device == "cpu":  # before the engine runs: torch's pool is per process
            torch.set_num_threads(self.args.torch_threads())
        launcher = launch_ranks if config.tensor_parallel_size > 1 else None
        self.engine = await asyncio.to_thread(Engine, config, launcher=launcher)
        self.info = await asyncio.to_thread(self._model_info)
        self._admission = admission
        self._rule = self.admission_args.make_lease_rule()
        self._active: dict[int, _Serving] = {}  # id(work) -> its service, while serving it
        self._num_served = 0
        self._speculation_cap: int | None = None  # as last handed to the engine
        self.pace = ReplicaPace()
        self._streams = StreamSender()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._heartbeat = asyncio.get_running_loop().create_task(self._report_forever())
        self.on_ready()
        logger.info("replica %s of %s ready: %s", self.replica_id, self.args.name, self.info)

    def on_ready(self) -> None:
        """Wire the engine's step observers: the pace admission reads, and this replica's
        metrics (none if they cannot be built: the replica serves without them). Runs
        before the first heartbeat."""
        if self.info.can_generate:
            self.engine.add_step_observer(self.pace.observe)
        try:
            kinds = ("forward", "generate") if self.info.can_generate else ("forward",)
            self.metrics = ReplicaMetrics(self.args.name, self.replica_id, kinds,
                                          self.max_num_spec_tokens())
        except Exception:  # serve without metrics rather than not at all
            logger.exception("replica metrics unavailable")
            self.metrics = None
            return
        self.engine.add_step_observer(self.metrics.observe_step)

    # ---- requests -------------------------------------------------------------------

    # Client errors come back as a ``Refusal`` value (see deployments/replica/work.py).

    async def generate(self, work: GenerateWork) -> GenerationOutput | Refusal:
        with self._serving(work) as progress, _refusing() as refused:
            await self._ensure_lora(work)
            outputs = await self.engine.generate_async([work.prompt_token_ids], work.params,
                                                       progress, lora=work.lora)
            return outputs[0]
        return refused.value

    async def generate_to(self, work: GenerateWork, sink: StreamSink) -> int | Refusal:
        """Generate, sending the deltas to the ingress's stream channel (at most one entry
        per engine step, merged further while the ingress lags: deployments/replica/streams.py);
        returns the number of tokens once the last one is on the wire. Cancelling the
        call aborts the request."""
        with self._serving(work) as progress, _refusing() as refused:
            await self._ensure_lora(work)
            channel = await self._streams.channel(sink)
            num_tokens = 0
            async for delta in self.engine.generate_stream(work.prompt_token_ids, work.params,
                                                           progress, lora=work.lora):
                if channel.closed:  # the ingress is gone: stop generating (aborts it)
                    raise ConnectionError(f"stream channel to the ingress lost: "
                                          f"{channel.error!r}")
                channel.push(sink.key, entry_of(delta))  # per request, per step
                num_tokens += len(delta.token_ids)
            await channel.flushed()
            return num_tokens
        return refused.value

    async def generate_stream(self, work: GenerateWork
                              ) -> AsyncIterator[GenerationDelta | Refusal]:
        """Deltas as steps produce them, through Serve's streaming call (the
        ``serve_handle`` transport); closing the stream aborts the request."""
        with self._serving(work) as progress, _refusing() as refused:
            await self._ensure_lora(work)
            async for delta in self.engine.generate_stream(work.prompt_token_ids, work.params,
                                                           progress, lora=work.lora):
                yield delta
        if refused.value is not None:
            yield refused.value

    async def embed(self, work: EmbedWork) -> np.ndarray | Refusal:
        """[num_inputs, hidden] float32."""
        with self._serving(work), _refusing() as refused:
            vectors = await self.engine.embed_async(work.inputs, work.pooling, work.normalize)
            if work.num_tokens > TRIM_AFTER_TOKENS:  # its activations are freed by now
                trim_memory()
            return vectors
        return refused.value

    async def score(self, work: ScoreWork) -> list[np.ndarray] | Refusal:
        """Per input, log p(token t | tokens < t) for t = 1..len-1."""
        with self._serving(work), _refusing() as refused:
            return await self.engine.score_async(work.inputs)
        return refused.value

    async def classify(self, work: ClassifyWork) -> np.ndarray | Refusal:
        """[num_inputs, num_labels] float32 logits of the classification head."""
        with self._serving(work), _refusing() as refused:
            return await self.engine.classify_async(work.inputs, work.token_type_ids)
        return refused.value

    async def model_info(self) -> ModelInfo:
        return self.info

    async def check_lora(self, name: str, path: str) -> dict | Refusal:
        """Whether the adapter at ``path`` can be served on this model (the load
        endpoint asks before it lists one): its rank and targets, or the refusal."""
        with _refusing() as refused:
            spec = await asyncio.to_thread(self.engine.check_lora, name, path)
            return {"rank": spec.rank, "target_modules": list(spec.target_modules)}
        return refused.value

    async def _ensure_lora(self, work: GenerateWork) -> None:
        if work.lora is not None:
            await asyncio.to_thread(self.engine.ensure_lora, work.lora, work.lora_path)

    async def state(self) -> dict:
        """What this replica holds now (tests check it drains to zero): tokens and
        requests in service, KV blocks in use (after checking the block invariants),
        engine steps run so far, resident memory, torch's intra-op threads."""
        used_blocks = 0
        if self.info.can_generate:
            self.engine.check_kv_invariants()
            used_blocks = self.engine.generation.blocks.stats().num_used_blocks
        return {"replica_id": self.replica_id, **self.load(), "kv_used_blocks": used_blocks,
                "num_engine_steps": self.engine.stats.num_steps, "rss_bytes": rss_bytes(),
                "speculation_cap": self._speculation_cap,
                "lora": self.engine.lora_state(),
                "torch_threads": torch.get_num_threads()}

    def load(self) -> dict:
        """What the replica holds: the same numbers go to the router, the autoscaler and
        the admission controller. ``used_tokens``: its requests' tokens by the lease rule
        (a generation's grow as it generates); under KV pressure the router and the
        controller see it as full. Numbers only: Serve disables custom autoscaling
        metrics for good at the first value that is not an int or a float."""
        used = sum(s.tokens() for s in self._active.values())
        pressure = self.pace.pressure()
        loras = self.engine.loras
        return {"capacity_tokens": self.info.capacity_tokens,
                "num_lora_loads": loras.num_loads if loras is not None else 0,
                "num_loras_resident": len(loras.resident) if loras is not None else 0,
                "used_tokens": max(used, self.info.capacity_tokens) if pressure else used,
                "num_requests": len(self._active), "num_served": self._num_served,
                "kv_pressure": pressure, "decode_step_s": self.pace.step_s or 0.0,
                "kv_used_blocks": self.pace.kv_used_blocks,
                "num_preemptions": self.pace.num_preemptions, "num_oom": self.pace.num_oom}

    def max_num_spec_tokens(self) -> int:
        """The k this replica's engine speculates with (0: it does not speculate)."""
        spec = self.engine.config.speculative if self.info.can_generate else None
        return spec.num_speculative_tokens if spec is not None else 0

    def apply_speculation_cap(self, cap: int | None) -> None:
        """The admission controller's answer to a report: 0 turns speculation off, None
        lifts the cap. Handed to the engine only when it changed; a replica that does
        not speculate ignores it."""
        if cap == self._speculation_cap or not self.max_num_spec_tokens():
            return
        self.engine.set_speculation_cap(cap)
        self._speculation_cap = cap
        logger.info("replica %s of %s: speculation %s by the cluster's load",
                    self.replica_id, self.args.name, "on" if cap is None else f"capped at {cap}")

    # ---- Serve hooks ----------------------------------------------------------------

    def record_routing_stats(self) -> dict:
        """``load()`` and the adapters resident in the engine's slots (the router prefers
        a replica that holds a request's adapter; not in ``load()``, whose values must
        stay numbers for the autoscaler)."""
        loras = self.engine.loras
        return {**self.load(), "loras": loras.resident if loras is not None else []}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics, read by ``deployments.replica.autoscaling``."""
        return self.load()

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"the engine of {self.args.name} is dead; Serve will replace "
                               "this replica")
        if self._heartbeat.done() and not self._heartbeat.cancelled():
            raise RuntimeError(f"admission heartbeat stopped: {self._heartbeat.exception()!r}")

    def __del__(self) -> None:
        heartbeat = getattr(self, "_heartbeat", None)
        if heartbeat is not None:
            heartbeat.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=10)

    # ---- internals ------------------------------------------------------------------

    def _serving(self, work: Work):
        return _Serving(self, work)

    def _model_info(self) -> ModelInfo:
        engine, cfg = self.engine, self.engine.config
        can_generate = engine.spec.is_decoder and not engine.spec.is_classifier
        if can_generate:
            _ = engine.generation  # allocate the KV cache now (the plan's blocks), not mid-request
        capacity = engine.capacity_tokens
        return ModelInfo(
            name=self.args.name, is_decoder=engine.spec.is_decoder, can_generate=can_generate,
            max_model_len=cfg.max_model_len, vocab_size=engine.spec.vocab_size,
            hidden_size=engine.spec.hidden_size, capacity_tokens=int(capacity),
            token_budget=cfg.max_num_batched_tokens, smoke_test=is_smoke_test(self.args.model),
            device=cfg.device, attention_backend=cfg.attention_backend, labels=engine.labels,
            model_type=engine.spec.model_type, unproven=engine.spec.unproven,
            tensor_parallel_size=cfg.tensor_parallel_size)

    async def _report_forever(self) -> None:
        """Every ``heartbeat_s``: the budget gauges, and the report to admission (if on)."""
        while True:
            self._record_budget()
            if self._admission is not None:
                await self._report()
            await asyncio.sleep(self.admission_args.heartbeat_s)

    async def _report(self) -> None:
        leases = {s.work.lease_id: (s.tokens(), s.progress.num_generated)
                  for s in self._active.values() if s.work.lease_id}
        try:
            cap = await self._admission.replica_report.remote(
                self.args.name, self.replica_id, self.info.capacity_tokens, leases,
                self.load())
        except Exception as exc:  # noqa: BLE001 - the controller restarts; keep trying
            logger.warning("admission report failed (%s); retrying", exc)
            return
        try:
            self.apply_speculation_cap(cap)
        except Exception:  # the cap never stops the heartbeat (it is retried next one)
            logger.exception("applying the speculation cap %r failed", cap)

    def _record_budget(self) -> None:
        if self.metrics is None:
            return
        capacity = self.info.capacity_tokens
        used = sum(s.tokens() for s in self._active.values())
        try:
            self.metrics.set_budget(capacity, capacity - used)
        except Exception:  # metrics never stop the heartbeat
            logger.exception("replica metrics failed")


class _Refused:
    value: Refusal | None = None


@contextlib.contextmanager
def _refusing():
    """Catch a client error (``InvalidRequestError``) into ``.value`` as a ``Refusal``
    and log it as one line: it is the request's fault, not the replica's."""
    refused = _Refused()
    try:
        yield refused
    except InvalidRequestError as exc:
        logger.info("refused a request: %s", exc)
        refused.value = Refusal(exc)


class _Serving:
    """A request while the replica serves it: its tokens by the lease rule."""

    def __init__(self, replica: EngineReplica, work: Work):
        self.replica, self.work = replica, work
        self.progress = Progress()
        self._rule = replica._rule if isinstance(work, GenerateWork) else None

    def tokens(self) -> int:
        if self._rule is None:
            return self.work.num_tokens
        w = self.work
        return self._rule.tokens(len(w.prompt_token_ids), w.params.max_tokens,
                                 self.progress.num_generated)

    def __enter__(self) -> Progress:
        self.replica._active[id(self.work)] = self
        self.replica._num_served += 1
        return self.progress

    def __exit__(self, *exc) -> None:
        self.replica._active.pop(id(self.work), None)


class ReplicaPace:
    """What admission needs from the engine's generation steps (a step observer, on the
    stepping thread; read from the replica's loop): seconds per decode step, an EWMA of
    the time from one generation step's end to the next one's when the next one decodes
    (a decoding sequence was running after the step before, so the engine did not idle in
    between: after an idle gap the first step is a prefill), and KV pressure: within
    the last ``PRESSURE_HOLD_S``, the engine preempted a sequence or a step could not
    admit a waiting one for want of blocks. Pressure lapses by itself: an engine that
    went idle under it must not stay closed to new work."""

    PRESSURE_HOLD_S = 2.0
    EWMA = 0.05  # about the last 20 steps: one step's hiccup does not move Retry-After

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.step_s: float | None = None
        self.num_preemptions = 0
        self.num_oom = 0  # generation forwards that ran out of device memory
        self.kv_used_blocks = 0  # after the last generation step
        self._last: float | None = None  # when the last generation step ended
        self._pressed_at = -math.inf  # the last preemption or step out of KV blocks

    def observe(self, record: StepRecord) -> None:
        if record.kind is not StepKind.GENERATE:
            return
        now = self.clock()
        if record.num_decodes and self._last is not None:
            gap, pace = now - self._last, self.step_s
            self.step_s = gap if pace is None else pace + self.EWMA * (gap - pace)
        self._last = now
        if record.num_preemptions:
            self.num_preemptions += record.num_preemptions
            self._pressed_at = now
        if record.out_of_blocks and record.num_waiting:
            self._pressed_at = now
        self.num_oom += record.num_oom
        self.kv_used_blocks = record.num_kv_blocks_used

    def pressure(self) -> bool:
        return self.clock() - self._pressed_at < self.PRESSURE_HOLD_S
