"""Choosing the paged-attention backend and the CUDA-graph fallback: a kernel that fails
its start-up self-check, or graphs that fail to capture, never stop an engine; they are
skipped with a warning naming the error."""

from __future__ import annotations

import logging

import pytest
import torch

from worker.attention import paged as pa
from worker.core.config import ConfigError, EngineConfig
from worker.generate.sampling import SamplingParams


def test_cpu_runs_the_reference_unless_triton_is_named():
    assert pa.select_paged_backend("cpu", torch.float32, 16) == "reference"
    assert pa.paged_backend_candidates("cuda", torch.float32, 16) == ["reference"]
    # Under Triton's interpreter (set for the whole test run) the kernel may be named.
    assert pa.select_paged_backend("cpu", torch.float32, 16, "triton") == "triton"


def test_a_kernel_failing_its_self_check_falls_back(caplog):
    caplog.set_level(logging.WARNING, logger="worker.attention.paged")
    checked = []

    def broken(name):
        checked.append(name)
        return "RuntimeError('PTX compile failed')"

    names = pa.paged_backend_candidates("cuda", torch.bfloat16, 16)
    assert names[0] == "triton" and names[-1] == "reference"
    got = pa.select_paged_backend("cuda", torch.bfloat16, 16, self_check=broken)
    assert got == names[1] and checked == ["triton"]
    assert "PTX compile failed" in caplog.text and "'triton'" in caplog.text
    # Named explicitly, it is still checked and still falls back rather than refuse.
    assert pa.select_paged_backend("cuda", torch.bfloat16, 16, "triton", broken) == names[1]
    assert pa.select_paged_backend("cuda", torch.bfloat16, 16,
                                   self_check=lambda name: None) == "triton"


def test_backends_that_cannot_run_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="paged_attention_backend"):
        pa.check_paged_backend("flash_attn", "cpu", torch.float32, 256)
    with pytest.raises(ConfigError, match="paged_attention_backend"):
        EngineConfig(model="m", paged_attention_backend="xformers")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        EngineConfig(model="m", cuda_graphs="yes")
    with pytest.raises(ConfigError, match="kv_block_size"):
        EngineConfig(model="m", paged_attention_backend="triton", kv_block_size=8)


def test_failed_graph_capture_leaves_the_engine_eager(tiny_model, make_engine, caplog):
    """``_capture_graphs`` on a device that cannot capture (here: the CPU, where CUDA
    calls raise) logs a warning and leaves every step eager; generation still works."""
    caplog.set_level(logging.WARNING, logger="worker.generate.generation")
    engine = make_engine(tiny_model("llama"), max_num_batched_tokens=64,
                         max_num_running_seqs=8)
    gen = engine.generation
    gen._capture_graphs((1, 2, 4, 8), reserve=0)
    assert gen.runner.graphs is None and gen.graph_report is None
    assert "CUDA graphs disabled" in caplog.text
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4 and gen.runner.num_graph_steps == 0
