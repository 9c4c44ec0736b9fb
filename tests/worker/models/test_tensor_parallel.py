"""Tensor-parallel sharding (worker/parallel/): two gloo ranks, each in its own process
with its shard of a tiny random checkpoint, produce what one rank with the whole model
produces: greedy tokens through chunked prefill and decode on the paged cache, seeded
sampling, packed embeddings and scores. The families proven here are the only ones
``shard_decoder`` accepts; the rest, and shapes that do not split, are refused by name.

The engines here run as SPMD (every rank schedules the same requests the same way); the
engine that schedules on rank 0 alone and sends each step to the others is the next step
of issue 22, not this test's subject."""

from __future__ import annotations

import asyncio
import json
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from tests.factories import token_lists
from tests.worker.models import _tp_rank
from worker import SamplingParams
from worker.core.config import ConfigError
from worker.parallel.group import TPGroup
from worker.parallel.launch import free_port
from worker.parallel.shard import TP_FAMILIES, plan

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"]  # qwen2, mistral:
#   1 KV head (replicated); mixtral, qwen3_moe: 4 experts, each split across the ranks
PROMPTS = token_lists([1, 40, 70], seed=21)
PACKED = token_lists([5, 17, 30, 64], seed=4)  # embed / score: bins of the 64-token budget
GEN = dict(max_num_batched_tokens=64, max_num_running_seqs=8, max_prefill_chunk=16)
PARAMS = [dict(temperature=0, max_tokens=12), dict(temperature=0, max_tokens=12),
          dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)]  # the last one seeded
KV_HEADS = {"llama": 2, "qwen2": 1, "qwen3": 2, "mistral": 1, "mixtral": 2, "qwen3_moe": 2}


@pytest.fixture(scope="module")
def two_ranks(checkpoint, tmp_path_factory):
    """Rank 0's results, every rank running the same engine on the same requests."""
    jobs = [dict(name=n, path=str(checkpoint(n)), config=dict(GEN), prompts=PROMPTS,
                 packed=PACKED, params=PARAMS) for n in FAMILIES]
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_tp_rank.run, args=(2, free_port(), jobs, str(out)), nprocs=2, join=True)
    return json.loads((out / "tp.json").read_text())


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    from worker import Engine, EngineConfig

    got = {}
    for name in FAMILIES:
        engine = Engine(EngineConfig(model=str(checkpoint(name)), **GEN))
        outs = engine.generate(PROMPTS, [SamplingParams(**p) for p in PARAMS])
        got[name] = {"tokens": [o.token_ids for o in outs],
                     "held": sum(p.numel() for p in engine.runner.model.parameters()),
                     "kv_heads": engine.generation.runner.cache.spec.num_kv_heads,
                     "embed": engine.embed(PACKED), "score": engine.score(PACKED)}
        engine.shutdown()
    return got


@pytest.mark.parametrize("name", FAMILIES)
def test_two_ranks_generate_what_one_rank_generates(name, two_ranks, one_rank):
    tp, ref = two_ranks[name], one_rank[name]
    assert tp["tokens"] == ref["tokens"]  # greedy (chunked prefill, decode) and seeded
    assert all(len(t) == 12 for t in tp["tokens"])
    assert tp["steps"] > 12  # the prefill really chunked, then decoded


