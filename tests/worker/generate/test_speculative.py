"""Speculative decoding (worker/generate/speculative.py, rejection.py, draft.py): greedy
output token-identical to the engine without speculation for both methods and k = 1..5
(chunked prefill, prefix caching, preemption), the rejection rule's output distribution
equal to the target's (chi-square, seeded, on a tiny vocabulary: directly and through the
engine), the KV rolled back exactly, and the features that read a step's tokens
(penalties, logit_bias, logprobs, grammars, n, stop tokens) as without speculation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.factories import token_lists
from worker.core.config import ConfigError, EngineConfig, SpeculativeConfig
from worker.generate.grammar import Structured
from worker.generate.rejection import verify
from worker.generate.sampling import Sampler, SamplingParams, SamplingRows, make_generator
from worker.generate.speculative import (
    Acceptance,
    NgramProposer,
    SpecLoad,
    SpecStepStats,
    StepCost,
)

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Prompts whose own text recurs (n-gram proposals find matches), and plain random ones.
PROMPTS = ([t * 3 for t in token_lists([4, 7, 11], seed=3)]
           + token_lists([1, 6, 19, 33], seed=4))
CONFIGS = {
    "plain": {},
    "chunk7": {"max_num_batched_tokens": 64, "max_num_running_seqs": 8, "max_prefill_chunk": 7},
    "preempt": {"max_num_batched_tokens": 64, "max_num_running_seqs": 8,
                "max_prefill_chunk": 16, "kv_block_size": 4, "num_kv_blocks": 30},
}


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square p-value of ``counts`` against ``probs`` (cells of expected
    count under 5 are pooled into one); a cell of probability 0 must have no count."""
    assert counts[probs == 0].sum() == 0, (counts, probs)
    counts, probs = counts[probs > 0], probs[probs > 0]
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.size - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def near_draft(tiny_model, tmp_path_factory):
    """A draft that agrees with the tiny Llama part of the time: its weights plus noise."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("near-draft")
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # per tensor, once
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(path)
    return path


UNLOADED = {"adaptive": False}  # k at any load and acceptance


def _spec(method: str, k: int, draft=None, **extra) -> dict:
    """The load rule off unless ``extra`` sets it: these tests check exactness."""
    spec = {"method": method, "num_speculative_tokens": k, **UNLOADED, **extra}
    if method == "draft":
        spec["model"] = str(draft)
    return spec


# ---- units ----------------------------------------------------------------------------

def test_ngram_takes_the_longest_recurring_suffix():
    p = NgramProposer(4, 2)
    t = np.array([1, 2, 3, 4, 5, 9, 9, 2, 3, 4], np.int64)  # 2 3 4 recurs: 5 9 9 follow
    assert p.propose(t, 3).tolist() == [5, 9, 9]
    assert p.propose(t, 1).tolist() == [5]
    t = np.array([1, 2, 3, 4, 5, 9, 9, 7, 8, 4], np.int64)  # only "4" recurs: n_min is 2
    assert p.propose(t, 3).tolist() == []
    assert NgramProposer(4, 1).propose(t, 3).tolist() == [5, 9, 9]
    # the most recent occurrence with k tokens after it wins over an older one
    t = np.array([6, 7, 1, 6, 7, 2, 3, 4, 6, 7], np.int64)
    assert p.propose(t, 3).tolist() == [2, 3, 4]
    assert p.propose(t, 0).tolist() == []
    with pytest.raises(ValueError):
        NgramProposer(1, 2)


def test_the_load_rule_verifies_the_positions_that_pay():
    load = SpecLoad(SpeculativeConfig("ngram", 4, step_overhead_tokens=16))
    assert load.threshold(16) == 0.5 and load.threshold(1) == pytest.approx(1 / 17)
    # a^j >= b / (F + b): at acceptance 0.9, 4 positions at batch 1, 6 (capped at 4) ...
    assert [load.positions(0.9, 4, load.threshold(b)) for b in (1, 16, 48, 200)] == [4, 4, 2, 0]
    assert load.positions(0.3, 4, load.threshold(16)) == 0
    assert load.positions(0.3, 4, load.threshold(1)) == 2  # 0.09 >= 1/17 > 0.027
    assert load.positions(1.0, 3, load.threshold(10**6)) == 3
    fixed = SpecLoad(SpeculativeConfig("ngram", 4, adaptive=False, disable_by_batch_size=6))
    assert fixed.positions(0.01, 4, 0.99) == 4 and fixed.k_for(5) == 4 and fixed.k_for(6) == 0
    fixed.set_cap(1)
    assert fixed.k_for(1) == 1
    fixed.set_cap(0)
    assert fixed.k_for(1) == 0
    fixed.set_cap(None)
    assert fixed.k_for(1) == 4
    with pytest.raises(ValueError):
        fixed.set_cap(-1)


def test_a_draft_raises_the_bar_by_its_own_steps():
    """(b + D) / (F + b): D from the draft's share of the parameters until its steps and
    the target's per-token cost are measured, then from those."""
    load = SpecLoad(SpeculativeConfig("draft", 4, model="d", step_overhead_tokens=16),
                    draft_ratio=0.25)
    assert load.threshold(4) == pytest.approx((4 + 0.25 * 20) / 20)
    assert load.positions(0.59, 4, load.threshold(1)) == 2  # 0.59^2 >= (1 + 4.25) / 17 > 0.59^3
    same_size = SpecLoad(SpeculativeConfig("draft", 4, model="d"), draft_ratio=1.0)
    assert same_size.threshold(1) > 1  # a draft as costly as the target never pays
    for t in range(1, 65):  # the target: 0.001 s + 0.0001 s per token
        load.cost.add(t, 0.001 + 0.0001 * t)
    load.add_draft_steps(0.002, 4)  # 0.0005 s per draft step: 5 target tokens
    assert load.threshold(4) == pytest.approx((4 + 5) / (16 + 4))
    for _ in range(63):  # steps without draft steps: the measurement is kept a while
        load.add_draft_steps(0.0, 0)
    assert load.threshold(4) == pytest.approx((4 + 5) / (16 + 4))
    load.add_draft_steps(0.0, 0)  # then forgotten: back to the parameter share
    assert load.threshold(4) == pytest.approx((4 + 0.25 * 20) / 20)


