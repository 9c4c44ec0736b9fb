"""Generation as a policy the engine steps: continuous batching over a paged KV cache.

``Generation`` composes one manager per resource (``BlockManager`` for KV blocks,
``GenScheduler`` for the per-step token budget, ``GenRunner`` for the forward and the
sampler, ``OutputProcessor`` for stop rules and text) and exposes the engine's three
step calls: ``schedule``, ``run``, ``postprocess`` (or ``recover_from_oom`` when the
forward ran out of device memory). Requests come in through
``submit`` (any thread); everything else runs under the engine's step lock. A
structured request whose constraint is still compiling (on a compile thread, see
``worker.generate.grammar``) waits outside the scheduler: it is never scheduled, and no
step waits for it; the compile's end calls ``wake`` (the constructor's, from the compile
thread) and the next step admits it, or fails it with the compile's
``InvalidRequestError``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from worker.attention.packed import attention_softcap
from worker.attention.paged import (
    PAGED_KERNEL_BLOCK_MULTIPLE,
    check_paged_backend,
    select_paged_backend,
)
from worker.core.config import ConfigError, SpeculativeConfig
from worker.core.errors import InvalidRequestError, RequestOutOfMemoryError
from worker.generate.cuda_graphs import (
    GRAPH_BACKENDS,
    CaptureReport,
    DecodeGraphs,
    graph_buckets,
    graph_memory_estimate,
)
from worker.generate.draft import Draft, draft_kv_spec
from worker.generate.grammar import CompileWaits, Grammars
from worker.generate.grammar_compile import GrammarLimits
from worker.generate.kv_scales import calibrate_kv_scales
from worker.generate.output import OutputProcessor
from worker.generate.rejection import Verified
from worker.generate.runner import GenRunner
from worker.generate.sampling import SampledTokens, SamplingParams, make_generator
from worker.generate.scheduler import GenScheduler, GenSchedulerOutput, StopReason
from worker.generate.sequence import FinishReason, Sequence
from worker.generate.speculative import Acceptance, NgramProposer, SpecLoad, SpecStepStats
from worker.kv.block_manager import BlockManager
from worker.kv.cache import KVCache, KVCacheSpec, kv_bytes_from_report
from worker.quant.kv import FP8_E4M3, KV_STORAGE, checkpoint_scales, kv_storage_dtype

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on CPU when num_kv_blocks is unset (at most)
CUDA_UNPROBED_KV_FRACTION = 0.8  # of free memory, when no probe report sizes the cache


GEN_MEASURED_STEP_TOKENS = 8192  # generation step budget when the probe set the budget


@dataclass(frozen=True)
class GenerationSettings:
    """Generation limits, resolved from ``EngineConfig`` (errors name its fields)."""

    max_num_batched_tokens: int  # tokens per step (decodes + prefill chunks)
    max_num_running_seqs: int = 256  # running sequences at most (each holds KV blocks)
    max_prefill_chunk: int = 0  # prefill tokens per sequence per step; 0 = the budget
    kv_block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: from the probe (CUDA) or a byte cap (CPU)
    paged_attention_backend: str = "auto"  # see worker.attention.paged
    cuda_graphs: bool = True  # decode-only steps replay CUDA graphs (CUDA, triton only)
    enable_prefix_caching: bool = True  # reuse cached full blocks (see worker.kv.block_pool)
    grammar_limits: GrammarLimits = GrammarLimits()  # what one constraint may cost to compile
    kv_cache_dtype: str = "auto"  # "fp8": e4m3 storage with scales (worker.quant.kv)

    def __post_init__(self) -> None:
        for name, low in (("max_num_batched_tokens", 1), ("max_num_running_seqs", 1),
                          ("max_prefill_chunk", 0), ("kv_block_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int)
                                               or self.num_kv_blocks < 1):
            raise ConfigError("num_kv_blocks", f"must be an integer >= 1 or None, "
                              f"got {self.num_kv_blocks!r}")
        if self.kv_cache_dtype not in KV_STORAGE:
            raise ConfigError("kv_cache_dtype", f"must be one of {', '.join(KV_STORAGE)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.max_num_running_seqs > self.max_num_batched_tokens:
            raise ConfigError(
                "max_num_running_seqs", f"{self.max_num_running_seqs} exceeds the generation "
                f"step budget ({self.max_num_batched_tokens} tokens, max_num_batched_tokens): "
                "every running decode must fit in one step")

    @classmethod
    def from_config(cls, config, device_type: str, dtype: torch.dtype,
                    measured: bool) -> GenerationSettings:
        """From a resolved ``EngineConfig``. A measured (probe) budget is capped at
        ``GEN_MEASURED_STEP_TOKENS``: decode-heavy steps gain nothing from more, and the
        KV cache gets the memory instead. ``kv_block_size`` None: 256 when the paged
        backend asked for is a flash kernel (it needs multiples of 256), else 16 (our
        Triton kernel's default, as vLLM's)."""
        step = config.max_num_batched_tokens
        if measured:
            step = min(step, GEN_MEASURED_STEP_TOKENS)
        block = config.kv_block_size
        if block is None:
            flash = config.paged_attention_backend in ("flash_attn", "torch_paged")
            block = PAGED_KERNEL_BLOCK_MULTIPLE if flash else 16
        kv_dtype = config.kv_cache_dtype
        check_paged_backend(config.paged_attention_backend, device_type, dtype, block,
                            fp8_kv=kv_storage_dtype(kv_dtype, dtype) == FP8_E4M3)
        return cls(step, config.max_num_running_seqs, config.max_prefill_chunk, block,
                   config.num_kv_blocks, config.paged_attention_backend, config.cuda_graphs,
                   config.enable_prefix_caching, config.grammar_limits, kv_dtype)


def eos_token_ids(model) -> frozenset[int]:
    """The EOS token(s) of the model's generation config (what HF ``generate`` stops at)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def resolve_num_kv_blocks(settings: GenerationSettings, spec: KVCacheSpec, device,
                          report, max_model_len: int, reserve_bytes: int = 0,
                          extra_bytes_per_block: int = 0) -> int:
    """``num_kv_blocks`` if set; CUDA: what the probe left free after a step's
    activations and ``reserve_bytes`` (the CUDA graphs), else a fraction of free memory;
    CPU: ``CPU_KV_CACHE_BYTES`` at most, and no more than every running sequence at full
    length needs. ``extra_bytes_per_block``: another cache's block per block (a draft's)."""
    if settings.num_kv_blocks is not None:
        return settings.num_kv_blocks
    full = spec.num_blocks_for_tokens(max_model_len) * settings.max_num_running_seqs
    per_block = spec.bytes_per_block + extra_bytes_per_block
    if device.device.type != "cuda":
        return max(1, min(full, CPU_KV_CACHE_BYTES // per_block))
    if report is not None and getattr(report, "activation_bytes_per_token", None):
        free = kv_bytes_from_report(report, settings.max_num_batched_tokens) - reserve_bytes
    else:
        free = int(torch.cuda.mem_get_info(device.device)[0] * CUDA_UNPROBED_KV_FRACTION
                   ) - reserve_bytes
    blocks = max(0, int(free) // per_block)
    if blocks < spec.num_blocks_for_tokens(max_model_len):
        raise ConfigError(
            "num_kv_blocks", f"only {max(free, 0) / 2**30:.2f} GiB are left for the KV cache "
            f"({blocks} blocks), less than one sequence of max_model_len={max_model_len} "
            "needs; lower max_model_len or max_num_batched_tokens")
    return min(blocks, full)


@dataclass(frozen=True)
class KVPlan:
    """What generation takes of the device, decided before anything is allocated
    (``plan_kv``; the engine's ``MemoryPlan`` holds it)."""

    spec: KVCacheSpec
    backend: str  # the paged attention backend that passed its self-check
    num_blocks: int  # KV blocks the manager hands out (every rank can hold them)
    graphs: bool  # decode steps replay CUDA graphs
    graph_buckets: tuple[int, ...]
    graph_reserve_bytes: int  # what the graphs' capture is estimated to take
    kv_scales: torch.Tensor | None = None  # [L, 2, Hkv] fp32 host: an FP8 cache's scales
    #   from the checkpoint; None with FP8: calibrated when the cache is made

    @property
    def capacity_tokens(self) -> int:
        """Tokens of KV the cache holds: what admission leases against."""
        return self.num_blocks * self.spec.block_size

    @property
    def cache_bytes(self) -> int:
        """The cache's bytes (the blocks, and the scratch block of padding rows)."""
        return (self.num_blocks + 1) * self.spec.bytes_per_block


def plan_kv(model, device, settings: GenerationSettings, *, max_model_len: int, report=None,
            agree=None, draft=None) -> KVPlan:
    """The paged backend, the KV blocks and the graph memory of generation on ``device``.
    ``agree``: under tensor parallelism, the smallest value over the ranks (then no CUDA
    graphs: a TP engine's decode steps run eager); ``draft``: a speculative draft model,
    whose cache holds a block per block (``worker.generate.draft``)."""
    dtype = compute_dtype(model)
    spec = KVCacheSpec.for_model(model, dtype, settings.kv_block_size,
                                 kv_storage_dtype(settings.kv_cache_dtype, dtype))
    scales = _checkpoint_kv_scales(model, spec, agree) if spec.quantized else None
    backend = select_paged_backend(
        device.device.type, dtype, settings.kv_block_size, settings.paged_attention_backend,
        functools.partial(_self_check, model.config, spec, device.device),
        softcap=attention_softcap(model.config) is not None, fp8_kv=spec.quantized)
    buckets = graph_buckets(settings.max_num_running_seqs)
    graphs = (settings.cuda_graphs and device.device.type == "cuda"
              and backend in GRAPH_BACKENDS and agree is None)
    reserve = graph_memory_estimate(model.config, dtype, buckets[-1], getattr(
        report, "activation_bytes_per_token", None)) if graphs else 0
    extra = (draft_kv_spec(draft, compute_dtype(draft), settings.kv_block_size).bytes_per_block
             if draft is not None else 0)
    num_blocks = resolve_num_kv_blocks(settings, spec, device, report, max_model_len, reserve,
                                       extra)
    if agree is not None:
        num_blocks = agree(num_blocks)
    return KVPlan(spec, backend, num_blocks, graphs, buckets, reserve, scales)


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: its first parameter's that is not FP8 (FP8 linear
    layers, ``worker.quant.fp8``, hold e4m3 weights beside bf16 embeddings and norms)."""
    for p in model.parameters():  # usually the first: the embedding
        if p.dtype.is_floating_point and p.dtype.itemsize >= 2:
            return p.dtype
    raise ValueError("the model has no half or full precision parameter")


def _checkpoint_kv_scales(model, spec: KVCacheSpec, agree) -> torch.Tensor | None:
    """The checkpoint's KV scales, else None (calibrated later). Under tensor parallelism
    the calibration forward cannot run (the ranks build their caches at different times,
    and the forward's collectives would wait on each other): refused by name."""
    try:
        scales = checkpoint_scales(model, spec.num_layers, spec.num_kv_heads)
    except ValueError as exc:
        raise ConfigError("kv_cache_dtype", f"fp8: {exc}") from None
    if scales is None and agree is not None:
        raise ConfigError("kv_cache_dtype", "'fp8' under tensor_parallel_size > 1 needs a "
                          "checkpoint with KV cache scales (k_scale / v_scale); this one has "
                          "none; use kv_cache_dtype='auto'")
    return scales


class Generation:
    """Continuous batching for one model on one device (see the module docstring)."""

    def __init__(self, model, device, settings: GenerationSettings, kv: KVPlan, *,
                 max_model_len: int, vocab_size: int, tokenizer=None, wake=None, loras=None,
                 speculative: SpeculativeConfig | None = None, draft_model=None):
        """``kv``: what ``plan_kv`` decided (the engine's ``MemoryPlan.kv``); ``loras``:
        the engine's ``worker.lora.manager.LoRAManager`` (None: no adapters served);
        ``speculative``: speculative decoding's settings (None: off), with the loaded
        ``draft_model`` for method "draft" (``worker.generate.draft``)."""
        dtype = compute_dtype(model)
        self.backend, num_blocks, spec = kv.backend, kv.num_blocks, kv.spec
        self.settings, self.max_model_len, self.vocab_size = settings, max_model_len, vocab_size
        self.device = device
        self.blocks = BlockManager(num_blocks, settings.kv_block_size)
        # One block more than the manager hands out: the scratch block of padding rows.
        self.cache = KVCache(spec, num_blocks + 1, device.device)
        self.kv_scales_source: str | None = None  # FP8: "checkpoint" or "calibrated"
        if spec.quantized:  # before any write, and before the graphs capture
            self.kv_scales_source = "checkpoint" if kv.kv_scales is not None else "calibrated"
            self.cache.set_scales(kv.kv_scales if kv.kv_scales is not None else
                                  calibrate_kv_scales(model, spec, device.device, tokenizer,
                                                      vocab_size))
        self.scheduler = GenScheduler(self.blocks,
                                      max_num_batched_tokens=settings.max_num_batched_tokens,
                                      max_num_seqs=settings.max_num_running_seqs,
                                      max_prefill_chunk=settings.max_prefill_chunk,
                                      enable_prefix_caching=settings.enable_prefix_caching,
                                      cache_salt=f"{model.config._name_or_path}|{dtype}",
                                      loras=loras)
        self.loras = loras
        self.scheduler.speculating = speculative is not None
        ratio = (sum(p.numel() for p in draft_model.parameters())
                 / sum(p.numel() for p in model.parameters())) if draft_model is not None else 0.0
        self.spec_load = (SpecLoad(speculative, device.device.type, ratio)
                          if speculative is not None else None)
        self.ngram = (NgramProposer(speculative.prompt_lookup_max, speculative.prompt_lookup_min)
                      if speculative is not None and speculative.method == "ngram" else None)
        draft = None
        if speculative is not None and speculative.method == "draft":
            draft = Draft(draft_model, draft_kv_spec(draft_model, compute_dtype(draft_model),
                                                     settings.kv_block_size),
                          num_blocks + 1, device.device, vocab_size)
        self.draft = draft
        k = speculative.num_speculative_tokens if speculative is not None else 0
        self.spec_k = k  # what the load rule allows now (0: off)
        self.spec_num_steps = 0  # steps that verified proposals
        self.spec_proposed = np.zeros(k, np.int64)  # [k] proposals verified per position
        self.spec_accepted = np.zeros(k, np.int64)  # [k] of those, accepted
        self.last_spec: SpecStepStats | None = None  # the last step's, when it verified any
        self.grammars = Grammars(tokenizer, vocab_size, eos_token_ids(model),
                                 settings.grammar_limits)
        self.runner = GenRunner(model, self.cache, self.blocks, device, backend=self.backend,
                                max_num_batched_tokens=settings.max_num_batched_tokens,
                                max_num_seqs=settings.max_num_running_seqs,
                                max_model_len=max_model_len, eos_token_ids=eos_token_ids(model),
                                grammars=self.grammars, loras=loras,
                                speculative_tokens=k, draft=draft)
        self.processor = OutputProcessor(eos_token_ids(model), tokenizer)
        self._intake: deque[Sequence] = deque()
        self._live: dict[int, Sequence] = {}  # unfinished, by seq_id (intake included)
        self._compiling = CompileWaits(wake)  # sequences waiting for their grammar
        self.num_preemptions = 0  # sequences preempted so far (recompute), for observers
        self.graph_report: CaptureReport | None = None
        logger.info("generation: %d KV blocks of %d tokens (%.2f GiB, %s), %s paged attention",
                    num_blocks, settings.kv_block_size, self.cache.num_bytes / 2**30,
                    str(spec.storage_dtype).removeprefix("torch."), self.backend)
        if kv.graphs:
            self._capture_graphs(kv.graph_buckets, kv.graph_reserve_bytes)

    def _capture_graphs(self, buckets: tuple[int, ...], reserve: int) -> None:
        """Capture the decode graphs; any failure leaves every step eager (logged)."""
        graphs = DecodeGraphs(self.runner, buckets, capture=True)
        try:
            report = graphs.capture_all()
        except Exception as exc:  # noqa: BLE001 - a failed capture must not stop the engine
            del graphs
            self.device.empty_cache()
            logger.warning("CUDA graphs disabled, every step runs eager: capture failed: %r",
                           exc)
            return
        self.runner.graphs, self.graph_report = graphs, report
        logger.info("CUDA graphs: %d decode buckets (1..%d) captured in %.1f s, %.3f GiB "
                    "(%.3f GiB were kept out of the KV cache for them)", len(buckets),
                    buckets[-1], report.seconds, report.memory_bytes / 2**30, reserve / 2**30)
        if report.memory_bytes > reserve:
            logger.warning("the CUDA graphs took %.3f GiB, more than the %.3f GiB reserved",
                           report.memory_bytes / 2**30, reserve / 2**30)

    # ---- requests -------------------------------------------------------------------

    def make_sequence(self, token_ids, params: SamplingParams, lora: str | None = None
                      ) -> Sequence:
        """A validated sequence (of the registered adapter ``lora``, None: the base model);
        raises ``InvalidRequestError`` naming the limit."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if lora is not None:
            if self.loras is None:
                raise InvalidRequestError(f"LoRA adapter {lora!r} asked of an engine that "
                                          "serves none; start it with enable_lora",
                                          value=lora, setting="enable_lora")
            self.loras.spec(lora)  # raises LoRAError naming it
        ids = _token_list(token_ids, self.vocab_size)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is "
                f"{total} tokens, more than max_model_len={self.max_model_len}; lower "
                "max_tokens or shorten the prompt", limit=self.max_model_len, value=total,
                setting="max_tokens")
        need = -(-total // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise InvalidRequestError(
                f"the prompt plus max_tokens ({total} tokens) needs {need} KV blocks, more than "
                f"the cache holds (num_kv_blocks={self.blocks.num_blocks}); lower max_tokens or "
                "raise num_kv_blocks", limit=self.blocks.num_blocks, value=need,
                setting="num_kv_blocks")
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocab_size:
            raise InvalidRequestError(
                f"logit_bias names token {params.logit_bias[-1][0]}, outside the vocabulary "
                f"(ids 0 to {self.vocab_size - 1})", limit=self.vocab_size - 1,
                value=params.logit_bias[-1][0], setting="SamplingParams.logit_bias")
        if params.stop and self.processor.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer and this model has none; "
                                      "use stop_token_ids", value=params.stop,
                                      setting="SamplingParams.stop")
        compiled = None if params.structured is None else self.grammars.start(params.structured)
        seq = Sequence(ids, len(ids), params, make_generator(params, self.device.device),
                       lora=lora)
        if compiled is not None and compiled.done():
            seq.matcher = compiled.matcher()  # raises the compile's InvalidRequestError
        elif compiled is not None:
            seq.grammar = compiled
        return seq

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` (any thread)."""
        self._live[seq.seq_id] = seq
        self._intake.append(seq)

    def abort(self, seq_id: int) -> bool:
        """Finish ``seq_id`` as aborted and free its KV blocks now (under the step lock)."""
        seq = self._live.get(seq_id)
        if seq is None:
            return False
        self._drain_intake()
        self._finish(seq, FinishReason.ABORT)
        return True

    def has_work(self) -> bool:
        """Anything to step: queued or scheduled sequences, or a finished compile. Not
        while the only sequences wait for adapter loads: the loader's ``wake`` ends that."""
        sched = self.scheduler
        if (sched.waiting_for_lora and not sched.running and not self._intake
                and not self.loras.has_news and not self.loras.has_failed):
            return self._compiling.any_done()
        return (bool(self._intake) or sched.num_unfinished > 0
                or self._compiling.any_done())

    def in_use(self, lora: str) -> int:
        """Unfinished requests of adapter ``lora`` (queued, compiling or running)."""
        return sum(1 for s in self._live.values() if s.lora == lora)

    @property
    def num_waiting(self) -> int:
        """Sequences queued, preempted ones included, not yet running."""
        return len(self._intake) + len(self.scheduler.waiting) + len(self._compiling)

    # ---- the step -------------------------------------------------------------------

    def schedule(self) -> GenSchedulerOutput | None:
        self._drain_intake()
        if self.loras is not None:
            self._poll_loras()
        if self.spec_load is not None:
            self._propose()
        out = self.scheduler.schedule()
        if out is None:
            return None
        if not out.seqs and out.stop is StopReason.LORA_LOADING and not out.preempted:
            return None  # nothing runnable until a load ends (has_work waits for it)
        self.num_preemptions += len(out.preempted)
        for seq in out.preempted:  # per preempted sequence: its tokens leave the table
            self.runner.release(seq)
        if not out.seqs:
            raise RuntimeError(f"generation cannot progress ({out.stop.value}) with "
                               f"{self.scheduler.num_unfinished} requests unfinished")
        return out

    def recover_from_oom(self, out: GenSchedulerOutput, align: int) -> list[Sequence]:
        """``out``'s forward ran out of device memory and nothing advanced: return its KV
        slots and shrink the step budget (preempting the newest sequences if the decodes
        alone no longer fit; see ``GenScheduler.shrink_budget``). A step of one token
        cannot shrink: its sequence fails alone with ``RequestOutOfMemoryError``.
        Returns the sequences failed."""
        self.scheduler.undo(out)
        for seq in out.seqs:  # their block tables lost a suffix: write them again
            self.runner.resync(seq)
        failed = []
        if out.num_tokens == 1:
            seq = out.seqs[0]
            self._fail(seq, RequestOutOfMemoryError(seq.num_tokens, 1))
            failed.append(seq)
        for seq in self.scheduler.shrink_budget(out.num_tokens, align):  # newest first
            self.runner.release(seq)
            self.num_preemptions += 1
        return failed

    def postprocess(self, out: GenSchedulerOutput,
                    result: tuple[list[Sequence], SampledTokens | Verified]) -> list[Sequence]:
        """Advance, append tokens, finish; returns the sequences that finished."""
        self.last_spec = None
        if isinstance(result[1], Verified):
            return self._postprocess_verified(out, *result)
        self.scheduler.advance(out)
        samplers, sampled = result
        append = self.processor.append
        return self._settle(samplers, [append(seq, sampled, i)  # per sampling sequence
                                       for i, seq in enumerate(samplers)])

    def _settle(self, samplers: list[Sequence], reasons: list[FinishReason | None]
                ) -> list[Sequence]:
        """Finish the sequences that must (``reasons``), update the others' streams;
        returns the finished ones."""
        finished = []
        for seq, reason in zip(samplers, reasons):  # per sampling sequence, every step
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
            elif seq.on_update is not None:
                seq.on_update(seq)
        return finished

    # ---- speculative decoding --------------------------------------------------------

    def _propose(self) -> None:
        """Set this step's proposals of the running decodes (``Sequence.spec_want``, and
        the n-gram tokens): per sequence, the positions the load rule finds worth
        verifying (``SpecLoad``), within what the request has room for."""
        running = self.scheduler.running
        load = self.spec_load
        k = self.spec_k = load.k_for(len(running))
        if k == 0:
            return
        threshold = load.threshold(len(running))
        ngram, limit = self.ngram, self.max_model_len
        tokens_of = self.runner.state.tokens_of
        for seq in running:  # per running sequence, while speculation is on
            if not seq.is_decode:
                continue
            acc = seq.spec_acceptance
            if acc is None:
                acc = seq.spec_acceptance = Acceptance()
            room = min(k, seq.params.max_tokens - seq.num_output_tokens - 1,
                       limit - seq.num_tokens)
            want = load.positions(acc.value, room, threshold) if room > 0 else 0
            if want and ngram is not None:
                tokens = tokens_of(seq)
                if tokens is None:
                    tokens = np.asarray(seq.token_ids, np.int64)
                seq.spec_tokens = ngram.propose(tokens, want).copy()
                want = len(seq.spec_tokens)
            if want:
                seq.spec_want = want
            else:
                acc.update(0, 0)  # nothing verified this step: its record fades

    def run(self, out: GenSchedulerOutput) -> tuple[list[Sequence], SampledTokens] | None:
        """The step's sampled tokens; None when its forward ran out of device memory.
        With speculation, the step's seconds feed the cost model of the load rule
        (``StepCost``; a draft's proposing steps are timed apart: ``SpecLoad``)."""
        if self.spec_load is None:
            return self.runner.run(out)
        start = time.perf_counter()
        draft = self.draft
        if draft is not None:
            draft.last_steps = 0
        result = self.runner.run(out)
        if result is None:
            return None
        seconds = time.perf_counter() - start
        if draft is not None:  # the draft's proposing steps apart from the target's
            self.spec_load.add_draft_steps(draft.last_seconds, draft.last_steps)
            if draft.last_steps:
                seconds -= draft.last_seconds
        self.spec_load.cost.add(out.num_tokens, seconds)
        return result

    def _postprocess_verified(self, out: GenSchedulerOutput, samplers: list[Sequence],
                              v: Verified) -> list[Sequence]:
        """A speculative step: each sequence appends its accepted proposals and one more
        token (stopping at the first stop rule, as one token at a time would), keeps the
        K/V of its last token and of the accepted proposals it kept, and returns the slots
        of the others."""
        computed = list(out.num_new_tokens)
        reasons: list[FinishReason | None] = []
        at = 0
        for i, seq in enumerate(samplers):  # per sampling sequence, every step
            before, reason = seq.num_tokens, None
            for t in range(at, at + v.counts[i]):  # per emitted token
                reason = self.processor.append(seq, v.sampled, t)
                if reason is not None:
                    break
            at += v.counts[i]
            if i < out.num_decodes:  # samplers[i] is out.seqs[i] for the decodes
                computed[i] = 1 + min(seq.num_tokens - before, v.num_accepted[i])
                if v.num_verified[i]:
                    seq.spec_acceptance.update(v.num_verified[i], v.num_accepted[i])
            reasons.append(reason)
        for seq in self.scheduler.advance(out, computed):  # per sequence that rejected some
            self.runner.state.keep_blocks(seq.seq_id, len(self.blocks.block_table(seq.seq_id)))
        stats = SpecStepStats.of(v.num_verified, v.num_accepted, len(self.spec_proposed))
        if stats.num_proposed:
            self.spec_num_steps += 1
            self.spec_proposed += stats.proposed
            self.spec_accepted += stats.accepted
            self.last_spec = stats
        return self._settle(samplers, reasons)

    def set_speculation_cap(self, cap: int | None) -> None:
        """The cluster's cap on k (0: off; None: the load rule alone)."""
        if self.spec_load is not None:
            self.spec_load.set_cap(cap)

    def check_invariants(self) -> None:
        """No leaked or double-owned KV block; blocks held exactly by running sequences."""
        self.scheduler.check_invariants()
        if self.runner.state.num_rows_used != len(self.scheduler.running):
            raise AssertionError(f"the batch state holds {self.runner.state.num_rows_used} rows "
                                 f"for {len(self.scheduler.running)} running sequences")

    @property
    def token_budget(self) -> int:
        """Tokens one step may hold now (shrinks after an out-of-memory step, regrows)."""
        return self.scheduler.max_num_batched_tokens

    def fail(self, out: GenSchedulerOutput, error: BaseException) -> None:
        """The step's forward raised. Its sequences stay live: ``fail_all``, which the
        engine's death runs first, has ended them."""

    def fail_all(self, error: BaseException) -> None:
        """Abort every unfinished request with ``error`` (engine shutdown or death)."""
        self._drain_intake()
        for seq in list(self._live.values()):  # once per unfinished request
            self._fail(seq, error)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        seq.error = error
        self._finish(seq, FinishReason.ABORT)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.finished:
            return
        self.scheduler.finish(seq, reason)
        self.runner.release(seq)
        self._live.pop(seq.seq_id, None)
        self._compiling.drop(seq)
        if seq.on_update is not None:
            seq.on_update(seq)
        if seq.on_finish is not None:
            seq.on_finish(seq)

    def _poll_loras(self) -> None:
        """Install finished adapter loads; fail the waiting sequences of failed ones."""
        self.loras.poll()
        failed = self.loras.take_failed()
        if failed:
            for seq in [s for s in self.scheduler.waiting if s.lora in failed]:
                self._fail(seq, failed[seq.lora])

    def _drain_intake(self) -> None:
        while self._intake:
            seq = self._intake.popleft()
            if seq.grammar is None:
                self.scheduler.add(seq)
            else:
                self._compiling.hold(seq)
        for seq, error in self._compiling.take_done():  # per sequence whose compile ended
            if error is None:
                self.scheduler.add(seq)
            else:
                self._fail(seq, error)


def _self_check(model_config, spec: KVCacheSpec, device, name: str) -> str | None:
    """Run the ``name`` kernel once on a small random step shaped like this model's
    attention and compare it with the reference; None when it agrees."""
    from worker.attention.triton_check import self_check

    window = getattr(model_config, "sliding_window", None)
    if not isinstance(window, int) or getattr(model_config, "use_sliding_window", True) is False:
        window = None
    return self_check(device, spec.dtype, num_heads=model_config.num_attention_heads,
                      num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                      block_size=spec.block_size, window=window,
                      softcap=attention_softcap(model_config), kv_dtype=spec.storage_dtype)


def _token_list(token_ids, vocab_size: int) -> list[int]:
    from worker.core.request import as_token_array

    arr = as_token_array(token_ids)
    if arr.shape[0] == 0:
        from worker.core.errors import EmptySequenceError

        raise EmptySequenceError()
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        from worker.core.errors import TokenOutOfVocabError

        raise TokenOutOfVocabError(int(arr[bad[0]]), int(bad[0]), vocab_size)
    return arr.tolist()