@pytest.mark.parametrize("name", FAMILIES)
def test_two_ranks_generate_what_hf_generates(name, two_ranks, checkpoint):
    """The greedy requests (the first two) against HF's own ``generate`` on the whole model."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint(name)).eval()
    for prompt, tokens in zip(PROMPTS[:2], two_ranks[name]["tokens"][:2], strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
        assert out[0, len(prompt):].tolist() == tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_each_rank_caches_only_its_kv_heads_and_holds_its_shard(name, two_ranks, one_rank):
    assert one_rank[name]["kv_heads"] == KV_HEADS[name]
    assert two_ranks[name]["kv_heads"] == max(1, KV_HEADS[name] // 2)
    # about half: only the norms (and a replicated KV head) are on both ranks whole
    assert two_ranks[name]["held"] < 0.6 * one_rank[name]["held"]


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_embeddings_and_scores_match_one_rank(name, two_ranks, one_rank):
    np.testing.assert_allclose(np.array(two_ranks[name]["embed"]), one_rank[name]["embed"],
                               rtol=1e-4, atol=1e-4)
    for got, want in zip(two_ranks[name]["score"], one_rank[name]["score"], strict=True):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)


def test_an_odd_vocabulary_is_padded_and_trimmed(two_ranks):
    vocab = two_ranks["vocab"]
    assert vocab["head_cols"] == 7
    assert vocab["embed"] < 1e-6 and vocab["head"] < 1e-6


def _config(kind, heads=4, kv=2, inter=128):
    return types.SimpleNamespace(model_type=kind, num_attention_heads=heads,
                                 num_key_value_heads=kv, intermediate_size=inter)


def test_the_plan_splits_heads_and_replicates_kv_heads_below_the_rank_count():
    assert plan(_config("llama"), 2) == (2, 1, 64)
    assert plan(_config("qwen2", kv=1), 2) == (2, 1, 64)  # the one KV head on both ranks
    assert plan(_config("llama", heads=8, kv=2), 4) == (2, 1, 32)


@pytest.mark.parametrize("config, match", [
    (_config("phi3"), "'phi3' model is refused at 2 ranks"),
    (_config("qwen2_moe"), "'qwen2_moe' model is refused"),  # shared experts: unproven
    (_config("gpt2"), "'gpt2' model is refused"),
    (_config("llama", heads=6, kv=2), "6 attention heads do not split over 4 ranks"),
    (_config("llama", heads=12, kv=3), "3 KV heads neither split over 4 ranks"),
    (_config("llama", inter=130), "intermediate_size 130 does not split over 4 ranks"),
    (types.SimpleNamespace(**vars(_config("qwen3_moe")), moe_intermediate_size=33),
     "moe_intermediate_size 33 does not split over 2 ranks"),
])
def test_what_does_not_shard_is_refused_by_name(config, match):
    size = 4 if config.model_type == "llama" else 2
    with pytest.raises(ConfigError, match=match) as err:
        plan(config, size)
    assert err.value.field == "tensor_parallel_size"
    if config.model_type not in TP_FAMILIES:  # a family refusal lists the proven ones
        assert "llama" in str(err.value)


def test_a_model_without_a_head_is_refused_before_any_collective():
    from transformers import LlamaConfig, LlamaModel

    from worker.parallel.shard import shard_decoder

    model = LlamaModel(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ConfigError, match="a LlamaModel is refused at 2"):
        shard_decoder(model, TPGroup(0, 2))  # no process group: nothing was sent


def test_a_decoder_classifier_classifies_on_two_ranks_as_on_one(tmp_path):
    """A Qwen2 sequence classifier at TP=2: the base model sharded, its ``score`` head
    whole on rank 0, which alone pools and classifies; labels and logits equal one rank's."""
    from tests.classify_factories import make_tiny_classifier
    from worker import Engine, EngineConfig

    path = str(make_tiny_classifier("qwen2", tmp_path / "qwen2-cls"))
    with Engine(EngineConfig(model=path, max_num_batched_tokens=64)) as one:
        want = one.classify(PACKED)
    engine = Engine(EngineConfig(model=path, max_num_batched_tokens=64, tensor_parallel_size=2))
    try:
        assert engine.memory.kv is None and len(_rank_processes()) == 1
        got = engine.classify(PACKED)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
        assert engine.runner.step_sender.num_sent >= 1  # its bins went to rank 1
    finally:
        engine.shutdown()
    assert _rank_processes() == []


def test_one_rank_is_the_unsharded_model():
    assert TPGroup(0, 1).all_gather_last(torch.ones(2, 3)).shape == (2, 3)
    assert set(FAMILIES) == TP_FAMILIES  # every family accepted is one proven above
    with pytest.raises(ValueError, match="rank 2 is not in a group of 2"):
        TPGroup(2, 2)


