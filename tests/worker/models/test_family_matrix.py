"""The family matrix: every family packserve serves reproduces transformers on a tiny
random checkpoint, or it is refused at load (worker/models/families.py, docs/models.md).

Decoders: greedy generation (prompts of 1, 40 and 70 tokens, 70 > the sliding windows of
24; 12 new tokens; chunked prefill of 16 tokens, then decode) on the CPU ``reference``
paged backend and on the Triton kernel under its interpreter equals HF ``generate`` on
each prompt alone; packed scores equal log_softmax of HF's logits. Encoders: packed
mean-pooled embeddings equal HF's per-sequence hidden states. fp32 on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from tests.factories import token_lists
from tests.family_factories import family_names
from tests.worker._gen_helpers import hf_greedy
from tests.worker._hf_reference import hidden_states, next_token_logprobs
from worker import EngineConfig, SamplingParams
from worker.core.config import ConfigError
from worker.models.families import PROVEN, check_proven

DECODERS = family_names("decoder")
ENCODERS = family_names("encoder")
PROMPTS = token_lists([1, 40, 70], seed=21)
MAX_NEW = 12
GEN = dict(max_num_batched_tokens=64, max_num_running_seqs=8, max_prefill_chunk=16)
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_decoder(checkpoint):
    cache = {}

    def get(name: str):
        if name not in cache:
            model = AutoModelForCausalLM.from_pretrained(checkpoint(name), dtype=torch.float32)
            model.eval()
            greedy = [hf_greedy(model, p, MAX_NEW, eos_token_id=None) for p in PROMPTS]
            cache[name] = model, greedy
        return cache[name]

    return get


def test_matrix_covers_exactly_the_proven_families(checkpoint):
    """The registry claims no family the matrix does not build, and the reverse."""
    built = set()
    for name in DECODERS + ENCODERS:
        built.add(json.loads((checkpoint(name) / "config.json").read_text())["model_type"])
    assert built == set(PROVEN)
    kinds = {n: PROVEN[json.loads((checkpoint(n) / "config.json").read_text())["model_type"]]
             .kind for n in DECODERS + ENCODERS}
    assert {n for n, k in kinds.items() if k == "decoder"} == set(DECODERS)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_equals_transformers(name, backend, checkpoint, hf_decoder,
                                               make_engine):
    _, want = hf_decoder(name)
    engine = make_engine(checkpoint(name), paged_attention_backend=backend, **GEN)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [o.token_ids for o in outs] == want
    assert all(len(o.token_ids) == MAX_NEW for o in outs)
    assert engine.stats.num_steps > MAX_NEW  # chunked prefill really chunked, then decode


@pytest.mark.parametrize("name", DECODERS)
def test_packed_scores_equal_transformers(name, checkpoint, hf_decoder, make_engine):
    model, _ = hf_decoder(name)
    lists = token_lists([2, 40, 70, 9], seed=22)
    engine = make_engine(checkpoint(name), max_num_batched_tokens=128)
    for ids, got in zip(lists, engine.score(lists), strict=True):
        np.testing.assert_allclose(got, next_token_logprobs(model, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ENCODERS)
def test_packed_embeddings_equal_transformers(name, checkpoint, make_engine):
    model = AutoModel.from_pretrained(checkpoint(name), attn_implementation="eager",
                                      dtype=torch.float32).eval()
    lists = [[min(max(t, 3), 500) for t in ids]  # clear of pad / special ids
             for ids in token_lists([1, 5, 40, 70], seed=23)]
    engine = make_engine(checkpoint(name), max_num_batched_tokens=128)
    got = engine.embed(lists, pooling="mean")
    for ids, row in zip(lists, got, strict=True):
        np.testing.assert_allclose(row, hidden_states(model, ids).mean(0), atol=TOL, rtol=0)


def test_gemma2_soft_capping_really_bites(checkpoint, hf_decoder):
    """Without the caps transformers itself gives other logits: the matrix's Gemma 2
    entry would catch a backend that ignored them."""
    model, _ = hf_decoder("gemma2")
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        capped = model(input_ids=ids).logits
        model.config.attn_logit_softcapping = None
        model.config.final_logit_softcapping = None
        try:
            plain = model(input_ids=ids).logits
        finally:
            model.config.attn_logit_softcapping = 2.0
            model.config.final_logit_softcapping = 5.0
    assert (capped - plain).abs().max() > 0.1


# ---- refusals --------------------------------------------------------------------------

def _config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def test_a_family_outside_the_matrix_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"'falcon'.*proven decoders: gemma2, .*llama"):
        check_proven(_config("falcon"), allow_untested=False)
    assert check_proven(_config("falcon"), allow_untested=True) == ["model family 'falcon'"]
    assert check_proven(_config("llama"), allow_untested=False) == []


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                   "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 64}])
def test_batch_dependent_rotary_scaling_is_refused(rope):
    config = _config("llama", rope_parameters={"rope_theta": 10000.0, **rope},
                     hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
    with pytest.raises(ConfigError, match=f"rotary scaling {rope['rope_type']}"):
        check_proven(config, allow_untested=False)


def test_qwen_per_layer_windows_and_remote_code_are_refused():
    with pytest.raises(ConfigError, match="use_sliding_window"):
        check_proven(_config("qwen2", use_sliding_window=True), allow_untested=False)
    remote = _config("llama")
    remote.auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    with pytest.raises(ConfigError, match="remote code"):
        check_proven(remote, allow_untested=False, trust_remote_code=True)


def test_engine_refuses_an_unproven_checkpoint_unless_allowed(tmp_path, make_engine, caplog):
    """Through the engine: refused at load naming the family and the setting; with
    ``allow_untested_model`` it loads with one WARNING (Falcon here, which runs)."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=512)).save_pretrained(
        tmp_path)
    with pytest.raises(ConfigError, match="'falcon' is not proven.*allow_untested_model"):
        make_engine(tmp_path).embed([[1, 2, 3]])
    with caplog.at_level("WARNING", logger="worker.models.families"):
        engine = make_engine(tmp_path, allow_untested_model=True)
        assert engine.embed([[1, 2, 3]]).shape == (1, 64)
    warned = [r for r in caplog.records if "has not proven" in r.getMessage()]
    assert len(warned) == 1


def test_engine_config_checks_the_switch():
    with pytest.raises(ConfigError, match="allow_untested_model"):
        EngineConfig(model="x", allow_untested_model="yes")