def test_acceptance_counts_geometric_runs_and_fades_to_the_prior():
    acc = Acceptance()
    assert acc.value == pytest.approx(0.8)  # the prior
    for _ in range(10):  # every proposal rejected at once: 0 of 1 trial each time
        acc.update(4, 0)
    assert acc.value < 0.2
    for _ in range(30):  # steps without verification: the record fades
        acc.update(0, 0)
    assert acc.value > 0.75
    full = Acceptance()
    for _ in range(10):  # all 4 accepted: 4 of 4 trials (no rejection ended the run)
        full.update(4, 4)
    assert full.value > 0.95


def test_step_cost_fits_the_fixed_cost_in_tokens():
    cost = StepCost(None, default=7.0)
    assert cost.overhead_tokens == 7.0
    rng = np.random.default_rng(0)
    for t in rng.integers(1, 200, size=64).tolist():  # seconds = 0.004 + 0.0002 t
        cost.add(t, 0.004 + 0.0002 * t)
    assert cost.overhead_tokens == pytest.approx(20.0, rel=1e-6)
    same = StepCost(None, default=7.0)
    for _ in range(64):  # every step alike: no slope to measure
        same.add(16, 0.01)
    assert same.overhead_tokens == 7.0
    assert StepCost(3.0, default=7.0).overhead_tokens == 3.0


def test_speculative_config_parses_vllm_json_and_names_bad_keys():
    c = EngineConfig(model="x", speculative='{"method": "ngram", "num_speculative_tokens": 3,'
                     ' "prompt_lookup_max": 5, "prompt_lookup_min": 1}')
    assert c.speculative == SpeculativeConfig("ngram", 3, 5, 1)
    assert EngineConfig(model="x", speculative={"model": "d"}).speculative.method == "draft"
    assert EngineConfig(model="x", speculative={"method": "draft_model", "model": "d"}
                        ).speculative.method == "draft"
    for bad, field in (({"method": "eagle"}, "speculative.method"),
                       ({"method": "ngram", "k": 3}, "speculative.k"),
                       ({"method": "draft"}, "speculative.model"),
                       ({"method": "ngram", "num_speculative_tokens": 0},
                        "speculative.num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 17},
                        "speculative.num_speculative_tokens"),
                       ({"method": "ngram", "prompt_lookup_max": 1, "prompt_lookup_min": 2},
                        "speculative.prompt_lookup_max"),
                       ("{not json", "speculative")):
        with pytest.raises(ConfigError) as info:
            EngineConfig(model="x", speculative=bad)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="tensor parallelism"):
        EngineConfig(model="x", device="cuda", tensor_parallel_size=2,
                     speculative={"method": "ngram"})


