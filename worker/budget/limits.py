"""Resolve the engine's size limits: max_model_len, staging capacity, token budget.

The token budget is, in order: ``max_num_batched_tokens`` when set; on CPU
``CPU_DEFAULT_BUDGET`` (rounded down to ``align``); on CUDA the Phase-0 probe
(``worker.budget.probe.measure_budget``) over synthetic packed forwards of the loaded model.
Staging is sized before the probe runs, for the largest budget the probe may return.
"""

from __future__ import annotations

import logging

from worker.core.config import CPU_DEFAULT_BUDGET, ConfigError, EngineConfig

logger = logging.getLogger(__name__)


def resolve_max_model_len(config: EngineConfig, spec) -> int:
    """``max_model_len``, defaulting to (and capped by) ``max_position_embeddings``."""
    limit = spec.max_position_embeddings
    if config.max_model_len is None:
        if limit is None:
            raise ConfigError("max_model_len", "the model config has no "
                              "max_position_embeddings; set max_model_len")
        return int(limit)
    if limit is not None and config.max_model_len > limit:
        raise ConfigError("max_model_len", f"{config.max_model_len} exceeds the model's "
                          f"max_position_embeddings ({limit}); lower it")
    return config.max_model_len


def probe_settings(config: EngineConfig, max_model_len: int):
    from worker.budget.probe import ProbeSettings

    cap = ProbeSettings().max_budget_tokens
    if config.max_num_seqs:  # a bin never holds more than max_num_seqs full-length sequences
        cap = min(cap, max(config.align, config.max_num_seqs * max_model_len // config.align
                           * config.align))
    return ProbeSettings(align=config.align, max_budget_tokens=cap)


def staging_capacity(config: EngineConfig, max_model_len: int) -> tuple[int, int]:
    """(tokens, sequences) one bin may ever hold: the staging buffers' size."""
    if config.max_num_batched_tokens is not None:
        tokens = config.max_num_batched_tokens
    elif config.is_cuda:
        tokens = probe_settings(config, max_model_len).max_budget_tokens
    else:
        tokens = _cpu_default(config.align)
    by_align = tokens // config.align  # every sequence takes >= align tokens of a bin
    return tokens, min(config.max_num_seqs or by_align, by_align)


def resolve_budget(config: EngineConfig, runner, device,
                   max_model_len: int) -> tuple[int, object | None]:
    """(budget, the probe's BudgetReport or None). A tensor-parallel engine probes on CUDA
    through ``worker.engine.memory_plan.probe_over_ranks`` instead."""
    if config.max_num_batched_tokens is not None:
        return config.max_num_batched_tokens, None
    if not config.is_cuda:
        return _cpu_default(config.align), None
    return measure(config, runner, device, max_model_len)


def measure(config: EngineConfig, runner, device, max_model_len: int, *, nvml=None,
             memory=None):
    """The single call site of the Phase-0 probe. ``nvml`` and ``memory``: the readers
    (default: this device's; a tensor-parallel rank 0 passes every rank's,
    ``worker.parallel.probe``)."""
    from worker.budget.nvml import default_reader
    from worker.budget.probe import TorchCudaMemory, measure_budget

    index = device.device.index
    model = runner.model
    report = measure_budget(
        lambda n: runner.run_synthetic(n, min(max_model_len, n)),
        model_config=model.config,
        dtype_bytes=runner.spec.dtype.itemsize,
        nvml=nvml or default_reader(),
        memory=memory or TorchCudaMemory(index),
        device_index=index,
        settings=probe_settings(config, max_model_len),
        parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )
    return report.budget_tokens, report


def _cpu_default(align: int) -> int:
    return max(align, CPU_DEFAULT_BUDGET // align * align)