def test_every_rank_plans_the_smallest_budget_and_kv_cache_of_the_ranks(checkpoint, tmp_path):
    """Rank 1 configured (as if measured) with a smaller budget and fewer KV blocks than
    rank 0: both plan rank 1's numbers, and admission sees that capacity."""
    mp.spawn(_tp_rank.run_agree, args=(2, free_port(), str(checkpoint("llama")), str(tmp_path)),
             nprocs=2, join=True)
    plans = [json.loads((tmp_path / f"agree{r}.json").read_text()) for r in (0, 1)]
    for rank in plans:
        assert (rank["budget"], rank["kv_blocks"], rank["allocated_blocks"]) == (48, 40, 40)
        assert rank["ranks"] == 2 and rank["capacity"] == 40 * 16  # blocks of 16 tokens


def test_the_probe_measures_every_rank_and_fits_the_one_with_least_room(checkpoint, tmp_path):
    """Each rank with its own fake device (NVML reading, allocator growing per token):
    rank 0 drives the Phase-0 probe, rank 1 runs its forwards and answers its readings, and
    the budget is the one rank 1 alone would measure (less free memory, more bytes per
    token), smaller than rank 0's alone."""
    from transformers import AutoConfig

    from worker.budget.nvml import FakeNvmlReader
    from worker.budget.probe import ProbeSettings, measure_budget

    path = str(checkpoint("llama"))
    mp.spawn(_tp_rank.run_probe, args=(2, free_port(), path, str(tmp_path)), nprocs=2,
             join=True)
    got = [json.loads((tmp_path / f"probe{r}.json").read_text()) for r in (0, 1)]
    alone = []
    for fake in _tp_rank.PROBE_RANKS:
        memory = _tp_rank.LinearMemory(fake["baseline_mib"] << 20, fake["per_token_mib"] << 20)
        report = measure_budget(lambda n, m=memory: setattr(m, "last", n),
                                model_config=AutoConfig.from_pretrained(path), dtype_bytes=4,
                                nvml=FakeNvmlReader(8 << 30, fake["used_gib"] << 30),
                                memory=memory, settings=ProbeSettings(align=16))
        alone.append(report.budget_tokens)
    assert alone[1] < alone[0]
    assert got[0]["budget"] == got[1]["budget"] == alone[1]
    assert got[0]["used_bytes"] == 2 << 30  # the reading of the rank with least room
    assert got[0]["warmup"][:2] == [512, 1024]  # real forwards on both ranks


# ---- one scheduler: rank 0 sends each step, rank 1 follows --------------------------

LEADER_JOBS = {  # name: (family, engine config)
    "llama": ("llama", dict(GEN, num_kv_blocks=64)),
    "qwen2": ("qwen2", dict(GEN, num_kv_blocks=64)),  # 1 KV head, replicated
    "mistral": ("mistral", dict(GEN, num_kv_blocks=64)),  # sliding window 24 < 70
    "mixtral": ("mixtral", dict(GEN, num_kv_blocks=64)),  # experts at half width per rank
    # 13 + 52 + 82 tokens of KV need 4 + 13 + 21 blocks of 4: 24 force a preemption
    "llama-crowded": ("llama", dict(GEN, kv_block_size=4, num_kv_blocks=24)),
}