def test_step_stats_count_per_position():
    s = SpecStepStats.of([3, 0, 2], [1, 0, 2], 3)
    assert s.proposed.tolist() == [2, 2, 1] and s.accepted.tolist() == [2, 1, 0]
    assert (s.num_proposed, s.num_accepted) == (5, 3)


# ---- the rejection rule's distribution -------------------------------------------------

VOCAB = 6


def _rows(n: int, seed: int | None, temperature: float = 1.0, top_k: int = 0):
    state = SamplingRows(n)
    params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
    for r in range(n):  # per row, once
        state.set(r, params, make_generator(params, torch.device("cpu")))
    return state


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("top_k", [0, 4])
def test_rejection_sampling_emits_the_targets_distribution(method, top_k):
    """Many sequences verifying one step of 2 proposals from the same logits: each
    emitted position's tokens follow the target's (filtered) distribution."""
    torch.manual_seed(0)
    n = 6000
    target = torch.randn(3, VOCAB) * 1.5  # p_0, p_1, p_2 (the bonus position)
    state = _rows(n, None, top_k=top_k)
    sampler = Sampler(torch.device("cpu"), n)
    own = np.arange(n)
    p = sampler.probs(target.clone(), _rows(3, None, top_k=top_k), np.arange(3)).numpy()
    rng = np.random.default_rng(0)
    if method == "ngram":  # fixed proposals, as prompt lookup makes them: 2 then 5
        proposals = [np.array([2, 5], np.int64)] * n
        q = None
    else:  # drawn from a draft distribution unlike p
        qd = torch.softmax(torch.randn(2, VOCAB), dim=-1)
        d0 = rng.choice(VOCAB, size=n, p=qd[0].double().numpy() / qd[0].double().sum().item())
        d1 = rng.choice(VOCAB, size=n, p=qd[1].double().numpy() / qd[1].double().sum().item())
        proposals = [np.array([a, b], np.int64) for a, b in zip(d0, d1)]
        q = qd.repeat(n, 1)  # [2n, vocab], sequence-major
    logits = target.repeat(n, 1)  # sequence i's rows 3i .. 3i + 2
    v = verify(sampler, logits, None, state, own, proposals, q)
    tokens = np.array(v.sampled.token_ids)
    first = tokens[np.cumsum(v.counts) - np.array(v.counts)]
    assert chi_square_p(np.bincount(first, minlength=VOCAB), p[0]) > 1e-3
    # the second token, among the sequences whose first proposal was accepted (then the
    # first token is that proposal and the second is drawn from p_1's rule)
    accepted = np.array(v.num_accepted) >= 1
    if method == "ngram":
        assert 0 < accepted.mean() < 1  # both branches were taken
        second = tokens[(np.cumsum(v.counts) - np.array(v.counts))[accepted] + 1]
        assert chi_square_p(np.bincount(second, minlength=VOCAB), p[1]) > 1e-3
    assert sum(v.counts) == tokens.size and max(v.num_accepted) <= 2


def test_rejection_with_greedy_rows_accepts_exactly_the_argmax_prefix():
    logits = torch.tensor([[0.0, 3, 1], [2, 0, 1], [0, 0, 5]])  # argmax 1, 0, 2
    state = _rows(2, None, temperature=0)
    sampler = Sampler(torch.device("cpu"), 4)
    v = verify(sampler, torch.cat([logits, logits]), None, state, np.arange(2),
               [np.array([1, 0]), np.array([1, 2])])
    assert v.num_accepted == [2, 1] and v.counts == [3, 2]
    assert v.sampled.token_ids == [1, 0, 2, 1, 0]


