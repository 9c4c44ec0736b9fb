"""Fair steps: a heavy request (``n`` copies of one prompt with logprobs, echo's prompt
scored first; or 10,000 stop strings) does not hold a 2-token request back for more
than about a step. Nothing here times anything: order and computed tokens only.

The scheduler half: copies of one prompt arriving together prefill it once (the others
wait for its blocks, then take them from the prefix cache), and what does not share the
prompt is admitted meanwhile.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.factories import token_lists
from tests.worker._gen_helpers import add_word_tokenizer
from tests.worker.generate.test_scheduler import run_step
from worker.generate.sampling import SamplingParams
from worker.generate.scheduler import GenScheduler, StopReason
from worker.generate.sequence import Sequence
from worker.kv.block_manager import BlockManager

BS = 4  # KV block size of the scheduler tests


def _seq(tokens: list[int], max_tokens: int = 2) -> Sequence:
    return Sequence(list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens))


def _scheduler(budget: int = 64, chunk: int = 0) -> GenScheduler:
    return GenScheduler(BlockManager(128, BS), max_num_batched_tokens=budget, max_num_seqs=16,
                        max_prefill_chunk=chunk, enable_prefix_caching=True)



def test_copies_of_one_prompt_prefill_it_once():
    prompt = list(range(100, 130))  # 7 full blocks and 2 tokens
    sched = _scheduler()
    copies = [_seq(prompt) for _ in range(4)]
    other = _seq(list(range(10)))
    for s in [*copies, other]:
        sched.add(s)
    out = run_step(sched)
    assert out.seqs == [copies[0], other]  # the others wait for the leader's blocks
    assert out.stop is StopReason.PREFIX_PENDING
    out = run_step(sched)
    assert out.seqs[out.num_decodes:] == copies[1:]
    assert out.num_new_tokens[out.num_decodes:] == [30 - 7 * BS] * 3  # only the tail
    assert [s.num_cached_tokens for s in copies] == [0] + [7 * BS] * 3


def test_a_follower_waits_for_a_chunked_leader_then_takes_every_shared_block():
    system = list(range(200, 240))  # 10 full blocks
    sched = _scheduler(budget=16, chunk=8)
    leader, follower = _seq(system + [1, 2]), _seq(system + [3, 4, 5])
    sched.add(leader)
    run_step(sched)
    sched.add(follower)
    while follower.num_cached_tokens is None:
        out = run_step(sched)
        assert leader in out.seqs  # the leader never waits
    assert follower.num_cached_tokens == 40 and leader.num_computed >= 40


def test_copies_without_prefix_caching_prefill_together():
    sched = GenScheduler(BlockManager(128, BS), max_num_batched_tokens=128, max_num_seqs=16)
    copies = [_seq(list(range(100, 130))) for _ in range(3)]
    for s in copies:
        sched.add(s)
    assert run_step(sched).seqs == copies


# ---- the engine ---------------------------------------------------------------------

ENGINE = dict(kv_block_size=16, max_num_batched_tokens=4096, max_num_running_seqs=32)
PROMPT = token_lists([200], seed=41)[0]
HEAVY = SamplingParams(temperature=1.0, max_tokens=24, logprobs=20, ignore_eos=True)
PROBE = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def test_a_probe_waits_for_one_prefill_of_a_heavy_n16_logprobs_request(tiny_model,
                                                                         make_engine):
    """The echo-like request (the prompt scored, then 16 choices with logprobs=20) and a
    2-token probe: the probe finishes first, and while it ran the engine computed the
    shared prompt once, not 16 times."""
    engine = make_engine(tiny_model("qwen2"), **ENGINE)
    gen = engine.generation
    assert len(engine.score([PROMPT])[0]) == len(PROMPT) - 1  # echo's prompt logprobs
    heavy = [gen.make_sequence(PROMPT, HEAVY) for _ in range(16)]
    probe = gen.make_sequence([5, 6, 7], PROBE)
    for s in [*heavy, probe]:
        gen.submit(s)
    before = engine.stats.num_tokens
    while not probe.finished:
        engine.step()
    assert not any(s.finished for s in heavy)
    assert engine.stats.num_tokens - before < 2 * len(PROMPT)
    while not all(s.finished for s in heavy):
        engine.step()
    outs = [gen.processor.output(s) for s in heavy]
    assert all(len(o.logprobs) == 24 and all(len(e.top) == 20 for e in o.logprobs)
               for o in outs)
    assert [o.num_cached_tokens for o in outs] == [0] + [192] * 15


def test_shared_prefills_keep_the_tokens(tiny_model, make_engine):
    """Copies that took the leader's blocks generate what each generates alone with no
    cache (greedy), logprobs included."""
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    plain = make_engine(tiny_model("qwen2"), **ENGINE, enable_prefix_caching=False)
    want = plain.generate([PROMPT], params)[0]
    got = make_engine(tiny_model("qwen2"), **ENGINE).generate([PROMPT] * 6, params)
    assert [o.num_cached_tokens for o in got] == [0] + [192] * 5
    for out in got:
        assert out.token_ids == want.token_ids
        for a, b in zip(out.logprobs, want.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.fixture(scope="module")
def tokenized(tiny_model, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("llama-fair") / "model"
    shutil.copytree(tiny_model("llama"), path)
    return add_word_tokenizer(path)


async def _finish_order(engine, heavy) -> list[str]:
    order = []

    async def probe():
        await asyncio.sleep(0)  # the heavy request is queued first
        await engine.generate_async([[5, 6, 7]], PROBE)
        order.append("probe")

    async def timed_heavy():
        await heavy
        order.append("heavy")

    await asyncio.gather(timed_heavy(), probe())
    return order


@pytest.mark.timeout(300)
def test_the_probe_finishes_before_each_heavy_request(tokenized, make_engine):
    engine = make_engine(tokenized, **ENGINE)

    async def echo_n16():
        await engine.score_async([PROMPT])
        await engine.generate_async([PROMPT] * 16, HEAVY)

    async def many_stops():
        stops = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                               stop=tuple(f"<never {i}>" for i in range(10_000)))
        async for _ in engine.generate_stream(PROMPT[:32], stops):
            pass

    assert asyncio.run(_finish_order(engine, echo_n16())) == ["probe", "heavy"]
    assert asyncio.run(_finish_order(engine, many_stops())) == ["probe", "heavy"]
