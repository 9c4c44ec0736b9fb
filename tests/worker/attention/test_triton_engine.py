"""The whole generation engine on the Triton paged kernel, run by Triton's interpreter on
CPU: greedy tokens equal HF ``generate`` (prefill chunks after cached prefixes, decodes,
GQA, MQA with a sliding window), with decode steps padded to graph buckets too."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.factories import mixed_lengths, token_lists
from tests.worker._gen_helpers import hf_greedy
from worker.generate.cuda_graphs import DecodeGraphs
from worker.generate.sampling import SamplingParams

PROMPTS = token_lists(mixed_lengths(n=6, longest=40, seed=2), seed=3)
MAX_NEW = 6


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])  # mistral: MQA + window 24
def test_triton_engine_matches_hf(kind, tiny_model, make_engine):
    path = tiny_model(kind)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    engine = make_engine(path, paged_attention_backend="triton", max_num_batched_tokens=32,
                         max_num_running_seqs=8, max_prefill_chunk=16)
    gen = engine.generation
    assert gen.backend == "triton"
    if kind == "llama":  # decode steps padded to buckets, as CUDA graphs run them
        gen.runner.graphs = DecodeGraphs(gen.runner, (1, 2, 4, 8), capture=False)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [o.token_ids for o in outs] == want
    if kind == "llama":
        assert gen.runner.num_graph_steps > 0
