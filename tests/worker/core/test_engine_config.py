"""EngineConfig validation, resolution of None fields, loader decisions, staging layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import MAX_POSITIONS
from worker import Engine, EngineConfig
from worker.core.config import ConfigError
from worker.core.device import CpuDevice
from worker.core.request import Request, Task
from worker.packed.scheduler import Scheduler
from worker.packed.staging import Staging


@pytest.mark.parametrize("field,value", [
    ("model", ""),
    ("device", "gpu"),
    ("dtype", "fp8"),
    ("attention_backend", "xformers"),
    ("max_num_batched_tokens", 0),
    ("max_num_batched_tokens", 100),  # not a multiple of align
    ("max_num_seqs", -1),
    ("max_num_bins_per_step", 0),
    ("align", 0),
    ("max_model_len", 0),
    ("trust_remote_code", "yes"),
])
def test_invalid_fields_are_named(field, value):
    kwargs = {"model": "m", field: value}
    with pytest.raises(ConfigError) as info:
        EngineConfig(**kwargs)
    assert info.value.field == field and f"EngineConfig.{field}" in str(info.value)


def test_cuda_only_backend_on_cpu_is_rejected():
    with pytest.raises(ConfigError, match="attention_backend"):
        EngineConfig(model="m", attention_backend="torch_varlen")


def test_config_is_frozen():
    config = EngineConfig(model="m")
    with pytest.raises(AttributeError):
        config.device = "cuda"


def test_none_fields_resolve_on_cpu(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("llama"))))
    try:
        c = engine.config
        assert c.max_num_batched_tokens == 8192 and c.max_model_len == MAX_POSITIONS
        assert c.dtype == "float32" and c.attention_backend == "reference"
        assert engine.spec.is_decoder and engine.default_pooling.value == "last"
        assert engine.budget_report is None
    finally:
        engine.shutdown()


def test_encoder_loads_as_encoder(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("bert")), max_model_len=64))
    try:
        assert not engine.spec.is_decoder and engine.spec.takes_token_type_ids
        assert engine.default_pooling.value == "mean" and engine.runner.head is None
        assert engine.config.max_model_len == 64
    finally:
        engine.shutdown()


def test_max_model_len_above_positions_is_rejected(tiny_model):
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Engine(EngineConfig(model=str(tiny_model("bert")), max_model_len=4096))


def test_cuda_without_a_gpu_is_a_config_error(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device"):
        Engine(EngineConfig(model=str(tiny_model("llama")), device="cuda"))


def test_bfloat16_on_cpu(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("qwen2")), dtype="bfloat16",
                                 max_num_batched_tokens=64))
    try:
        assert next(engine.runner.model.parameters()).dtype == torch.bfloat16
        out = engine.embed([[1, 2, 3], [4] * 40])
        assert out.dtype == np.float32 and np.isfinite(out).all()
    finally:
        engine.shutdown()


def test_staging_layout_is_one_contiguous_buffer_per_slot():
    staging = Staging(64, 4, CpuDevice(torch.device("cpu")))
    tokens = np.arange(100, 110, dtype=np.int64)
    offsets = np.array([0, 3, 10], dtype=np.int64)
    first = staging.stage(tokens, offsets, np.array([1, 0]))
    buf = staging._slots[first.slot].host
    assert first.input_ids.data_ptr() == buf.data_ptr()  # bin starts at the buffer start
    assert first.position_ids.data_ptr() == buf.data_ptr() + 10 * 8
    assert first.cu_seqlens.data_ptr() == buf.data_ptr() + 20 * 8
    assert first.input_ids.tolist() == [[103, 104, 105, 106, 107, 108, 109, 100, 101, 102]]
    assert first.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]
    assert first.cu_seqlens.dtype == torch.int32 and first.cu_seqlens.tolist() == [0, 7, 10]
    assert first.max_seqlen == 7
    second = staging.stage(tokens, offsets, np.array([0]))
    assert second.slot != first.slot  # double buffered: the first bin is untouched
    assert first.input_ids.shape == (1, 10) and second.input_ids.tolist() == [[100, 101, 102]]
    with pytest.raises(ValueError, match="exceeds the staging buffers"):
        staging.stage(np.zeros(65, np.int64), np.array([0, 65]), np.array([0]))


def test_buffers_are_not_reallocated_per_step(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("llama")), max_num_batched_tokens=64))
    try:
        ptrs = [s.host.data_ptr() for s in engine.staging._slots]
        engine.score([[1] * n for n in range(1, 60, 7)])
        assert [s.host.data_ptr() for s in engine.staging._slots] == ptrs
    finally:
        engine.shutdown()


def test_scheduler_bins_respect_budget_cap_and_step_window():
    scheduler = Scheduler(64, align=16, max_num_seqs=3, max_num_bins_per_step=2)
    lengths = [5, 17, 33, 2, 64, 9, 9, 9, 1, 40, 40]
    for n in lengths:
        scheduler.add(Request(np.ones(n, np.int64), Task.SCORE))
    order = []
    while (out := scheduler.schedule()) is not None:
        aligned = (out.batch.lengths + 15) // 16 * 16
        assert aligned.sum() <= 2 * 64 or len(out.requests) == 1  # the step's token window
        for b in out.batch.bins:
            assert aligned[b].sum() <= 64 and len(b) <= 3
        assert sorted(np.concatenate(out.batch.bins).tolist()) == list(range(len(out.requests)))
        order += [r.num_tokens for r in out.requests]
    assert order == lengths  # FIFO across steps


def test_shrink_budget_clips_long_sequences_into_their_own_bin():
    scheduler = Scheduler(128, align=16, max_num_seqs=0, max_num_bins_per_step=4)
    assert scheduler.shrink_budget(128) == 112  # 90% of the failed bin, aligned down
    assert scheduler.shrink_budget(256) == 112  # a bin from before the shrink: no change
    assert scheduler.shrink_budget(60) == 48
    for n in (100, 3, 4):
        scheduler.add(Request(np.ones(n, np.int64), Task.SCORE))
    out = scheduler.schedule()
    sizes = sorted(int(out.batch.lengths[b].sum()) for b in out.batch.bins)
    assert sizes == [7, 100]
    assert scheduler.shrink_budget(5) == 16  # never below align


def test_cli_embeds_and_scores_token_lines(tiny_model, monkeypatch, capsys):
    import io
    import json

    from worker.__main__ import main

    for task, widths in (("embed", [64, 64]), ("score", [2, 0])):
        monkeypatch.setattr("sys.stdin", io.StringIO("1 2 3\n\n7\n"))
        assert main([task, "--model", str(tiny_model("llama")),
                     "--max-num-batched-tokens", "64"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [len(r) for r in rows] == widths
