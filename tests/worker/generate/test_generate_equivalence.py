"""Greedy generation is token-identical to HF ``generate`` run on one prompt at a time
(no padding), for mixed prompt lengths, several chunk sizes and forced preemption, on
tiny random Llama, Qwen2 and Mistral (sliding window 24 < the longest prompts) in fp32
on CPU; and to transformers' continuous batching (``generate_batch``) as a second
oracle."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from tests.factories import mixed_lengths, token_lists
from tests.worker._gen_helpers import hf_greedy, with_generation_config
from worker.generate.sampling import SamplingParams

MAX_NEW = 12
PROMPTS = token_lists(mixed_lengths(n=34, longest=100, seed=5), seed=11)  # 1..100 tokens

# (name, engine settings): chunked at 7 and 64 tokens, unlimited (every prompt in one
# forward), and a cache so small (40 blocks of 4 = 160 slots) that requests preempt.
CONFIGS = {
    "chunk7": {"max_num_batched_tokens": 64, "max_num_running_seqs": 16,
               "max_prefill_chunk": 7},
    "chunk64": {"max_num_batched_tokens": 128, "max_num_running_seqs": 16,
                "max_prefill_chunk": 64},
    "unlimited": {"max_num_batched_tokens": 4096, "max_num_running_seqs": 64,
                  "max_prefill_chunk": 0},
    "preempt": {"max_num_batched_tokens": 64, "max_num_running_seqs": 8,
                "max_prefill_chunk": 16, "kv_block_size": 4, "num_kv_blocks": 40},
}


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Per model kind: HF greedy outputs for PROMPTS (computed once)."""
    cache = {}

    def get(kind: str, path=None):
        key = (kind, str(path))
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(path or tiny_model(kind),
                                                         dtype=torch.float32).eval()
            cache[key] = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
        return cache[key]

    return get


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])  # mistral: sliding window
@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_matches_hf_generate(kind, config, tiny_model, make_engine, reference):
    engine = make_engine(tiny_model(kind), **CONFIGS[config])
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    want = reference(kind)
    assert [o.token_ids for o in outs] == want
    assert len(PROMPTS) >= 32
    for o, w in zip(outs, want):
        assert o.finish_reason.value == ("length" if len(w) == MAX_NEW else "stop")
    if config == "preempt":
        assert sum(o.num_preemptions for o in outs) > 0  # the forced preemption happened
    if config == "unlimited":
        assert engine.stats.num_steps <= MAX_NEW + 1  # every prompt prefilled in one step


def test_generation_stops_at_the_models_eos_like_hf(tiny_model, make_engine, reference,
                                                    tmp_path):
    """EOS tokens from the checkpoint's generation config: pick frequent greedy tokens
    as EOS so many requests stop early, in HF and here alike."""
    plain = reference("llama")
    counts = torch.bincount(torch.tensor([t for out in plain for t in out]))
    eos = counts.topk(2).indices.tolist()
    path = with_generation_config(tiny_model("llama"), tmp_path / "eos", eos_token_id=eos)
    want = reference("llama", path)
    assert sum(len(w) < MAX_NEW for w in want) >= 5  # EOS really cuts requests short
    engine = make_engine(path, max_num_batched_tokens=64, max_num_running_seqs=16,
                         max_prefill_chunk=7)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [o.token_ids for o in outs] == want
    for o in outs:
        assert (o.finish_reason.value == "stop") == (o.token_ids[-1] in eos)
    ignoring = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                       ignore_eos=True))
    assert [o.token_ids for o in ignoring] == plain


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate_batch(kind, tiny_model, make_engine):
    """transformers' continuous batching runs on CPU in this version (paged cache,
    sdpa); EOS disabled on both sides so every request makes MAX_NEW tokens."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model(kind), dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=256, page_size=32)
    with torch.inference_mode():
        batch = model.generate_batch(inputs=PROMPTS, generation_config=config,
                                     continuous_batching_config=cb, warmup=False)
    want = [batch[f"req_{i}"].generated_tokens for i in range(len(PROMPTS))]
    engine = make_engine(tiny_model(kind), **CONFIGS["chunk7"])
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                   ignore_eos=True))
    assert [o.token_ids for o in outs] == want
