"""LoRA adapters in the engine: rows of several adapters and of the base model in one
batch equal PEFT's merged models, slots evict and reload, the prefix cache never shares
KV across adapters, and every adapter the engine cannot serve is refused by name."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch

from tests.factories import DECODERS, make_tiny_checkpoint, token_lists
from tests.lora_factories import ALL_LINEAR, make_adapter, merged_model
from tests.worker._gen_helpers import add_word_tokenizer, hf_greedy
from tests.worker._hf_reference import load_reference, next_token_logprobs
from worker.core.config import ConfigError, EngineConfig
from worker.core.errors import InvalidRequestError
from worker.engine.engine import Engine
from worker.generate.sampling import SamplingParams
from worker.lora.adapter import LoRAError
from worker.lora.manager import AdapterInUseError

MAX_NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)
# Three adapters that differ in rank, targets and scaling rule.
ADAPTERS = {
    "qv8": dict(r=8, alpha=16, targets=("q_proj", "v_proj"), seed=1),
    "all16": dict(r=16, alpha=8, targets=ALL_LINEAR, seed=2, use_rslora=True),
    "mlp4": dict(r=4, alpha=4, targets=("gate_proj", "up_proj", "down_proj", "o_proj"), seed=3,
                 rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(kind) -> (base, {name: adapter dir}, {name | None: oracle model})``."""
    cache = {}

    def get(kind):
        if kind not in cache:
            d = tmp_path_factory.mktemp(f"lora-{kind}")
            base = add_word_tokenizer(make_tiny_checkpoint(kind, d / "base"))
            paths = {n: make_adapter(base, d / n, **kw) for n, kw in ADAPTERS.items()}
            refs = {n: merged_model(base, p) for n, p in paths.items()}
            refs[None] = load_reference(base, True)
            cache[kind] = base, paths, refs
        return cache[kind]

    return get


def _engine(base, paths, **kw) -> Engine:
    return Engine(EngineConfig(str(base), lora_modules=tuple((n, str(p)) for n, p in paths.items()),
                               **kw))


@pytest.mark.parametrize("kind", DECODERS)
def test_mixed_batch_equals_peft_merged(family, kind):
    """One generate call (one batch: prefills packed together, then decodes) with rows of
    three adapters and the base model; each row's greedy tokens equal its oracle's."""
    base, paths, refs = family(kind)
    prompts = token_lists([5, 17, 30, 9, 40, 3, 22, 12], seed=3)
    loras = ["qv8", None, "all16", "mlp4", "all16", None, "qv8", "mlp4"]
    with _engine(base, paths) as engine:
        outs = engine.generate(prompts, GREEDY, lora=loras)
        assert engine.generation.runner.num_lora_steps > 0
        engine.check_kv_invariants()
    for prompt, lora, out in zip(prompts, loras, outs):  # per row
        assert out.token_ids == hf_greedy(refs[lora], prompt, MAX_NEW), (kind, lora)
    # the adapters do change the output (else the test proves nothing)
    assert len({tuple(o.token_ids) for o in outs[:4]}) == 4


def test_logprobs_equal_peft(family):
    """The logprobs of an adapter's sampled tokens equal the merged model's within 1e-4."""
    base, paths, refs = family("llama")
    prompts = token_lists([11, 26], seed=5)
    loras = ["all16", "mlp4"]
    with _engine(base, paths) as engine:
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, logprobs=0),
                               lora=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        want = next_token_logprobs(refs[lora], prompt + out.token_ids)[len(prompt) - 1:]
        got = np.array([t.logprob for t in out.logprobs])
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_lm_head_adapter(tmp_path, family):
    """An adapter on the LM head: its rows' head runs the LoRA (on the sampled rows)."""
    base, _, _ = family("qwen2")
    path = make_adapter(base, tmp_path / "head", r=4, targets=("q_proj", "lm_head"), seed=9,
                        scale=0.5)
    oracle = merged_model(base, path)
    prompts = token_lists([7, 19], seed=6)
    with _engine(base, {"head": path}) as engine:
        outs = engine.generate(prompts, GREEDY, lora=["head", None])
    assert outs[0].token_ids == hf_greedy(oracle, prompts[0], MAX_NEW)
    assert outs[1].token_ids == hf_greedy(load_reference(base, True), prompts[1], MAX_NEW)


