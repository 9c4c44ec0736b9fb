"""CUDA-graph bucket padding, tested on CPU in eager mode (the test switch): padded
decode steps give the same tokens and the same KV cache as unpadded ones, padding rows
write only the scratch block and are never sampled; the step layout of a bucket does
not depend on what else the step holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.factories import mixed_lengths, token_lists
from worker.generate.cuda_graphs import DecodeGraphs, graph_buckets
from worker.generate.inputs import StepLayout
from worker.generate.sampling import SamplingParams

PROMPTS = token_lists(mixed_lengths(n=20, longest=40, seed=3), seed=4)
SETTINGS = dict(max_num_batched_tokens=64, max_num_running_seqs=12, max_prefill_chunk=16,
                kv_block_size=4)


def test_buckets():
    assert graph_buckets(256) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, *range(80, 257, 16))
    assert graph_buckets(5) == (1, 2, 4, 5)
    assert graph_buckets(1) == (1,)
    assert graph_buckets(70) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 70)


def test_bucket_choice_only_for_decode_only_steps(tiny_model, make_engine):
    from types import SimpleNamespace

    engine = make_engine(tiny_model("llama"), **SETTINGS)
    graphs = DecodeGraphs(engine.generation.runner, (1, 2, 4, 8), capture=False)
    step = lambda n, decodes, tokens=None: SimpleNamespace(  # noqa: E731
        seqs=[None] * n, num_decodes=decodes, num_tokens=n if tokens is None else tokens)
    assert [graphs.bucket(step(n, n)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert graphs.bucket(step(9, 9)) == 0  # larger than the largest bucket: eager
    assert graphs.bucket(step(4, 3)) == 0  # a prefill chunk in the step: eager
    assert graphs.bucket(step(4, 4, 6)) == 0  # decodes with speculative proposals: eager


def _run(engine, params, pad: bool):
    gen = engine.generation
    if pad:
        gen.runner.graphs = DecodeGraphs(gen.runner, graph_buckets(12), capture=False)
    outs = engine.generate(PROMPTS, params)
    return [o.token_ids for o in outs], gen


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=10),
    [SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=10) for i in range(20)],
], ids=["greedy", "seeded"])
def test_padded_decode_equals_unpadded(params, tiny_model, make_engine):
    path = tiny_model("llama")
    plain, gen_plain = _run(make_engine(path, **SETTINGS), params, pad=False)
    padded, gen_pad = _run(make_engine(path, **SETTINGS), params, pad=True)
    assert padded == plain
    assert gen_plain.runner.num_graph_steps == 0
    assert gen_pad.runner.num_graph_steps > 10  # most decode steps ran padded
    # Padding rows wrote to the scratch block (the cache's last) and nowhere else: every
    # other block holds what the unpadded run wrote there (up to float rounding: a
    # matmul over more rows may sum in another order).
    scratch = gen_pad.cache.num_blocks - 1
    assert scratch == gen_pad.blocks.num_blocks
    torch.testing.assert_close(gen_pad.cache.kv[:, :, :scratch], gen_plain.cache.kv[:, :, :scratch],
                               rtol=1e-4, atol=1e-5)
    assert gen_plain.cache.kv[:, :, scratch].abs().sum() == 0
    assert gen_pad.cache.kv[:, :, scratch].abs().sum() > 0


def test_padded_rows_change_no_logits(tiny_model, make_engine):
    """One decode step of 3 sequences run in bucket 4: the 3 real rows' logits equal the
    unpadded forward's."""
    engine = make_engine(tiny_model("qwen2"), **SETTINGS)
    gen = engine.generation
    seqs = [gen.make_sequence(p, SamplingParams(temperature=0, max_tokens=5))
            for p in PROMPTS[:3]]
    for seq in seqs:
        gen.submit(seq)
    while not all(s.is_decode and s.num_computed for s in seqs):  # prefill, first tokens
        gen.postprocess(out := gen.schedule(), gen.run(out))
    out = gen.schedule()
    assert out.num_decodes == 3 == len(out.seqs)
    runner = gen.runner
    captured = {}
    forward = runner.forward

    def spy(dev, meta, **kw):
        logits = forward(dev, meta, **kw)
        captured.setdefault(meta.layout.b, []).append(logits.clone())
        return logits

    runner.forward = spy
    runner.graphs = DecodeGraphs(runner, (4,), capture=False)
    padded = runner.run(out)
    runner.graphs = None  # the very same step again, unpadded (it rewrites the same K/V)
    plain = runner.run(out)
    torch.testing.assert_close(captured[4][0][:3], captured[3][0], rtol=1e-5, atol=1e-5)
    assert padded[1].token_ids == plain[1].token_ids and len(plain[1].token_ids) == 3
    gen.postprocess(out, plain)
    engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))  # still healthy


