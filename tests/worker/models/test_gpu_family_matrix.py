"""The family matrix on a GPU (skipped without one): every decoder entry generates on
each paged backend that can run there, in bfloat16, and every generated token is
transformers' best next token (fp32, the same GPU) up to bf16 near-ties; packed scores
(the torch_varlen / flash_attn prefill) agree with HF's to bf16 tolerance. Tokens are not
compared one for one: in bf16 two near-tied candidates can swap, and a swapped token
changes everything after it without anything being wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.factories import token_lists
from tests.family_factories import family_names
from worker import SamplingParams

pytestmark = pytest.mark.gpu

DECODERS = family_names("decoder")
PROMPTS = token_lists([1, 40, 70], seed=21)
MAX_NEW = 12
NEAR_TIE = 0.15  # nats: bf16 logits of these tiny models differ from fp32 by ~0.01-0.05
SCORE_TOL = 0.1


def _backends() -> list[str]:
    from worker.attention.paged import paged_backend_candidates

    if not torch.cuda.is_available():
        return ["triton"]  # collected for the skip only
    names = paged_backend_candidates("cuda", torch.bfloat16, 16)
    return [n for n in names if n != "reference"]


@pytest.fixture(scope="module")
def hf_cuda(checkpoint):
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(
                checkpoint(name), dtype=torch.float32, attn_implementation="eager").cuda().eval()
        return cache[name]

    return get


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", DECODERS)
def test_gpu_greedy_tokens_are_transformers_best(name, backend, checkpoint, hf_cuda,
                                                 make_engine):
    from worker.attention.paged import SOFTCAP_BACKENDS

    if name == "gemma2" and backend not in SOFTCAP_BACKENDS:
        pytest.skip(f"{backend} cannot soft-cap; the engine never selects it for Gemma 2")
    engine = make_engine(checkpoint(name), device="cuda", dtype="bfloat16",
                         paged_attention_backend=backend, max_num_batched_tokens=64,
                         max_num_running_seqs=8, max_prefill_chunk=16)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    model = hf_cuda(name)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert len(out.token_ids) == MAX_NEW
        ids = torch.tensor([prompt + out.token_ids], device="cuda")
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        rows = logp[len(prompt) - 1: len(prompt) - 1 + MAX_NEW]
        picked = rows.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        gap = (rows.max(-1).values - picked).max().item()
        assert gap <= NEAR_TIE, f"{name}/{backend}: a token {gap:.3f} nats below HF's best"


@pytest.mark.parametrize("name", DECODERS)
def test_gpu_packed_scores_match_transformers(name, checkpoint, hf_cuda, make_engine):
    lists = token_lists([2, 40, 70, 9], seed=22)
    engine = make_engine(checkpoint(name), device="cuda", dtype="bfloat16",
                         max_num_batched_tokens=128)
    model = hf_cuda(name)
    for ids, got in zip(lists, engine.score(lists), strict=True):
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids], device="cuda"))
                                     .logits[0].float(), -1)
        want = logp[:-1].gather(1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0]
        np.testing.assert_allclose(got, want.cpu().numpy(), atol=SCORE_TOL, rtol=0)
