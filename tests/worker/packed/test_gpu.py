"""CUDA-only checks: varlen backends against the reference, the packed model on the GPU,
pinned staging with one side-stream copy per bin, and the Phase-0 probe path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import mixed_lengths, token_lists
from tests.worker._attention_cases import dense_truth, module, packed_qkv
from worker import Engine, EngineConfig, attention

pytestmark = pytest.mark.gpu

LENGTHS = [1, 7, 33, 16, 2, 129, 50, 300]
BF16_REL = 2e-2


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm())


def _backend(name):
    if name == "flash_attn" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed")
    if name == "torch_varlen" and not attention.torch_varlen_available():
        pytest.skip(f"torch {torch.__version__} has no varlen_attn")
    return attention._FUNCTIONS[name]


@pytest.mark.parametrize("name", ["torch_varlen", "flash_attn"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_backend_matches_reference_bf16(name, causal, kv_heads):
    fn = _backend(name)
    q, k, v, cu = packed_qkv(LENGTHS, kv_heads=kv_heads, head_dim=64, dtype=torch.bfloat16,
                             device="cuda")
    kwargs = dict(scaling=64 ** -0.5, dropout=0.0, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    out, _ = fn(module(causal), q, k, v, None, **kwargs)
    ref, _ = attention.reference_attention(module(causal), q, k, v, None, **kwargs)
    assert out.shape == ref.shape == (1, sum(LENGTHS), 8, 64)
    assert _rel(out, ref) < BF16_REL
    assert _rel(out, dense_truth(q, k, v, cu, causal, 64 ** -0.5)) < BF16_REL


@pytest.mark.parametrize("name", ["torch_varlen", "flash_attn"])
def test_varlen_backend_sliding_window(name):
    fn = _backend(name)
    q, k, v, cu = packed_qkv(LENGTHS, kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                             device="cuda", seed=1)
    kwargs = dict(scaling=0.1, sliding_window=24, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    try:
        out, _ = fn(module(True), q, k, v, None, **kwargs)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    assert _rel(out, dense_truth(q, k, v, cu, True, 0.1, sliding_window=24)) < BF16_REL


def _engine(path, backend, **kw):
    return Engine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16",
                               attention_backend=backend, max_num_batched_tokens=256, **kw))


@pytest.mark.parametrize("kind", ["llama", "mistral", "bert"])
def test_packed_model_on_cuda_torch_varlen_equals_reference(kind, tiny_model):
    if not attention.torch_varlen_available():
        pytest.skip("no varlen_attn in this torch")
    lists = token_lists(mixed_lengths(40, longest=120), seed=41)
    fast, slow = _engine(tiny_model(kind), "torch_varlen"), _engine(tiny_model(kind), "reference")
    try:
        assert fast.config.attention_backend == "torch_varlen"
        got, want = fast.embed(lists, pooling="mean"), slow.embed(lists, pooling="mean")
        assert _rel(torch.from_numpy(got), torch.from_numpy(want)) < BF16_REL
        if kind != "bert":
            got_s, want_s = fast.score(lists), slow.score(lists)
            flat = [torch.from_numpy(np.concatenate(x)) for x in (got_s, want_s)]
            assert _rel(*flat) < BF16_REL
    finally:
        fast.shutdown()
        slow.shutdown()


def test_cuda_fp32_reference_matches_cpu(tiny_model):
    lists = token_lists(mixed_lengths(30), seed=42)
    cpu = Engine(EngineConfig(model=str(tiny_model("qwen2")), max_num_batched_tokens=128))
    gpu = Engine(EngineConfig(model=str(tiny_model("qwen2")), device="cuda", dtype="float32",
                              max_num_batched_tokens=128))
    try:
        assert gpu.config.attention_backend == "reference"
        for a, b in zip(cpu.score(lists), gpu.score(lists), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
    finally:
        cpu.shutdown()
        gpu.shutdown()


def test_pinned_staging_one_side_stream_copy_per_bin(tiny_model):
    engine = _engine(tiny_model("llama"), "auto")
    try:
        for slot in engine.staging._slots:
            assert slot.host.is_pinned() and slot.dev.is_cuda
        assert engine.device.copy_stream() != torch.cuda.current_stream()
        lists = token_lists(mixed_lengths(40, longest=120), seed=43)
        want = engine.score(lists)  # warm-up
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            got = engine.score(lists)
        bins = engine.stats.num_bins // 2
        copies = [e for e in prof.events() if "Memcpy HtoD" in e.name]
        pinned = [e for e in copies if "Pinned" in e.name]
        assert len(pinned) >= bins, [e.name for e in copies]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    finally:
        engine.shutdown()


def test_probe_sets_the_budget_on_cuda(tiny_model):
    engine = Engine(EngineConfig(model=str(tiny_model("llama")), device="cuda",
                                 dtype="bfloat16"))
    try:
        report = engine.budget_report
        assert report is not None and report.source == "measured"
        assert engine.config.max_num_batched_tokens == report.budget_tokens >= 16
        assert engine.staging.max_num_tokens >= report.budget_tokens
        out = engine.embed(token_lists([5, 100, 250], seed=44))
        assert np.isfinite(out).all()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_launching_a_bin_never_waits_for_the_gpu(kind, tiny_model):
    """Stage + forward + pooling/scoring enqueue work without a host sync, so the host
    fills the next bin while the device runs this one. Only _gather reads back."""
    if not attention.torch_varlen_available():
        pytest.skip("no varlen_attn in this torch")
    from worker.core.request import OutputMode
    from worker.packed.scheduler import StepBatch

    engine = _engine(tiny_model(kind), "torch_varlen")
    try:
        lists = token_lists([5, 60, 1, 120, 33], seed=45)
        engine.embed(lists)  # warm-up: first calls may initialise lazily
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        mode = OutputMode.MEAN if kind == "bert" else OutputMode.SCORE
        modes = np.full(len(lists), mode, np.int8)
        modes[0] = OutputMode.LAST
        batch = StepBatch(np.concatenate(lists).astype(np.int64), offsets, modes,
                          [np.arange(len(lists))])
        with torch.inference_mode():
            engine.runner._run_bin(batch, batch.bins[0])  # both slots used once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = engine.runner._run_bin(batch, batch.bins[0])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert out.pooled and (out.logprobs is not None) == (kind != "bert")
    finally:
        engine.shutdown()


def test_real_cuda_oom_splits_shrinks_and_lives_on(tmp_path):
    """A genuine allocator OOM (memory capped for this process) takes the split path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
    )).save_pretrained(tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), device="cuda",
                                 max_num_batched_tokens=65536))
    rng = np.random.default_rng(46)
    lists = [rng.integers(0, 32000, size=int(n)).tolist() for n in rng.integers(50, 2000, 120)]
    try:
        want = engine.score(lists)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = torch.cuda.memory_allocated() + (1 << 30)  # 1 GiB over the weights
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            got = engine.score(lists)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        stats = engine.stats
        assert stats.num_oom >= 1 and stats.token_budget < 65536, stats
        assert stats.num_requests_failed == 0 and engine.is_alive()
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-2, rtol=0)
    finally:
        engine.shutdown()
