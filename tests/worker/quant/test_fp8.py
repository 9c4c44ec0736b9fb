"""FP8 weights: the layer against its definition, every checkpoint format loaded through
``from_pretrained`` as its tool writes it, ``quantization="fp8"`` of an fp32 checkpoint,
tensor parallelism and LoRA on FP8 layers, and every quantization the engine does not
implement refused by name.

Two references. The *emulated* one is the HF model whose linear layers compute exactly
what an FP8 layer defines (dequantized weights, activations rounded to e4m3 with the
same per-token or static scale, fp32 arithmetic): the engine's logprobs equal it within
1e-4, which proves the packed and paged paths and the FP8 layers together. The
*dequantized-weights* one (the issue's reference: weights ``q * s``, activations left in
fp32) differs by the activations' rounding (e4m3 keeps 3 mantissa bits, a bf16 value 7):
greedy tokens equal it wherever its top-2 logit margin is clear.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.factories import make_tiny_checkpoint, token_lists
from tests.quant_factories import dequantized_checkpoint, make_fp8_checkpoint
from tests.worker._hf_reference import load_reference, next_token_logprobs
from worker.core.config import ConfigError, EngineConfig
from worker.engine.engine import Engine
from worker.generate.sampling import SamplingParams
from worker.quant.fp8 import (
    DEQUANT,
    FP8,
    SCALED_MM,
    Fp8Linear,
    check_scaled_mm,
    quantize_weight,
)

PROMPTS = token_lists([5, 23, 40, 9], seed=13)
MAX_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=0)
# the margin comparisons: 8 prompts x 16 tokens, about 1 position in 10 clear at 0.4
MARGIN_PROMPTS = token_lists([5, 23, 40, 9, 14, 31, 3, 27], seed=13)
MARGIN_GREEDY = SamplingParams(temperature=0, max_tokens=16)
# Mixtral: FP8 rounding can flip a token's top-2 experts, which moved a logit by 0.73
# (measured); its margin is 1.0, and fewer positions clear it
MARGIN = {"mixtral": (1.0, 2)}  # kind: (margin, positions at least); others (0.4, 8)
FORMATS = {  # name: make_fp8_checkpoint arguments
    "ct-channel-dynamic": dict(method="compressed-tensors"),
    "ct-tensor-static": dict(method="compressed-tensors", strategy="tensor", static=True),
    "ct-tensor-dynamic": dict(method="compressed-tensors", strategy="tensor"),
    "fbgemm": dict(method="fbgemm_fp8"),
    "modelopt": dict(method="modelopt", kv_scales=True),
}


def _e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the e4m3 grid of ``scale`` (448 = the largest e4m3 value)."""
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


class _Emulated(nn.Module):
    """What an FP8 layer defines, in fp32: ``x`` rounded per token (amax / 448, capped at
    ``ub``) or to a static scale, times the dequantized weight."""

    def __init__(self, weight: torch.Tensor, bias, static: torch.Tensor | None, ub=None):
        super().__init__()
        self.weight, self.bias, self.static, self.ub = weight, bias, static, ub

    def forward(self, x):
        if self.static is not None:
            scale = self.static
        else:
            amax = x.abs().amax(-1, keepdim=True)
            scale = (amax.clamp(max=self.ub) if self.ub else amax) / 448
        return F.linear(_e4m3(x, scale.clamp_min(1e-12)), self.weight, self.bias)


def _emulate(model: nn.Module, layers: dict[str, Fp8Linear]) -> nn.Module:
    """``model`` (an HF reference) with each named Linear computing as its FP8 layer."""
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        ref = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, _Emulated(
            layer.dequantized(), ref.bias, layer.input_scale, layer.activation_scale_ub))
    return model


def _fp8_layers(engine: Engine) -> dict[str, Fp8Linear]:
    return {n: m for n, m in engine.runner.model.named_modules() if isinstance(m, Fp8Linear)}


def _logprobs(out) -> np.ndarray:
    return np.array([t.logprob for t in out.logprobs])