def test_seeded_verification_repeats():
    logits = torch.randn(3, VOCAB).repeat(8, 1)
    out = []
    for _ in range(2):
        v = verify(Sampler(torch.device("cpu"), 8), logits.clone(), None, _rows(8, 7),
                   np.arange(8), [np.array([2, 5])] * 8)
        out.append(v.sampled.token_ids)
    assert out[0] == out[1]


# ---- greedy output through the engine ----------------------------------------------------

@pytest.fixture(scope="module")
def greedy_reference(tiny_model):
    from worker import Engine

    cache = {}

    def get(name: str):
        if name not in cache:
            with Engine(EngineConfig(model=str(tiny_model("llama")), **CONFIGS[name])) as e:
                cache[name] = [o.token_ids for o in e.generate(PROMPTS, GREEDY)]
        return cache[name]

    return get


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_is_token_identical(tiny_model, make_engine, near_draft, greedy_reference,
                                   config, method, k):
    engine = make_engine(tiny_model("llama"), **CONFIGS[config],
                         speculative=_spec(method, k, near_draft))
    out = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert out == greedy_reference(config)
    stats = engine.stats
    assert stats.spec_num_proposed > 0 and stats.spec_num_accepted > 0
    assert len(stats.spec_proposed_by_position) == k
    if config == "preempt":
        assert engine.generation.num_preemptions > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_a_draft_equal_to_the_target_accepts_everything(tiny_model, make_engine, method):
    """The target as its own draft accepts every proposal, so the full-acceptance path
    (the bonus token) runs at every step; n-gram on looping prompts accepts at the
    later positions too."""
    path = tiny_model("llama")
    engine = make_engine(path, speculative=_spec(method, 4, path))
    base = make_engine(path)
    prompts = PROMPTS[:3]
    assert ([o.token_ids for o in engine.generate(prompts, GREEDY)]
            == [o.token_ids for o in base.generate(prompts, GREEDY)])
    s = engine.stats
    assert s.spec_num_accepted > 0 and s.spec_accepted_by_position[2] > 0
    if method == "draft":
        assert s.spec_num_accepted == s.spec_num_proposed
        assert s.num_steps < base.stats.num_steps


def test_prefix_caching_registers_only_accepted_tokens(tiny_model, make_engine):
    """A second round over prompts extended by the first round's outputs hits the blocks
    the speculative engine cached, and gives the tokens of an engine without a cache."""
    path = tiny_model("llama")
    spec = make_engine(path, kv_block_size=4, speculative=_spec("ngram", 3))
    plain = make_engine(path, kv_block_size=4, enable_prefix_caching=False)
    first = spec.generate(PROMPTS, GREEDY)
    assert spec.stats.spec_num_accepted > 0
    second_prompts = [o.prompt_token_ids + o.token_ids for o in first]
    hits_before = spec.stats.prefix_cache_hits
    got = [o.token_ids for o in spec.generate(second_prompts, GREEDY)]
    assert spec.stats.prefix_cache_hits - hits_before > 0
    assert got == [o.token_ids for o in plain.generate(second_prompts, GREEDY)]


def test_rollback_keeps_exactly_the_accepted_slots(tiny_model, make_engine, near_draft):
    """After every step, a running sequence holds slots for its computed tokens only (the
    rejected proposals' are back in the pool) and the KV invariants hold."""
    engine = make_engine(tiny_model("llama"), kv_block_size=4,
                         speculative=_spec("draft", 4, near_draft))
    gen = engine.generation
    seqs = [gen.make_sequence(p, GREEDY) for p in PROMPTS]
    for s in seqs:
        gen.submit(s)
    rejected_steps = 0
    while not all(s.finished for s in seqs):  # per step
        out = gen.schedule()
        held = {s.seq_id: gen.blocks.num_tokens(s.seq_id) for s in out.seqs}
        result = gen.run(out)
        gen.postprocess(out, result)
        gen.check_invariants()
        for seq, n in zip(out.seqs, out.num_new_tokens):
            if not seq.finished:
                assert gen.blocks.num_tokens(seq.seq_id) == seq.num_computed
                if seq.num_computed < held[seq.seq_id]:
                    rejected_steps += 1
    assert rejected_steps > 0
    assert gen.blocks.stats().num_seqs == 0


# ---- sampled output through the engine --------------------------------------------------