@pytest.fixture(scope="module")
def leader_follower(checkpoint, tmp_path_factory):
    jobs = [dict(name=n, path=str(checkpoint(fam)), config=cfg, prompts=PROMPTS,
                 params=PARAMS, rounds=2) for n, (fam, cfg) in LEADER_JOBS.items()]
    out = tmp_path_factory.mktemp("tp_leader")
    mp.spawn(_tp_rank.run_leader, args=(2, free_port(), jobs, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", list(LEADER_JOBS))
def test_rank_zero_schedules_and_the_other_rank_follows_each_step(name, leader_follower,
                                                                 one_rank):
    leader, follower = leader_follower[0][name], leader_follower[1][name]
    want = one_rank[LEADER_JOBS[name][0]]["tokens"]
    for r in leader["rounds"]:
        assert r["tokens"] == want  # greedy and seeded, first round and prefix-cached round
    assert follower["followed"] == leader["sent"] > 2 * 12  # every step, nothing else
    assert leader["prefix_hits"] > 0  # the second round found its prompts cached
    assert leader["kv_heads"] == follower["kv_heads"] == max(1, KV_HEADS[LEADER_JOBS[name][0]] // 2)
    crowded = name.endswith("crowded")
    assert (sum(r["preemptions"] for r in leader["rounds"]) > 0) == crowded


# ---- the engine's own ranks: tensor_parallel_size ------------------------------------

def _rank_processes() -> list:
    return [p for p in mp.active_children() if p.name.startswith("packserve-tp-rank")]


def test_an_engine_of_two_ranks_starts_its_follower_and_stops_it(checkpoint, one_rank):
    from worker import Engine, EngineConfig

    engine = Engine(EngineConfig(model=str(checkpoint("qwen2")), tensor_parallel_size=2,
                                 num_kv_blocks=64, **GEN))
    procs = _rank_processes()
    assert len(procs) == 1 and procs[0].is_alive()
    params = [SamplingParams(**p) for p in PARAMS]
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == one_rank["qwen2"]["tokens"]
    streamed = asyncio.run(engine.generate_async(PROMPTS, params))  # the step-loop thread
    assert [o.token_ids for o in streamed] == one_rank["qwen2"]["tokens"]
    # rank 0's logits processors and sampler see the full, all-gathered logits
    shaped = SamplingParams(temperature=0, max_tokens=10, presence_penalty=0.8,
                            frequency_penalty=0.4, repetition_penalty=1.3, logprobs=2,
                            logit_bias=((7, 4.0), (11, -50.0)), min_tokens=3)
    with Engine(EngineConfig(model=str(checkpoint("qwen2")), num_kv_blocks=64, **GEN)) as one:
        want = one.generate(PROMPTS, shaped)
    got = engine.generate(PROMPTS, shaped)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g.logprobs, w.logprobs, strict=True):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # the packed path: rank 0 sends each bin, the follower runs its forward (and LM head)
    ref = one_rank["qwen2"]
    np.testing.assert_allclose(engine.embed(PACKED), ref["embed"], rtol=1e-4, atol=1e-4)
    for got, want in zip(engine.score(PACKED), ref["score"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    pooled = asyncio.run(engine.embed_async(PACKED))  # through the step loop, as served
    np.testing.assert_allclose(pooled, ref["embed"], rtol=1e-4, atol=1e-4)
    assert engine.runner.step_sender.num_sent > engine.stats.num_steps  # bins and steps
    assert engine.generation.runner.cache.spec.num_kv_heads == 1  # its 1 KV head, replicated
    whole = AutoModelForCausalLM.from_pretrained(checkpoint("qwen2"))
    held = sum(p.numel() for p in engine.runner.model.parameters())
    assert held < 0.6 * sum(p.numel() for p in whole.parameters())  # its shard, not the whole
    engine.shutdown()
    assert not procs[0].is_alive() and procs[0].exitcode == 0  # stopped, not killed
    assert _rank_processes() == []


def test_a_family_the_ranks_cannot_split_is_refused_and_no_rank_is_left(checkpoint):
    from worker import Engine, EngineConfig

    with pytest.raises(ConfigError, match="'phi3' model is refused at 2 ranks"):
        Engine(EngineConfig(model=str(checkpoint("phi3")), tensor_parallel_size=2, **GEN))
    assert _rank_processes() == []


def test_the_rank_count_is_checked():
    from worker import EngineConfig

    with pytest.raises(ConfigError, match="tensor_parallel_size: must be an integer >= 1"):
        EngineConfig(model="m", tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="takes device 'cuda'"):
        EngineConfig(model="m", tensor_parallel_size=2, device="cuda:1")


def test_a_rank_that_dies_kills_the_engine_and_fails_its_requests(checkpoint):
    """What a replica sees when a follower is killed: the next step fails at once (gloo
    reports the closed connection), the request gets ``EngineDeadError``, the engine is no
    longer alive (the replica's health check), and a new engine can form its ranks."""
    import os
    import signal

    from worker import Engine, EngineConfig
    from worker.core.errors import EngineDeadError

    config = EngineConfig(model=str(checkpoint("llama")), tensor_parallel_size=2,
                          num_kv_blocks=64, **GEN)
    engine = Engine(config)
    (rank,) = _rank_processes()
    os.kill(rank.pid, signal.SIGKILL)
    rank.join(10)
    with pytest.raises(EngineDeadError, match="a generation step failed"):
        asyncio.run(engine.generate_async(PROMPTS, SamplingParams(temperature=0, max_tokens=4)))
    assert not engine.is_alive()
    engine.shutdown()
    assert _rank_processes() == []
    again = Engine(config)  # the dead group was left: a new one forms
    assert len(again.generate(PROMPTS[:1], SamplingParams(max_tokens=2))[0].token_ids) == 2
    again.shutdown()


def test_an_idle_engine_outlives_its_step_timeout_and_a_hung_rank_fails_the_step(checkpoint):
    """The wait for the next step has no bound (a follower idles as long as the replica
    does: with one timeout for everything, an engine idle for 60 s died); a rank that hangs
    mid-step fails the step after ``tp_step_timeout_s``, and the engine is dead, not hung."""
    import os
    import signal
    import time

    from worker import Engine, EngineConfig
    from worker.core.errors import EngineDeadError

    engine = Engine(EngineConfig(model=str(checkpoint("llama")), tensor_parallel_size=2,
                                 num_kv_blocks=64, tp_step_timeout_s=2.0, **GEN))
    (rank,) = _rank_processes()
    greedy = SamplingParams(temperature=0, max_tokens=4)
    first = engine.generate(PROMPTS[:1], greedy)[0].token_ids
    time.sleep(3.0)  # idle past the step timeout
    assert engine.generate(PROMPTS[:1], greedy)[0].token_ids == first
    os.kill(rank.pid, signal.SIGSTOP)  # hung: alive, holding its sockets, never answering
    try:
        with pytest.raises(EngineDeadError, match="a generation step failed"):
            asyncio.run(engine.generate_async(PROMPTS, greedy))
        assert not engine.is_alive()
    finally:
        engine.shutdown()  # a stopped rank ignores SIGTERM: it is killed
    assert not rank.is_alive() and _rank_processes() == []


def test_the_step_timeout_is_checked():
    from worker import EngineConfig

    for bad in (0, -1.0, True, "5"):
        with pytest.raises(ConfigError, match="tp_step_timeout_s: must be a number"):
            EngineConfig(model="m", tp_step_timeout_s=bad)


def test_ranks_read_the_checkpoint_in_turn_when_the_node_cannot_hold_a_copy_each(
        checkpoint, monkeypatch):
    """``tp_load="serial"``, and "auto" once a rank finds too little available memory for
    one host copy per rank (here rank 0, told the node has 1 KiB free): rank 1 starts
    reading only after rank 0 is done; "auto" with room to spare reads at once."""
    import worker.parallel.group
    from worker import Engine, EngineConfig

    config = EngineConfig(model=str(checkpoint("llama")), tensor_parallel_size=2,
                          num_kv_blocks=64, **GEN)
    with Engine(config) as engine:  # auto: the tiny checkpoint fits twice over
        assert not engine.executor.loaded_in_turn and len(engine.executor.load_spans) == 2
    for mode in ("serial", "auto"):
        if mode == "auto":
            monkeypatch.setattr(worker.parallel.group, "available_host_bytes", lambda: 1024)
        import dataclasses

        with Engine(dataclasses.replace(config, tp_load=mode)) as engine:
            (_, end0), (start1, _) = engine.executor.load_spans
            assert engine.executor.loaded_in_turn and start1 >= end0, mode
            assert engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3))
    assert _rank_processes() == []


def test_the_load_mode_is_checked():
    from worker import EngineConfig

    with pytest.raises(ConfigError, match="tp_load: must be one of auto, parallel, serial"):
        EngineConfig(model="m", tp_load="lazy")
