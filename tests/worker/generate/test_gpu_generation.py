"""Generation on a GPU with the fast path (skipped without CUDA): the Triton paged kernel
passes its self-check and is chosen, decode-only steps replay CUDA graphs, and the
outputs agree with the eager gather path and the reference."""

from __future__ import annotations

import logging

import pytest

from tests.factories import mixed_lengths, token_lists
from worker.generate.sampling import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = token_lists(mixed_lengths(n=64, longest=120, seed=9), seed=10)
BASE = dict(device="cuda", dtype="float16", max_num_batched_tokens=512,
            max_num_running_seqs=64, max_prefill_chunk=128)


def _greedy(engine, max_tokens=32, logprobs=None):
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True, logprobs=logprobs))
    return outs


def test_fast_path_is_chosen_and_graphs_replay(tiny_model, make_engine):
    engine = make_engine(tiny_model("qwen2"), **BASE)
    gen = engine.generation
    assert gen.backend == "triton"
    assert gen.graph_report is not None and gen.runner.graphs is not None
    assert gen.graph_report.buckets[-1] == 64
    _greedy(engine)
    assert gen.runner.num_graph_steps > 20


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_triton_graphs_agree_with_eager_gather(kind, tiny_model, make_engine):
    """Greedy tokens of 64 prompts x 32 tokens: the fast path (Triton + graphs) against the
    old eager gather path; fp16 rounding may flip a near-tie, so >= 90% identical."""
    fast = _greedy(make_engine(tiny_model(kind), **BASE))
    slow = _greedy(make_engine(tiny_model(kind), **BASE, paged_attention_backend="gather",
                               cuda_graphs=False))
    same = sum(a.token_ids == b.token_ids for a, b in zip(fast, slow)) / len(PROMPTS)
    assert same >= 0.9, same


def test_logprobs_agree_with_the_reference_backend(tiny_model, make_engine):
    """The first generated token's top-5 logprobs (one prefill forward each) and the
    next ones (decode steps in graphs) within half-precision tolerance."""
    import torch

    fast = _greedy(make_engine(tiny_model("llama"), **BASE), max_tokens=4, logprobs=5)
    ref = _greedy(make_engine(tiny_model("llama"), **BASE, paged_attention_backend="reference",
                              cuda_graphs=False), max_tokens=4, logprobs=5)
    for a, b in zip(fast, ref):
        if a.token_ids != b.token_ids:
            continue  # a flipped near-tie changes every later position
        for la, lb in zip(a.logprobs, b.logprobs):
            torch.testing.assert_close(torch.tensor([v for _, v in la.top]),
                                       torch.tensor([v for _, v in lb.top]),
                                       atol=2e-2, rtol=2e-2)


def test_graphs_off_means_eager(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), **BASE, cuda_graphs=False)
    _greedy(engine, max_tokens=4)
    assert engine.generation.runner.num_graph_steps == 0
    assert engine.generation.graph_report is None


def test_a_failing_kernel_self_check_falls_back(tiny_model, make_engine, monkeypatch, caplog):
    import worker.attention.triton_check

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(worker.attention.triton_check, "self_check",
                        lambda *a, **k: "broken on purpose")
    engine = make_engine(tiny_model("llama"), **BASE)
    assert engine.generation.backend == "gather"
    assert engine.generation.runner.graphs is None  # graphs need a host-free kernel
    assert "broken on purpose" in caplog.text
    assert len(_greedy(engine, max_tokens=3)[0].token_ids) == 3


def test_a_failing_capture_falls_back(tiny_model, make_engine, monkeypatch, caplog):
    from worker.generate.cuda_graphs import DecodeGraphs

    def boom(self):
        raise RuntimeError("capture failed on purpose")

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(DecodeGraphs, "capture_all", boom)
    engine = make_engine(tiny_model("llama"), **BASE)
    assert engine.generation.backend == "triton" and engine.generation.runner.graphs is None
    assert "capture failed on purpose" in caplog.text
    assert len(_greedy(engine, max_tokens=3)[0].token_ids) == 3


def test_seeded_sampling_is_reproducible_on_cuda(tiny_model, make_engine):
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=i, max_tokens=16)
              for i in range(16)]
    a = make_engine(tiny_model("llama"), **BASE).generate(PROMPTS[:16], params)
    b = make_engine(tiny_model("llama"), **BASE).generate(PROMPTS[:16][::-1], params[::-1])
    assert [o.token_ids for o in a] == [o.token_ids for o in b[::-1]]
