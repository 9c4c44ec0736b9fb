"""MoE experts on grouped_mm equal transformers' per-expert loop (fp32, CPU, tiny random
Mixtral and Qwen3-MoE), and ``install_grouped_experts`` keeps the loop when grouped_mm
is missing, raises or disagrees."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.factories import MOE_DECODERS, token_lists
from tests.worker._hf_reference import next_token_logprobs
from worker.models.moe import GROUPED, LOOP, experts_modules, install_grouped_experts

TOL = 1e-5
NUM_LAYERS = 2  # the factories' depth: every layer is an MoE layer


def _block(family: str, norm_topk_prob: bool = True):
    """One sparse-MoE block (router + 4 experts, top-2) with N(0, 0.1) weights."""
    kwargs = dict(hidden_size=64, num_experts_per_tok=2, intermediate_size=128)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls

        config = AutoConfig.for_model("mixtral", num_local_experts=4, **kwargs)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls

        config = AutoConfig.for_model("qwen3_moe", num_experts=4, moe_intermediate_size=32,
                                      norm_topk_prob=norm_topk_prob, **kwargs)
    torch.manual_seed(0)
    block = cls(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block, config


def _run(module, config, name: str, *args):
    config._experts_implementation = name  # what set_experts_implementation sets
    with torch.inference_mode():
        return module(*args)


@pytest.mark.parametrize("family,norm", [("mixtral", True), ("qwen3_moe", True),
                                         ("qwen3_moe", False)])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 257])
def test_block_matches_loop(family, norm, num_tokens):
    block, config = _block(family, norm)
    hidden = torch.randn(1, num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens))
    want = _run(block, config, LOOP, hidden)
    got = _run(block, config, GROUPED, hidden)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=TOL, rtol=0)
    if num_tokens == 1:  # top-2 of 4: two experts get no row
        _, _, index = block.gate(hidden[0])
        assert index.unique().numel() == 2


@pytest.mark.parametrize("family", MOE_DECODERS)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_experts_with_idle_experts(family, num_tokens):
    """Every row routed to experts 0 and 2: experts 1 and 3 are empty groups."""
    block, config = _block(family)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(num_tokens, 64, generator=gen)
    index = torch.tensor([[0, 2], [2, 0]]).repeat(num_tokens, 1)[:num_tokens]
    weights = torch.rand(num_tokens, 2, generator=gen).softmax(-1)
    want = _run(block.experts, config, LOOP, hidden, index, weights)
    got = _run(block.experts, config, GROUPED, hidden, index, weights)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=TOL, rtol=0)


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                **kwargs).eval()


@pytest.mark.parametrize("kind", MOE_DECODERS)
def test_model_logits_match_loop(kind, tiny_model):
    path = tiny_model(kind)
    loop = _load(path, experts_implementation=LOOP)
    model = _load(path)
    assert install_grouped_experts(model) == NUM_LAYERS
    assert model.config._experts_implementation == GROUPED
    for ids in token_lists([1, 45], seed=2):
        with torch.inference_mode():
            got = model(torch.tensor([ids]), use_cache=False).logits
            want = loop(torch.tensor([ids]), use_cache=False).logits
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", MOE_DECODERS)
def test_engine_matches_unpacked_loop(kind, tiny_model, make_engine):
    """Packed scores (batch 1, T rows of many sequences) and greedy generation (chunked
    prefill, paged decode) with the engine's experts equal transformers' loop."""
    from worker.generate.sampling import SamplingParams

    path = tiny_model(kind)
    loop = _load(path, dtype=torch.float32, experts_implementation=LOOP)
    engine = make_engine(path, max_num_batched_tokens=128, max_num_running_seqs=8)
    lists = token_lists([2, 9, 40, 17, 63, 5], seed=5)
    for ids, got in zip(lists, engine.score(lists), strict=True):
        np.testing.assert_allclose(got, next_token_logprobs(loop, ids), atol=1e-4, rtol=0)
    prompts = token_lists([5, 30], seed=6)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        with torch.inference_mode():
            want = loop.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=None)[0, len(prompt):]
        assert list(out.token_ids) == want.tolist()


def test_bfloat16_on_cpu_passes_the_check(tiny_model):
    model = _load(tiny_model("mixtral"), dtype=torch.bfloat16)
    assert install_grouped_experts(model) == NUM_LAYERS


def test_dense_model_is_left_alone(tiny_model, caplog):
    model = _load(tiny_model("llama"))
    with caplog.at_level(logging.WARNING, logger="worker.models.moe"):
        assert install_grouped_experts(model) == 0
    assert experts_modules(model) == [] and not caplog.records


def _expect_fallback(model, caplog, reason: str) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.models.moe"):
        assert install_grouped_experts(model) == 0
    warnings = [r for r in caplog.records if r.name == "worker.models.moe"]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert model.config._experts_implementation == LOOP
    with torch.inference_mode():  # the loop serves
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]), use_cache=False).logits).all()


def test_unaligned_expert_width_keeps_the_loop(caplog):
    """fp32 rows of 30 floats (120 bytes) break grouped_mm's 16-byte stride rule."""
    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  vocab_size=512, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=30, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    _expect_fallback(model, caplog, "16 bytes")


def test_raising_grouped_mm_keeps_the_loop(tiny_model, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", broken)
    _expect_fallback(_load(tiny_model("mixtral")), caplog, "no kernel for this device")


def test_wrong_grouped_mm_keeps_the_loop(tiny_model, caplog, monkeypatch):
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm",
                        lambda a, b, offs: real(a, b, offs=offs) * 1.01)
    _expect_fallback(_load(tiny_model("qwen3_moe")), caplog, "relative error")


def test_missing_grouped_mm_keeps_the_loop(tiny_model, caplog, monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    monkeypatch.delattr(torch, "_grouped_mm")
    _expect_fallback(_load(tiny_model("mixtral")), caplog, "has no grouped_mm")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MOE_DECODERS)
def test_cuda_bfloat16_grouped_matches_loop(kind, tiny_model):
    path = tiny_model(kind)
    model = _load(path, dtype=torch.bfloat16).to("cuda")
    loop = _load(path, dtype=torch.bfloat16, experts_implementation=LOOP).to("cuda")
    assert install_grouped_experts(model) == NUM_LAYERS
    ids = torch.tensor(token_lists([200], seed=3), device="cuda")
    with torch.inference_mode():
        got = model(ids, use_cache=False).logits.float()
        want = loop(ids, use_cache=False).logits.float()
    assert float((got - want).norm() / want.norm()) < 5e-2  # bf16: near-ties may route apart
