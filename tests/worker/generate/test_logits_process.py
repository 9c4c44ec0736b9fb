"""Logit processors: penalties, logit_bias and min_tokens (worker/generate/logits_process.py).

The processors are checked against a hand-computed example, and the engine against Hugging
Face ``generate``'s own processors (``repetition_penalty``, ``sequence_bias``,
``min_new_tokens``) on the tiny random checkpoints, rows with and without processors in
one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.factories import mixed_lengths, token_lists
from tests.worker._gen_helpers import hf_greedy
from worker.core.errors import InvalidRequestError
from worker.generate import logits_process
from worker.generate.sampling import InvalidSamplingParamsError, SamplingParams, SamplingRows
from worker.generate.sequence import FinishReason

SMALL = {"max_num_batched_tokens": 64, "max_num_running_seqs": 16, "max_prefill_chunk": 16}
PROMPTS = token_lists(mixed_lengths(n=8, longest=40, seed=5), seed=6)
EOS = 2  # the tiny Llama's eos_token_id


def test_processors_against_a_hand_computed_example():
    state = SamplingRows(4)
    state.eos_token_ids = np.array([EOS], np.int64)
    state.set(0, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                                repetition_penalty=2.0), None, prompt_len=3)
    state.set(1, SamplingParams(logit_bias={"5": 100, 8: -1.5}, min_tokens=2,
                                stop_token_ids=[9]), None, prompt_len=2)
    state.set(2, SamplingParams(), None, prompt_len=1)  # no processor: untouched
    tokens = np.zeros((4, 16), np.int64)
    tokens[0, :6] = [1, 4, 4, 4, 7, 4]  # prompt 1 4 4, output 4 7 4
    tokens[1, :3] = [3, 3, 9]  # prompt 3 3, output 9: one token, min_tokens 2
    tokens[2, :2] = [4, 4]
    logits = (torch.arange(10.0) - 5).repeat(3, 1)  # -5 .. 4 in every row
    rows = np.array([0, 1, 2])
    assert logits_process.any_processed(state, rows)
    logits_process.apply(logits, state, rows, tokens, np.array([6, 3, 2]))
    want = torch.arange(10.0) - 5
    # token 1 (prompt only): -4 / 2... negative, so x 2; token 4: -1 x 2 - 0.25 x 3 - 0.5
    # (the output holds it twice... and the prompt once more, which counts for repetition
    # only); token 7: 2 / 2 - 0.25 - 0.5.
    row0 = want.clone()
    row0[1], row0[4], row0[7] = -8.0, -2.0 - 0.25 * 2 - 0.5, 1.0 - 0.25 - 0.5
    assert torch.equal(logits[0], row0)
    row1 = want.clone()
    row1[5], row1[8] = 0 + 100, 3 - 1.5
    row1[EOS] = row1[9] = float("-inf")  # EOS and the stop id, below min_tokens
    assert torch.equal(logits[1], row1)
    assert torch.equal(logits[2], want)
    # Once min_tokens are generated, EOS is free again.
    logits = (torch.arange(10.0) - 5).repeat(1, 1)
    logits_process.apply(logits, state, np.array([1]), tokens, np.array([4]))
    assert logits[0, EOS] == -3 and logits[0, 9] == 4


def test_repetition_penalty_equals_hf_and_leaves_other_rows_alone(tiny_model, make_engine):
    path = tiny_model("llama")
    engine = make_engine(path, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    penalized = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                               repetition_penalty=1.8)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    params = [penalized if i % 2 else plain for i in range(len(PROMPTS))]
    outs = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        kwargs = {"repetition_penalty": 1.8} if p is penalized else {}
        assert out.token_ids == hf_greedy(model, prompt, 12, **kwargs)
    # the penalty did change something (else this test would show nothing)
    assert outs[1].token_ids != engine.generate([PROMPTS[1]], plain)[0].token_ids


def test_logit_bias_of_100_makes_greedy_pick_that_token(tiny_model, make_engine):
    engine = make_engine(tiny_model("qwen2"), **SMALL)
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8,
                                                        ignore_eos=True, logit_bias={77: 100}))
    assert out[0].token_ids == [77] * 8
    sampled = engine.generate([PROMPTS[0]], SamplingParams(
        temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logit_bias={"77": 100}))
    assert sampled[0].token_ids == [77] * 8


def test_logprobs_report_the_raw_distribution(tiny_model, make_engine):
    path = tiny_model("llama")
    engine = make_engine(path, **SMALL)
    base = dict(temperature=0, max_tokens=1, ignore_eos=True, logprobs=4)
    raw = engine.generate([PROMPTS[2]], SamplingParams(**base))[0].logprobs[0]
    biased = engine.generate([PROMPTS[2]], SamplingParams(**base, logit_bias={300: 100},
                                                          repetition_penalty=1.5))[0]
    assert biased.token_ids == [300]
    top = biased.logprobs[0].top
    assert [t for t, _ in top] == [t for t, _ in raw.top]
    assert [v for _, v in top] == pytest.approx([v for _, v in raw.top], abs=1e-5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPTS[2]])).logits[0, -1]
    assert biased.logprobs[0].logprob == pytest.approx(
        float(torch.log_softmax(logits, -1)[300]), abs=1e-4)


def test_min_tokens_suppresses_eos_like_hf_min_new_tokens(tiny_model, make_engine):
    path = tiny_model("llama")
    engine = make_engine(path, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A bias on EOS makes it the greedy choice at once; min_tokens holds it back.
    eager = SamplingParams(temperature=0, max_tokens=12, logit_bias={EOS: 30})
    assert engine.generate([PROMPTS[3]], eager)[0].token_ids == [EOS]
    held = SamplingParams(temperature=0, max_tokens=12, logit_bias={EOS: 30}, min_tokens=5)
    out = engine.generate([PROMPTS[3]], held)[0]
    assert out.finish_reason is FinishReason.STOP and out.token_ids[-1] == EOS
    assert len(out.token_ids) == 6 and EOS not in out.token_ids[:5]
    assert out.token_ids == hf_greedy(model, PROMPTS[3], 12, min_new_tokens=5,
                                      sequence_bias={(EOS,): 30.0}, eos_token_id=EOS)


def test_seeded_penalized_sampling_is_independent_of_the_batch(tiny_model, make_engine):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True,
                            presence_penalty=1.0, frequency_penalty=0.5,
                            repetition_penalty=1.2, logit_bias={5: 2.0})
    prompt = PROMPTS[4]
    alone = make_engine(tiny_model("qwen2"), **SMALL).generate([prompt], params)[0].token_ids
    crowded = make_engine(tiny_model("qwen2"), max_num_batched_tokens=32,
                          max_num_running_seqs=8, max_prefill_chunk=5, kv_block_size=4,
                          num_kv_blocks=40)
    others = [SamplingParams(temperature=0.8, seed=50 + i, max_tokens=12, ignore_eos=True,
                             frequency_penalty=1.5) for i in range(len(PROMPTS) - 1)]
    outs = crowded.generate(PROMPTS[:4] + [prompt] + PROMPTS[5:],
                            others[:4] + [params] + others[4:])
    assert outs[4].token_ids == alone


@pytest.mark.parametrize(("fields", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_processor_settings_name_the_field(fields, field):
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams(**fields)
    assert info.value.field == field


def test_logit_bias_outside_the_vocabulary_is_refused(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), **SMALL)
    with pytest.raises(InvalidRequestError, match="logit_bias") as info:
        engine.generate([PROMPTS[0]], SamplingParams(max_tokens=2, logit_bias={512: 1}))
    assert info.value.setting == "SamplingParams.logit_bias"