def _clear_matches(reference, prompt, tokens, margin=0.4) -> int:
    """How many of the engine's greedy ``tokens`` sit where ``reference`` (run on the
    same prefix: prompt and the engine's tokens before) has a top-2 logit margin of at
    least ``margin``; asserts each of those is ``reference``'s argmax. (FP8 moves these
    tiny dense models' logprobs by 0.05 on average and 0.2 at most, measured: two logits
    move apart by at most 0.4; Mixtral's routing flips take a larger margin, ``MARGIN``.)"""
    ids = torch.tensor([prompt + tokens])
    with torch.inference_mode():
        logits = reference(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    top = logits.topk(2, dim=-1)
    clear = (top.values[:, 0] - top.values[:, 1]) >= margin
    for i in torch.nonzero(clear).flatten().tolist():
        assert tokens[i] == int(top.indices[i, 0]), (i, tokens)
    return int(clear.sum())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-src")
    return {k: make_tiny_checkpoint(k, root / k) for k in ("llama", "qwen2", "mixtral")}


# ---- the layer ----------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("mode", [SCALED_MM, DEQUANT])
def test_the_layer_computes_its_definition(per_channel, static, mode):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(3, 7, 64, generator=gen) * torch.linspace(0.1, 4, 64)  # uneven columns
    q, scale = quantize_weight(w, per_channel=per_channel)
    assert q.dtype == FP8 and scale.shape == ((48,) if per_channel else ())
    # the weight grid: within half an e4m3 step (2^-4 relative) of w, per channel
    deq = q.float() * (scale[:, None] if per_channel else scale)
    assert float(((deq - w).abs() / w.abs().amax(1, keepdim=True)).max()) <= 2 ** -4
    static_scale = torch.tensor(3.0 / 448) if static else None  # clips x beyond 3
    layer = Fp8Linear(q, scale, b, torch.float32, input_scale=static_scale, mode=mode)
    want = _Emulated(deq, b, static_scale)(x)
    got = layer(x)
    assert got.shape == (3, 7, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and the rounding is real: the layer differs from the unrounded product
    assert float((got - F.linear(x, deq, b)).abs().max()) > 1e-3


def test_scaled_mm_runs_and_passes_its_check_on_this_cpu():
    """torch 2.13's CPU _scaled_mm is the path the CPU tests exercise (the fallback is
    checked by the layer test above)."""
    assert check_scaled_mm(torch.device("cpu"), torch.float32) is None
    assert check_scaled_mm(torch.device("cpu"), torch.bfloat16) is None


def test_the_fbgemm_cap_bounds_a_tokens_scale():
    q, scale = quantize_weight(torch.eye(16))
    layer = Fp8Linear(q, scale, None, torch.float32, activation_scale_ub=2.0)
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 100.0, 1.0  # amax 100, capped at 2: the 100 saturates at 2
    y = layer(x)
    assert float(y[0, 0]) == pytest.approx(2.0, rel=1e-2)
    assert float(y[0, 1]) == pytest.approx(1.0, rel=1e-2)


# ---- checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_checkpoint_loads_and_generates_as_its_definition(fmt, sources, tmp_path):
    """Each format, as its tool writes it, on a tiny Llama: the FP8 layers carry the
    file's scales, and the engine's greedy tokens and logprobs (prefill on the packed
    path, decode on the paged cache) equal the emulated reference's."""
    q = make_fp8_checkpoint(sources["llama"], tmp_path / fmt, **FORMATS[fmt])
    with Engine(EngineConfig(str(q))) as engine:
        layers = _fp8_layers(engine)
        outs = engine.generate(PROMPTS, GREEDY)
        scales = getattr(engine.runner.model, "kv_cache_scales", None)
    assert len(layers) == 2 * 7  # q k v o gate up down, two layers
    assert all(isinstance(m.weight, torch.Tensor) and m.weight.dtype == FP8
               for m in layers.values())
    assert {m.mode for m in layers.values()} == {SCALED_MM}
    static = FORMATS[fmt].get("static") or fmt == "modelopt"
    assert all((m.input_scale is not None) == static for m in layers.values())
    assert all(m.per_channel == (fmt in ("ct-channel-dynamic", "fbgemm"))
               for m in layers.values())
    if fmt == "modelopt":  # the KV-cache scales of every layer are read
        assert scales == {0: pytest.approx((0.05, 0.04)), 1: pytest.approx((0.05, 0.04))}
    ref = _emulate(load_reference(dequantized_checkpoint(q, tmp_path / "deq"), True), layers)
    for prompt, out in zip(PROMPTS, outs):
        want = next_token_logprobs(ref, prompt + out.token_ids)[len(prompt) - 1:]
        np.testing.assert_allclose(_logprobs(out), want, atol=1e-4)
    checked = sum(_clear_matches(ref, p, o.token_ids, margin=1e-3)
                  for p, o in zip(PROMPTS, outs))
    assert checked >= 8


def test_a_checkpoints_kv_scales_reach_the_fp8_kv_cache(sources, tmp_path):
    """ModelOpt's k_scale / v_scale (0.05 / 0.04 in every layer) are the FP8 KV cache's
    scales, not calibrated ones; generation runs on them."""
    q = make_fp8_checkpoint(sources["llama"], tmp_path / "q", "modelopt", kv_scales=True)
    with Engine(EngineConfig(str(q), kv_cache_dtype="fp8")) as engine:
        cache = engine.generation.runner.cache
        outs = engine.generate(PROMPTS[:2], GREEDY)
        engine.check_kv_invariants()
    assert cache.spec.storage_dtype == torch.float8_e4m3fn
    torch.testing.assert_close(cache.scales[:, 0], torch.full_like(cache.scales[:, 0], 0.05))
    torch.testing.assert_close(cache.scales[:, 1], torch.full_like(cache.scales[:, 1], 0.04))
    assert all(len(o.token_ids) == MAX_NEW for o in outs)


@pytest.mark.parametrize("kind", ["qwen2", "mixtral"])
def test_qwen2_and_mixtral_checkpoints(kind, sources, tmp_path):
    """Qwen2 (q/k/v biases) and Mixtral (its per-expert w1/w2/w3 quantized too, which the
    engine dequantizes into transformers' fused experts at load): scores on the packed
    path equal the emulated reference; greedy tokens equal the dequantized-weights
    reference wherever its margin is clear."""
    q = make_fp8_checkpoint(sources[kind], tmp_path / kind, "compressed-tensors")
    deq = dequantized_checkpoint(q, tmp_path / "deq")
    with Engine(EngineConfig(str(q))) as engine:
        layers = _fp8_layers(engine)
        scores = engine.score(PROMPTS)
        outs = engine.generate(MARGIN_PROMPTS, MARGIN_GREEDY)
    assert len(layers) == 2 * (4 if kind == "mixtral" else 7)
    ref = _emulate(load_reference(deq, True), layers)
    for prompt, score in zip(PROMPTS, scores):
        np.testing.assert_allclose(score, next_token_logprobs(ref, prompt), atol=1e-4)
    plain = load_reference(deq, True)
    margin, least = MARGIN.get(kind, (0.4, 8))
    checked = sum(_clear_matches(plain, p, o.token_ids, margin)
                  for p, o in zip(MARGIN_PROMPTS, outs))
    assert checked >= least  # the comparison covered real tokens


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_quantization_fp8_of_an_fp32_checkpoint(kind, sources):
    """``quantization="fp8"``: per-channel weights and per-token activations on every
    decoder-layer Linear (Mixtral's router and experts stay fp32); emulated reference
    within 1e-4; greedy tokens equal the dequantized-weights model where clear."""
    with Engine(EngineConfig(str(sources[kind]), quantization="fp8")) as engine:
        layers = _fp8_layers(engine)
        outs = engine.generate(PROMPTS, GREEDY)
        margin_outs = engine.generate(MARGIN_PROMPTS, MARGIN_GREEDY)
    assert len(layers) == 2 * (4 if kind == "mixtral" else 7)
    assert all(m.per_channel and m.input_scale is None for m in layers.values())
    plain = load_reference(sources[kind], True)
    with torch.no_grad():
        for name, layer in layers.items():
            plain.get_submodule(name).weight.copy_(layer.dequantized())
    margin, least = MARGIN.get(kind, (0.4, 8))
    checked = sum(_clear_matches(plain, p, o.token_ids, margin)
                  for p, o in zip(MARGIN_PROMPTS, margin_outs))
    assert checked >= least
    ref = _emulate(plain, layers)
    for prompt, out in zip(PROMPTS, outs):
        want = next_token_logprobs(ref, prompt + out.token_ids)[len(prompt) - 1:]
        np.testing.assert_allclose(_logprobs(out), want, atol=1e-4)


def test_fp8_with_prefix_caching_chunked_prefill_and_the_fallback(sources, monkeypatch):
    """The same requests with a shared prefix through chunked prefill and prefix-cache
    hits, and again with the fallback forced: the same tokens."""
    prefix = token_lists([48], seed=2)[0]
    prompts = [prefix + p for p in token_lists([3, 11], seed=4)]
    cfg = dict(quantization="fp8", max_prefill_chunk=16, enable_prefix_caching=True)
    with Engine(EngineConfig(str(sources["llama"]), **cfg)) as engine:
        first = engine.generate(prompts[:1], GREEDY)
        second = engine.generate(prompts, GREEDY)
        assert engine.stats.prefix_cache_hits >= 32
        engine.check_kv_invariants()
    monkeypatch.setattr("worker.quant.fp8.check_scaled_mm", lambda d, t: "forced off")
    with Engine(EngineConfig(str(sources["llama"]), **cfg)) as engine:
        assert {m.mode for m in _fp8_layers(engine).values()} == {DEQUANT}
        fallback = engine.generate(prompts, GREEDY)
    assert first[0].token_ids == second[0].token_ids
    assert [o.token_ids for o in second] == [o.token_ids for o in fallback]
    for a, b in zip(second, fallback):
        np.testing.assert_allclose(_logprobs(a), _logprobs(b), atol=1e-4)


def test_lora_on_fp8_layers(sources, tmp_path):
    """An adapter on FP8 q/v projections: its rows add the adapter's delta to the FP8
    base; the base rows are the FP8 model alone."""
    from tests.lora_factories import make_adapter

    adapter = make_adapter(sources["llama"], tmp_path / "a", r=8, targets=("q_proj", "v_proj"),
                           seed=3)
    cfg = EngineConfig(str(sources["llama"]), quantization="fp8",
                       lora_modules=(("a", str(adapter)),))
    with Engine(cfg) as engine:
        both = engine.generate(PROMPTS[:2], GREEDY, lora=["a", None])
    with Engine(EngineConfig(str(sources["llama"]), quantization="fp8")) as engine:
        base = engine.generate(PROMPTS[:2], GREEDY)
    assert both[1].token_ids == base[1].token_ids
    np.testing.assert_allclose(_logprobs(both[1]), _logprobs(base[1]), atol=1e-4)
    assert both[0].token_ids != base[0].token_ids or not np.allclose(
        _logprobs(both[0]), _logprobs(base[0]), atol=1e-3)


def test_two_tensor_parallel_ranks_serve_an_fp8_checkpoint(sources, tmp_path):
    """Static per-tensor scales (the same on both ranks) and per-channel online weights
    cut with their rows: two gloo ranks generate what one rank generates."""
    from tests.worker.models import _tp_rank
    from worker.parallel.launch import free_port

    static = make_fp8_checkpoint(sources["llama"], tmp_path / "static", "compressed-tensors",
                                 strategy="channel", static=True)
    gen = dict(max_num_batched_tokens=64, max_num_running_seqs=8, max_prefill_chunk=16)
    params = [dict(temperature=0, max_tokens=8)] * 2
    jobs = [dict(name="static", path=str(static), config=gen, prompts=PROMPTS[:2],
                 packed=PROMPTS[:2], params=params)]
    out = tmp_path / "tp"
    out.mkdir()
    mp.spawn(_tp_rank.run, args=(2, free_port(), jobs, str(out)), nprocs=2, join=True)
    tp = json.loads((out / "tp.json").read_text())["static"]
    with Engine(EngineConfig(str(static), **gen)) as engine:
        one = engine.generate(PROMPTS[:2], [SamplingParams(**p) for p in params])
        score = engine.score(PROMPTS[:2])
    assert tp["tokens"] == [o.token_ids for o in one]
    for got, want in zip(tp["score"], score):
        np.testing.assert_allclose(got, want, atol=1e-4)


# ---- refusals -------------------------------------------------------------------------

def _with_config(src, dst, qc: dict | None = None, side: dict | None = None):
    shutil.copytree(src, dst)
    if qc is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = qc
        (dst / "config.json").write_text(json.dumps(config))
    if side is not None:
        (dst / "hf_quant_config.json").write_text(json.dumps(side))
    return dst


W4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}
REFUSED = {
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128}, None, "'awq'"),
    "gptq": ({"quant_method": "gptq", "bits": 4}, None, "'gptq'"),
    "bnb": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, "'bitsandbytes'"),
    "block-fp8": ({"quant_method": "fp8", "weight_block_size": [128, 128]}, None,
                  "block-wise FP8"),
    "ct-int4": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                 "config_groups": {"g": {"targets": ["Linear"], "weights": W4}}}, None,
                "pack-quantized"),
    "ct-weight-only": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                        "config_groups": {"g": {"targets": ["Linear"], "weights": {
                            "num_bits": 8, "type": "float", "strategy": "channel"},
                            "input_activations": None}}}, None, "weight-only FP8"),
    "nvfp4": (None, {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4"}},
              "modelopt NVFP4"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unimplemented_quantizations_are_refused_by_name(case, sources, tmp_path):
    qc, side, named = REFUSED[case]
    path = _with_config(sources["llama"], tmp_path / case, qc, side)
    with pytest.raises(ConfigError, match="quantization") as err:
        Engine(EngineConfig(str(path)))
    assert named in str(err.value) and "supported: compressed-tensors FP8" in str(err.value)


def test_fp8_refusals_by_name(sources, tmp_path):
    q = make_fp8_checkpoint(sources["llama"], tmp_path / "q", "compressed-tensors")
    with pytest.raises(ConfigError, match="already compressed-tensors FP8"):
        Engine(EngineConfig(str(q), quantization="int8"))
    bert = make_tiny_checkpoint("bert", tmp_path / "bert")
    with pytest.raises(ConfigError, match="FP8 serves decoders"):
        Engine(EngineConfig(str(bert), quantization="fp8"))
    with pytest.raises(ConfigError, match="quantization: must be one of fp8, int8"):
        EngineConfig(str(q), quantization="awq")
    # a weight stored in bf16 beside a weight_scale: not e4m3, refused
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.bfloat16)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="q_proj.weight is stored as BF16, not F8_E4M3"):
        Engine(EngineConfig(str(bad)))