def test_more_adapters_than_slots(tmp_path, family):
    """Six adapters through two slots, requests interleaved and concurrent: every request
    finishes with its own adapter's tokens; slots were evicted and reloaded (from the host
    tier, one host slot short of all six, and from disk)."""
    base, _, _ = family("llama")
    names = [f"a{i}" for i in range(6)]
    paths = {n: make_adapter(base, tmp_path / n, r=4 + 2 * i, seed=20 + i)
             for i, n in enumerate(names)}
    oracles = {n: merged_model(base, p) for n, p in paths.items()}
    prompts = token_lists([6 + 3 * i for i in range(12)], seed=8)
    loras = [names[i % 6] for i in range(12)]

    async def run(engine):
        return await asyncio.gather(*[engine.generate_async([p], GREEDY, lora=lora)
                                      for p, lora in zip(prompts, loras)])

    with _engine(base, paths, max_loras=2, max_cpu_loras=5) as engine:
        outs = [o[0] for o in asyncio.run(run(engine))]
        state = engine.lora_state()
        engine.check_kv_invariants()
        assert engine.loras.num_pinned == 0
    assert state["num_evictions"] >= 4 and state["num_loads"] >= 6
    assert len(state["resident"]) == 2
    for prompt, lora, out in zip(prompts, loras, outs):
        assert out.token_ids == hf_greedy(oracles[lora], prompt, MAX_NEW), lora


def test_prefix_cache_is_salted_by_adapter(family):
    """The same 40-token prompt (two full blocks) as the base model, then an adapter, then
    the base again: each sees its own KV (a shared cache would give the adapter the base
    model's K/V), and the base's second run hits its own cached blocks."""
    base, paths, refs = family("llama")
    prompt = token_lists([40], seed=11)[0]
    with _engine(base, paths, enable_prefix_caching=True) as engine:
        first = engine.generate([prompt], GREEDY)[0]
        lora = engine.generate([prompt], GREEDY, lora="all16")[0]
        again = engine.generate([prompt], GREEDY)[0]
        lora_again = engine.generate([prompt], GREEDY, lora="all16")[0]
    assert lora.num_cached_tokens == 0
    assert again.num_cached_tokens == 32 and lora_again.num_cached_tokens == 32
    assert first.token_ids == again.token_ids == hf_greedy(refs[None], prompt, MAX_NEW)
    assert lora.token_ids == lora_again.token_ids == hf_greedy(refs["all16"], prompt, MAX_NEW)


def test_sampling_features_with_adapters(family):
    """Penalties, seeded sampling and logit_bias run on an adapter's rows: the penalised
    greedy tokens equal HF's with the same penalty on the merged model, seeded sampling
    repeats, and a +100 bias wins every step. (Guided decoding with an adapter: the HTTP
    test, which has a tokenizer llguidance reads.)"""
    base, paths, refs = family("llama")
    prompt = token_lists([13], seed=12)[0]
    with _engine(base, paths) as engine:
        penal = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                         repetition_penalty=1.5),
                                lora="qv8")[0]
        seeded = [engine.generate([prompt] * 2, SamplingParams(max_tokens=8, seed=7),
                                  lora="mlp4") for _ in range(2)]
        biased = engine.generate([prompt], SamplingParams(
            temperature=0, max_tokens=5, logit_bias=((77, 100.0),), ignore_eos=True),
            lora="all16")
    assert penal.token_ids == hf_greedy(refs["qv8"], prompt, MAX_NEW, repetition_penalty=1.5)
    assert [o.token_ids for o in seeded[0]] == [o.token_ids for o in seeded[1]]
    assert biased[0].token_ids == [77] * 5


def test_add_and_remove_at_runtime(tmp_path, family):
    base, paths, refs = family("llama")
    prompt = token_lists([9], seed=13)[0]
    with Engine(EngineConfig(str(base), enable_lora=True)) as engine:
        with pytest.raises(LoRAError, match="no adapter of that name"):
            engine.generate([prompt], GREEDY, lora="qv8")
        engine.add_lora("qv8", str(paths["qv8"]))
        engine.add_lora("qv8", str(paths["qv8"]))  # the same again: a no-op
        with pytest.raises(LoRAError, match="the name is taken") as taken:
            engine.add_lora("qv8", str(paths["all16"]))
        assert taken.value.setting == "lora_name"
        assert engine.generate([prompt], GREEDY, lora="qv8")[0].token_ids == \
            hf_greedy(refs["qv8"], prompt, MAX_NEW)

        # a request of it queued (no step loop runs here, so it stays unfinished):
        # unloading is refused until it ends
        gen = engine.generation
        seq = gen.make_sequence(prompt, GREEDY, "qv8")
        gen.submit(seq)
        with pytest.raises(AdapterInUseError, match="1 unfinished requests"):
            engine.remove_lora("qv8")
        assert engine.abort(seq.seq_id)
        engine.remove_lora("qv8")
        assert engine.lora_state()["registered"] == []
        with pytest.raises(LoRAError, match="no adapter of that name"):
            engine.remove_lora("qv8")
        engine.check_kv_invariants()


