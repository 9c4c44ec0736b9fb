"""One memory plan per engine, computed at start; every consumer reads it.

What an engine takes of its device, in the order it is decided:

| number                  | from                                                     |
|-------------------------|----------------------------------------------------------|
| ``max_model_len``       | the config, capped by the model's positions (``worker.budget.limits``) |
| staging (tokens, seqs)  | the largest bin the budget may ever allow                |
| ``token_budget``        | the configured budget, or the Phase-0 probe (CUDA; under TP driven by rank 0 and measured on every rank, ``worker.parallel.probe``); the smallest over the ranks; lowered to the generation step budget when the probe measured it (the KV cache takes the rest) |
| ``generation``          | the generation settings (step budget, block size, ...) of a causal LM |
| ``kv``                  | the paged backend, the KV blocks (the smallest over the ranks; counted in the cache's storage dtype, so ``kv_cache_dtype="fp8"`` holds 2x a bf16 model's; with a speculative draft model, each block's bytes include the draft cache's block) and the CUDA graphs' reserve (``worker.generate.generation.plan_kv``) |
| ``capacity_tokens``     | what admission leases against: the KV cache's tokens, or for a pooled-only model ``EMBED_STEPS_IN_FLIGHT`` steps of full bins |

Nothing is allocated here but the probe's forwards: the KV cache is allocated when
generation is first used, with exactly ``kv.num_blocks`` blocks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from worker.budget.limits import measure, probe_settings, resolve_budget
from worker.core.config import ConfigError, EngineConfig
from worker.generate.generation import GenerationSettings, KVPlan, plan_kv
from worker.parallel.probe import GroupMemory, GroupNvml, RankMemory, follow_probe

logger = logging.getLogger(__name__)

EMBED_STEPS_IN_FLIGHT = 2  # a pooled-only replica's capacity: this many steps of full bins
FOLLOWER_BUDGET = 1 << 62  # a follower's part of the agreement on rank 0's probed budget


@dataclass(frozen=True)
class MemoryPlan:
    max_model_len: int
    staging_tokens: int
    staging_seqs: int
    probed_budget: int  # tokens per bin before generation takes its share (the config's)
    token_budget: int  # tokens per pooled bin
    budget_report: object | None  # the probe's BudgetReport (None: configured)
    num_ranks: int
    max_num_bins_per_step: int
    generation: GenerationSettings | None = None  # a causal LM's
    kv: KVPlan | None = None
    generation_error: ConfigError | None = None  # why this causal LM cannot generate as
    #   configured (a pooled-only config, say); raised when generation is first used

    @property
    def capacity_tokens(self) -> int:
        """What admission and the router reserve against on this engine."""
        if self.kv is not None:
            return self.kv.capacity_tokens
        return EMBED_STEPS_IN_FLIGHT * self.max_num_bins_per_step * self.token_budget


def plan_memory(config: EngineConfig, runner, device, executor, *, max_model_len: int,
                staging: tuple[int, int], draft=None) -> MemoryPlan:
    """The plan of an engine whose model is loaded (``runner``: its packed runner, for the
    probe) and staged (``staging``: the buffers' tokens and sequences); ``draft``: the
    speculative draft model, whose KV cache takes a block per block of the target's."""
    tp = executor.tp
    probed_over_ranks = (tp is not None and config.is_cuda
                         and config.max_num_batched_tokens is None)
    if probed_over_ranks:
        sender = executor.attach(runner) if tp.rank == 0 else None
        budget, report = probe_over_ranks(config, runner, device, tp, sender,
                                          max_model_len=max_model_len)
    else:
        budget, report = resolve_budget(config, runner, device, max_model_len)
    budget = executor.agree(budget)
    spec = runner.spec
    plan = MemoryPlan(max_model_len, *staging, budget, budget, report, executor.num_ranks,
                      config.max_num_bins_per_step)
    if not spec.is_decoder or spec.is_classifier:
        return plan
    # a follower took part in rank 0's measured probe: its generation settings are rank 0's
    measured = probed_over_ranks or getattr(report, "source", None) == "measured"
    resolved = dataclasses.replace(config, max_num_batched_tokens=budget,
                                   max_model_len=max_model_len)
    try:
        settings = GenerationSettings.from_config(resolved, device.device.type, spec.dtype,
                                                  measured)
        kv = plan_kv(runner.model, device, settings, max_model_len=max_model_len,
                     report=report, agree=executor.agree if executor.tp is not None else None,
                     draft=draft)
    except ConfigError as exc:
        return dataclasses.replace(plan, generation_error=exc)
    pooled = budget
    if measured and budget > settings.max_num_batched_tokens:
        logger.info("generation: pooled token budget %d -> %d (the KV cache takes the rest)",
                    budget, settings.max_num_batched_tokens)
        pooled = settings.max_num_batched_tokens
    return dataclasses.replace(plan, token_budget=pooled, generation=settings, kv=kv)


def probe_over_ranks(config: EngineConfig, runner, device, tp, sender, *, max_model_len: int,
                     nvml=None, memory=None) -> tuple[int, object | None]:
    """The Phase-0 probe of a tensor-parallel engine, every rank measured
    (``worker.parallel.probe``): rank 0 (``sender``: its step sender, already its packed
    runner's) drives it and returns the budget and report; a follower answers and returns
    ``FOLLOWER_BUDGET``, which the agreement over the ranks then drops. ``nvml`` and
    ``memory``: this rank's readers (default: its device's)."""
    from worker.budget.nvml import default_reader
    from worker.budget.probe import TorchCudaMemory

    index = device.device.index or 0
    local = RankMemory(memory or TorchCudaMemory(index), nvml or default_reader(), index)
    if tp.rank != 0:
        follow_probe(runner, tp, local)
        return FOLLOWER_BUDGET, None
    cap = probe_settings(config, max_model_len).utilization_cap
    budget, report = measure(config, runner, device, max_model_len,
                             nvml=GroupNvml(sender, local, cap),
                             memory=GroupMemory(sender, local))
    sender.end_probe()
    return budget, report