def test_bucket_layout_depends_on_the_bucket_alone():
    """A graph reads its inputs at fixed offsets: for T = S = B = b, every region's offset
    is a function of b, whatever the number of block-table updates."""
    for b in (1, 4, 24):
        layouts = [StepLayout(b, b, b, u) for u in (0, 3, 50)]
        assert len({(lay.i32, lay.updates) for lay in layouts}) == 1
        assert layouts[0].i32 == 5 * b


def test_stage_step_pads_with_scratch_rows(tiny_model, make_engine):
    engine = make_engine(tiny_model("llama"), **SETTINGS)
    gen = engine.generation
    runner = gen.runner
    seqs = [gen.make_sequence(p, SamplingParams(temperature=0, max_tokens=4)) for p in PROMPTS[:2]]
    for seq in seqs:
        gen.submit(seq)
    while not all(s.is_decode and s.num_computed for s in seqs):
        gen.postprocess(out := gen.schedule(), gen.run(out))
    out = gen.schedule()
    runner.graphs = DecodeGraphs(runner, (4,), capture=False)
    from worker.generate.inputs import stage_step

    rows, picked = runner._rows(out)
    meta = stage_step(runner.host.numpy(), runner.state, out.seqs, out.num_new_tokens, rows,
                      picked, pad_to=4)
    h, lay = runner.host.numpy(), meta.layout
    assert (lay.t, lay.s, lay.b) == (4, 4, 4) and meta.num_real == 2
    state = runner.state
    assert h[2:4].tolist() == [0, 0]  # padding tokens
    assert h[4 + 2: 8].tolist() == [0, 0]  # at position 0
    assert h[8 + 2: 12].tolist() == [state.scratch_slot] * 2  # K/V to the scratch slot
    assert h[12:16].tolist() == [0, 1, 2, 3]  # every row's logits are computed
    assert h[16:20].tolist() == [*rows.tolist(), state.pad_row, state.pad_row]
    i32 = h[lay.i32: lay.updates].view(np.int32)
    assert i32[:5].tolist() == [0, 1, 2, 3, 4]  # cu_seqlens_q
    assert i32[10:14].tolist()[2:] == [1, 1]  # padding rows see one key
    assert (state.tables[state.pad_row] == gen.blocks.num_blocks).all()
    for seq in out.seqs:  # the updates this staging took were never copied: stage them again
        runner.resync(seq)
    runner.graphs = None
    gen.postprocess(out, gen.run(out))


def test_whole_table_upload_when_too_many_entries_changed(tiny_model, make_engine):
    """More changed block-table entries than the staging buffer holds (after a resync of
    long sequences) upload the whole table instead: outputs stay identical."""
    params = SamplingParams(temperature=0, max_tokens=8)
    want, _ = _run(make_engine(tiny_model("llama"), **SETTINGS), params, pad=False)
    engine = make_engine(tiny_model("llama"), **SETTINGS)
    engine.generation.runner.max_updates = 1  # nearly every step overflows
    uploads = []
    engine.generation.runner.table = _Recording(engine.generation.runner.table, uploads)
    got, _ = _run(engine, params, pad=False)
    assert got == want
    assert len(uploads) > 5


class _Recording:
    """A tensor proxy that counts ``copy_`` calls (whole-table uploads)."""

    def __init__(self, tensor, calls):
        self._tensor, self._calls = tensor, calls

    def copy_(self, src):
        self._calls.append(src.shape)
        return self._tensor.copy_(src)

    def __getattr__(self, name):
        return getattr(self._tensor, name)

    def __getitem__(self, key):
        return self._tensor[key]