def test_a_load_that_fails_fails_its_requests(tmp_path, family):
    """An adapter whose weights vanish after it was registered: its requests fail with the
    reader's error, the base model's run on."""
    base, paths, refs = family("llama")
    gone = tmp_path / "gone"
    shutil.copytree(paths["qv8"], gone)
    prompt = token_lists([9], seed=14)[0]
    with _engine(base, {"gone": gone}) as engine:
        (gone / "adapter_model.safetensors").unlink()

        async def run():
            return await asyncio.gather(engine.generate_async([prompt], GREEDY, lora="gone"),
                                        engine.generate_async([prompt], GREEDY),
                                        return_exceptions=True)

        bad, good = asyncio.run(run())
        assert isinstance(bad, Exception) and "adapter_model.safetensors" in str(bad)
        assert good[0].token_ids == hf_greedy(refs[None], prompt, MAX_NEW)
        engine.check_kv_invariants()


def _edit_config(src, dst, **fields):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("case, setting, words", [
    ("missing", "lora_path", "no directory"),
    ("no_config", "lora_path", "adapter_config.json is missing"),
    ("bin", "lora_path", "adapter_model.bin is a pickle"),
    ("rank", "max_lora_rank", r"rank 16 \(module"),
    ("dora", "use_dora", "DoRA"),
    ("bias", "bias", "trained biases"),
    ("modules_to_save", "modules_to_save", "modules_to_save"),
    ("not_lora", "peft_type", "peft_type must be LORA"),
    ("other_base", "lora_path", "an adapter of another model"),
    ("embedding", "target_modules", "embedding LoRA"),
])
def test_refused_adapters(tmp_path, family, case, setting, words):
    base, paths, _ = family("llama")
    src, dst = paths["all16"], tmp_path / case
    if case == "missing":
        dst = tmp_path / "nowhere"
    elif case == "no_config":
        shutil.copytree(src, dst)
        (dst / "adapter_config.json").unlink()
    elif case == "bin":
        shutil.copytree(src, dst)
        (dst / "adapter_model.safetensors").rename(dst / "adapter_model.bin")
    elif case == "rank":
        dst = src
    elif case in ("dora", "bias", "modules_to_save", "not_lora"):
        value = {"dora": {"use_dora": True}, "bias": {"bias": "lora_only"},
                 "modules_to_save": {"modules_to_save": ["lm_head"]},
                 "not_lora": {"peft_type": "IA3"}}[case]
        dst = _edit_config(src, dst, **value)
    elif case == "other_base":
        from transformers import LlamaConfig, LlamaForCausalLM

        narrow = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=512))
        narrow.save_pretrained(tmp_path / "other")
        dst = make_adapter(tmp_path / "other", dst, r=4, targets=("o_proj",), seed=1)
    elif case == "embedding":
        dst = make_adapter(base, dst, r=4, targets=("embed_tokens",), seed=1)
    with Engine(EngineConfig(str(base), enable_lora=True, max_lora_rank=8)) as engine:
        with pytest.raises(LoRAError, match=words) as err:
            engine.add_lora("x", str(dst))
        assert err.value.setting == setting and isinstance(err.value, InvalidRequestError)
        assert engine.lora_state()["registered"] == []


def test_config_refusals(tiny_model, family):
    base, paths, _ = family("llama")
    with pytest.raises(ConfigError, match="tensor parallelism"):
        EngineConfig(str(base), enable_lora=True, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="names must be distinct"):
        EngineConfig(str(base), lora_modules=(("a", "/x"), ("a", "/y")))
    with pytest.raises(ConfigError, match="causal LMs only"):
        Engine(EngineConfig(str(tiny_model("bert")), enable_lora=True))
    with pytest.raises(ConfigError, match="lora_modules.*rank 16"):
        _engine(base, {"all16": paths["all16"]}, max_lora_rank=8)
    with Engine(EngineConfig(str(base))) as engine, \
            pytest.raises(InvalidRequestError, match="serves none"):
        engine.generate([[1, 2, 3]], GREEDY, lora="qv8")


def test_grouped_mm_equals_the_loop():
    """The slot loop (the fallback) and grouped_mm give the same deltas on random slots with empty ones and base rows between."""
    from worker.lora.layers import LoRARows, lora_delta

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, 16, generator=gen), torch.randn(4, 16, 24, generator=gen)
    x = torch.randn(50, 32, generator=gen)
    slots = np.random.default_rng(0).choice([-1, 0, 2, 3], size=50)
    grouped = LoRARows.of(slots, 4, "cpu", True)
    loop = LoRARows.of(slots, 4, "cpu", False)
    assert grouped.grouped and not loop.grouped and grouped.counts[1] == 0
    got, want = lora_delta(x, a, b, grouped), lora_delta(x, a, b, loop)
    torch.testing.assert_close(got, want)
    rows = grouped.perm.numpy()
    ref = torch.stack([x[i] @ a[slots[i]] @ b[slots[i]] for i in rows])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