def test_sampled_output_has_the_targets_distribution(tmp_path):
    """A Llama of 8 tokens of vocabulary: the second and third generated tokens' marginals
    over 3,000 sampled sequences with n-gram and draft speculation (the second from the
    verified proposal, the third the bonus token when it was accepted) equal the ones
    computed from the model's own probabilities (chi-square)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from worker import Engine

    vocab = 8
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                      max_position_embeddings=64, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "target")
    torch.manual_seed(4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "draft")
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]  # n-gram: t + 1 after any t
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "target").eval()
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        rows = torch.tensor([prompt + [t] for t in range(vocab)])
        p2 = torch.softmax(model(rows).logits[:, -1].double(), -1)  # [t1, t2]
        rows = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
        p3 = torch.softmax(model(rows).logits[:, -1].double(), -1).view(vocab, vocab, vocab)
    joint = p1[:, None] * p2  # [t1, t2]
    want2 = joint.sum(0).numpy()
    want3 = (joint[:, :, None] * p3).sum((0, 1)).numpy()
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    n = 3000
    for spec in ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1},
                 {"method": "draft", "model": str(tmp_path / "draft"),
                  "num_speculative_tokens": 2}):
        with Engine(EngineConfig(model=str(tmp_path / "target"), speculative={**spec, **UNLOADED},
                                 max_num_running_seqs=256, max_num_batched_tokens=4096)
                    ) as engine:
            torch.manual_seed(5)
            outs = engine.generate([prompt] * n, params)
            assert engine.stats.spec_num_proposed > 0 and engine.stats.spec_num_accepted > 0
            for t, want in ((1, want2), (2, want3)):
                got = np.bincount([o.token_ids[t] for o in outs], minlength=vocab)
                assert chi_square_p(got, want) > 1e-3, (spec, t)


# ---- what reads a step's tokens -----------------------------------------------------------

PROCESSED = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            repetition_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.2),
             SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            logit_bias={7: 3.0, 11: -100.0, 43: 2.0}),
             SamplingParams(temperature=0, max_tokens=20, min_tokens=12,
                            stop_token_ids=[43, 293]),
             SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_penalties_bias_stops_and_logprobs_as_without_speculation(tiny_model, make_engine,
                                                                  method):
    """Each position's penalties and min_tokens see the proposals before it; a stop token
    among accepted proposals ends the output there; logprobs are those of the tokens
    emitted, as one token at a time gives them."""
    path = tiny_model("llama")
    engine = make_engine(path, speculative=_spec(method, 4, path))
    base = make_engine(path)
    prompts = PROMPTS[:4]
    for params in PROCESSED:  # per processor kind
        got = engine.generate(prompts, params)
        want = base.generate(prompts, params)
        for g, w in zip(got, want):  # per prompt
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            if params.logprobs:
                assert len(g.logprobs) == len(g.token_ids)
                for a, b in zip(g.logprobs, w.logprobs):  # per token
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert engine.stats.spec_num_accepted > 0


def test_copies_of_one_prompt_speculate_alike(tiny_model, make_engine):
    """``n`` choices (copies of one prompt admitted together, the shared prefix computed
    once) each speculate, and greedy copies agree with the engine without speculation."""
    path = tiny_model("llama")
    engine = make_engine(path, kv_block_size=4, speculative=_spec("ngram", 3))
    prompt = PROMPTS[1]
    outs = engine.generate([prompt] * 4, GREEDY)
    want = make_engine(path, kv_block_size=4).generate([prompt], GREEDY)[0].token_ids
    assert all(o.token_ids == want for o in outs)
    assert engine.stats.spec_num_accepted > 0


@pytest.fixture(scope="module")
def smoke_engines():
    from worker import Engine

    settings = {"model": "smoke:decoder", "max_model_len": 512, "num_kv_blocks": 256}
    with Engine(EngineConfig(**settings)) as base, Engine(EngineConfig(
            **settings, speculative=_spec("ngram", 4, prompt_lookup_min=1))) as spec:
        yield base, spec


def test_structured_output_is_valid_and_greedy_identical(smoke_engines):
    """Proposals are cut at the grammar's first refusal and each verified position is
    masked by the grammar's state after the proposals before it: greedy constrained
    output equals the engine's without speculation; sampled output parses."""
    base, spec = smoke_engines
    tok = spec.generation.processor.tokenizer
    prompt = tok("give me json json json")["input_ids"]
    schema = {"type": "object", "required": ["name", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "tags": {"type": "array", "items": {"enum": ["aa", "bb"]},
                                      "maxItems": 6}}}
    greedy = SamplingParams(max_tokens=120, temperature=0, structured=Structured.json(schema))
    got, want = spec.generate([prompt], greedy)[0], base.generate([prompt], greedy)[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    sampled = [SamplingParams(max_tokens=120, temperature=1.0, seed=s,
                              structured=Structured.json(schema)) for s in range(6)]
    for out in spec.generate([prompt] * 6, sampled):
        assert out.finish_reason.value == "stop", out.error
        value = json.loads(out.text)
        assert set(value) == {"name", "tags"} and set(value["tags"]) <= {"aa", "bb"}
    assert spec.stats.spec_num_proposed > 0


def test_stop_strings_cut_as_without_speculation(smoke_engines):
    base, spec = smoke_engines
    tok = spec.generation.processor.tokenizer
    prompt = tok("the cat sat on the mat, the cat sat on the mat, the cat")["input_ids"]
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    text = base.generate([prompt], free)[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    got, want = spec.generate([prompt], params)[0], base.generate([prompt], params)[0]
    assert (got.text, got.finish_reason, got.token_ids) == (want.text, want.finish_reason,
                                                            want.token_ids)
    assert stop not in got.text and got.finish_reason.value == "stop"


# ---- the load rule and the cluster's cap --------------------------------------------------

def test_k_falls_to_zero_as_the_batch_fills_and_the_cap_turns_it_off(tiny_model, make_engine):
    path = tiny_model("llama")
    engine = make_engine(path, speculative={"method": "ngram", "num_speculative_tokens": 3,
                                            "adaptive": False, "disable_by_batch_size": 4})
    loop = [PROMPTS[0]]
    engine.generate(loop, GREEDY)
    assert engine.stats.spec_num_proposed > 0 and engine.stats.spec_k == 3
    before = engine.stats.spec_num_proposed
    engine.generate(loop * 6, GREEDY)  # 6 running from first to last: none proposes
    assert engine.stats.spec_k == 0 and engine.stats.spec_num_proposed == before
    engine.set_speculation_cap(0)
    before = engine.stats.spec_num_proposed
    engine.generate(loop, GREEDY)
    assert engine.stats.spec_num_proposed == before and engine.stats.spec_k == 0
    engine.set_speculation_cap(None)
    engine.generate(loop, GREEDY)
    assert engine.stats.spec_num_proposed > before and engine.stats.spec_k == 3


def test_a_draft_that_is_never_right_stops_being_asked(tiny_model, make_engine, tmp_path):
    """Adaptive k: a small draft whose proposals are all rejected (an unrelated random
    model) is asked for 4 tokens per sequence at first (the prior), then at most one, and
    in some steps none (the faded record makes it try again now and then), while greedy
    output stays the target's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tiny_model("llama")
    other = tmp_path / "other"
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=512,
                                 max_position_embeddings=256)).save_pretrained(other)
    spec = {"method": "draft", "model": str(other), "num_speculative_tokens": 4,
            "step_overhead_tokens": 16}
    engine = make_engine(path, speculative=spec)
    records = []
    engine.add_step_observer(records.append)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = engine.generate(PROMPTS[3:7], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in make_engine(path).generate(
        PROMPTS[3:7], params)]
    proposed = [sum(r.spec_proposed) for r in records if r.kind.value == "generate"]
    assert engine.stats.spec_num_accepted <= engine.stats.spec_num_proposed // 10
    first = next(i for i, p in enumerate(proposed) if p)
    assert proposed[first] == 16, proposed  # 4 sequences x 4 positions
    assert max(proposed[first + 3:]) <= 4 and 0 in proposed[first + 3:], proposed


def test_steps_report_what_they_verified(tiny_model, make_engine):
    path = tiny_model("llama")
    engine = make_engine(path, speculative=_spec("draft", 3, path))
    records = []
    engine.add_step_observer(records.append)
    engine.generate(PROMPTS[:2], GREEDY)
    spec = [r for r in records if r.spec_proposed]
    assert spec and all(len(r.spec_proposed) == 3 for r in spec)
    assert sum(sum(r.spec_accepted) for r in spec) == engine.stats.spec_num_accepted
    assert sum(sum(r.spec_proposed) for r in spec) == engine.stats.spec_num_proposed
    assert all(r.spec_k == 3 for r in records if r.kind.value == "generate")


# ---- the draft's refusals ----------------------------------------------------------------

def test_a_draft_that_cannot_serve_is_refused_by_name(tiny_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker import Engine

    target = tiny_model("llama")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        Engine(EngineConfig(model=str(target), kv_cache_dtype="fp8",
                            speculative=_spec("draft", 2, target)))
    with pytest.raises(ConfigError, match="is not a causal LM"):
        Engine(EngineConfig(model=str(target), speculative=_spec("draft", 2, tiny_model("bert"))))
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=1024,
                                 max_position_embeddings=256)).save_pretrained(tmp_path / "big")
    with pytest.raises(ConfigError, match="vocabulary"):
        Engine(EngineConfig(model=str(target), speculative=_spec("draft", 2, tmp_path / "big")))
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=512,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "short")
    with pytest.raises(ConfigError, match="positions"):
        Engine(EngineConfig(model=str(target), speculative=_spec("draft", 2, tmp_path / "short")))


# ---- with adapters, and the draft's cache -------------------------------------------------

def test_lora_rows_speculate_as_their_adapter_decodes(tiny_model, make_engine, tmp_path):
    """Rows of two adapters and the base model in one batch, with n-gram proposals: each
    row's greedy tokens equal the adapter engine's without speculation (the head's
    adapter rows are repeated per verified position)."""
    from tests.lora_factories import make_adapter

    base = tiny_model("llama")
    adapters = (("a", str(make_adapter(base, tmp_path / "a", r=8, seed=1))),
                ("b", str(make_adapter(base, tmp_path / "b", r=4, seed=2))))
    loras = ["a", None, "b", "a", "b", None, "b"]
    spec = make_engine(base, lora_modules=adapters, speculative=_spec("ngram", 3))
    plain = make_engine(base, lora_modules=adapters)
    got = spec.generate(PROMPTS, GREEDY, lora=loras)
    want = plain.generate(PROMPTS, GREEDY, lora=loras)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.stats.spec_num_accepted > 0 and spec.generation.runner.num_lora_steps > 0


@pytest.mark.parametrize("config", ["chunk7", "preempt"])
def test_the_drafts_cache_follows_the_targets(tiny_model, make_engine, config):
    """The target as its own draft accepts every proposal only if the draft's cache holds
    the right K/V at every position: through chunked prefill, preemption (recompute)
    and prefix-cache hits (a second round over prompts extended by the first's output)."""
    path = tiny_model("llama")
    engine = make_engine(path, **CONFIGS[config], speculative=_spec("draft", 3, path))
    first = engine.generate(PROMPTS, GREEDY)
    second = [o.prompt_token_ids + o.token_ids for o in first]
    hits = engine.stats.prefix_cache_hits
    engine.generate(second, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    s = engine.stats
    assert s.prefix_cache_hits > hits
    assert s.spec_num_proposed > 0 and s.spec_num_accepted == s.spec_num_proposed
    if config == "preempt":
        assert engine.generation.num_preemptions > 0


def test_a_stream_gets_several_tokens_per_step_and_adds_up(smoke_engines):
    """Streamed through the step loop: each delta carries the step's accepted tokens and
    the next, and the deltas add up to the output without speculation, text included."""
    import asyncio

    base, spec = smoke_engines
    tok = spec.generation.processor.tokenizer
    prompt = tok("one two three four, one two three four, one two three")["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1)
    want = base.generate([prompt], params)[0]

    async def collect():
        return [d async for d in spec.generate_stream(prompt, params)]

    deltas = asyncio.run(collect())
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert "".join(d.text for d in deltas) == want.text
    assert len([lp for d in deltas for lp in d.logprobs]) == len(want.token_ids)
    assert max(len(d.token_ids) for d in deltas) > 1  # some step emitted several
    assert deltas[-1].finish_reason == want.finish_reason
