"""Structured outputs that cannot be followed, or cost too much, never end as a silent
"stop" (worker/generate/grammar.py, grammar_compile.py): budgets refuse with errors that
name the limit, what llguidance finds at compile time is an ``InvalidRequestError``, a
matcher that fails while generating finishes "error", and a compile never holds up the
step loop. The smoke decoder has random weights: only the grammar makes output valid."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

from worker.core.errors import InvalidRequestError
from worker.generate import grammar_compile
from worker.generate.grammar import GrammarState, Grammars, Structured, advance, failure
from worker.generate.grammar_compile import GrammarLimits
from worker.generate.sampling import SamplingParams
from worker.generate.sequence import FinishReason

DEAD_AFTER_A_WORD = Structured("lark", 'start: "yes" dead | "no" dead\n'
                                       'dead: /[^\\x00-\\U0010FFFF]/')  # empty lexeme


@pytest.fixture(scope="module")
def engine():
    from worker import Engine, EngineConfig

    with Engine(EngineConfig(model="smoke:decoder", max_model_len=256,
                             num_kv_blocks=128)) as e:
        yield e


@pytest.fixture()
def prompt(engine):
    return engine.generation.processor.tokenizer("answer")["input_ids"]


def grammars(engine, **limits) -> Grammars:
    gen = engine.generation
    return Grammars(gen.processor.tokenizer, gen.vocab_size, frozenset(),
                    GrammarLimits(**limits))


@pytest.mark.parametrize("structured, limit", [
    (Structured.choice([f"option {i}" for i in range(50_000)]), "max_grammar_bytes"),
    (Structured.json({"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(5_000)}}), "max_grammar_object_properties"),
])
def test_the_issues_huge_constraints_are_refused_naming_the_limit(engine, structured, limit):
    with pytest.raises(InvalidRequestError, match=f"{limit}=") as info:
        engine.generation.grammars.check(structured)
    assert info.value.setting == f"engine.{limit}"
    assert info.value.limit == getattr(GrammarLimits(), limit)


def test_each_budget_names_its_limit_value_and_setting(engine):
    small = grammars(engine, max_grammar_bytes=200, max_grammar_choices=10, max_grammar_object_properties=3)
    cases = [(Structured("regex", "a" * 201), "max_grammar_bytes", "201 bytes"),
             (Structured.choice([str(i) for i in range(11)]), "max_grammar_choices", "11 options"),
             (Structured.json({"properties": {k: {} for k in "abcd"}}),
              "max_grammar_object_properties", "4 properties")]
    for structured, limit, value in cases:
        with pytest.raises(InvalidRequestError) as info:
            small.check(structured)
        assert f"{limit}={getattr(small.limits, limit)}" in str(info.value)
        assert value in str(info.value) and info.value.setting == f"engine.{limit}"
    with pytest.raises(ValueError, match="engine.max_grammar_choices"):
        GrammarLimits(max_grammar_choices=0)


def test_a_compile_over_its_time_budget_is_refused_and_stays_refused(engine, monkeypatch):
    gate = threading.Event()
    real = grammar_compile.build
    monkeypatch.setattr(grammar_compile, "build", lambda *a: (gate.wait(30), real(*a))[1])
    quick = grammars(engine, grammar_compile_timeout_s=0.05)
    try:
        for _ in range(2):  # the second is the cached refusal
            with pytest.raises(InvalidRequestError, match="grammar_compile_timeout_s=0.05") as info:
                quick.check(Structured("regex", "[0-9]{4}"))
            assert info.value.setting == "engine.grammar_compile_timeout_s"
    finally:
        gate.set()


@pytest.mark.parametrize("structured", [
    Structured("regex", r"[^\x00-\U0010FFFF]"),  # compiles, matches nothing
    Structured.json({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}),
    Structured.json({"type": "object", "properties": {"a": {"$ref": "#"}},  # infinite
                     "required": ["a"]}),
    Structured("lark", 'start: "zq" dead\ndead: /[^\\x00-\\U0010FFFF]/'),  # forced dead end
])
def test_constraints_no_output_can_satisfy_are_refused_at_compile(engine, prompt, structured):
    with pytest.raises(InvalidRequestError, match="can never be satisfied") as info:
        engine.generate([prompt], SamplingParams(max_tokens=8, structured=structured))
    assert info.value.setting == "response_format"


def test_a_matcher_that_dead_ends_finishes_error_not_stop(engine, prompt, caplog):
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s,
                             structured=DEAD_AFTER_A_WORD) for s in range(3)]
    with caplog.at_level(logging.WARNING, logger="worker.generate.output"):
        outs = engine.generate([prompt] * 3, params)
    for out in outs:
        assert out.finish_reason is FinishReason.ERROR and out.text in ("yes", "no")
        assert "NoExtensionBias" in out.error and "lark constraint" in out.error
        assert any(f"request {out.request_id} " in r.getMessage() for r in caplog.records)
    stream = engine.generate_stream(prompt, params[0])
    deltas = asyncio.run(_collect(stream))
    assert deltas[-1].finish_reason is FinishReason.ERROR and deltas[-1].error
    assert all(d.error is None for d in deltas[:-1])


async def _collect(stream):
    return [d async for d in stream]


def test_a_refused_token_fails_the_matcher(engine):
    gen = engine.generation
    matcher = gen.grammars.matcher(Structured("regex", "[0-9]+"))
    letter = gen.processor.tokenizer("x", add_special_tokens=False)["input_ids"][0]
    assert advance(matcher, letter) is GrammarState.FAILED and failure(matcher)


def test_large_choices_and_optional_objects_past_llguidances_row_limit_work(engine, prompt):
    options = [f"opt{i:05d}" for i in range(5_000)]  # llguidance's default: 2,000 a row
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                               for i in range(1_000)}}
    choice = SamplingParams(max_tokens=24, temperature=1.0, seed=3,
                            structured=Structured.choice(options))
    objects = [SamplingParams(max_tokens=24, temperature=1.0, seed=s,
                              structured=Structured.json(schema)) for s in range(4)]
    outs = engine.generate([prompt] * 5, [choice, *objects])
    assert outs[0].finish_reason is FinishReason.STOP and outs[0].text in options
    for out in outs[1:]:
        assert out.finish_reason is not FinishReason.ERROR, out.error
        if out.finish_reason is FinishReason.STOP:
            assert set(json.loads(out.text)) <= set(schema["properties"])
    assert any(out.text.startswith('{"p') for out in outs[1:])  # past `{"`: a property


def test_the_edges_check_is_the_engines_compile(engine, prompt):
    structured = Structured.choice(["left", "right", "up"])
    engine.generation.grammars.check(structured)
    seq = engine.generation.make_sequence(prompt, SamplingParams(structured=structured))
    assert seq.grammar is None and seq.matcher is not None  # compiled, not queued again


def test_a_compiling_grammar_holds_back_only_its_own_request(engine, prompt, monkeypatch):
    """The probe is submitted after the big request and finishes first, while the big
    request's compile is held; the step loop steps all along (counted, not timed)."""
    gate, started = threading.Event(), threading.Event()
    real = grammar_compile.build

    def held(*args):
        started.set()
        gate.wait(30)
        return real(*args)

    monkeypatch.setattr(grammar_compile, "build", held)
    big = Structured.choice([f"choice-{i}" for i in range(10_000)])

    async def run():
        slow = asyncio.ensure_future(engine.generate_async(
            [prompt], SamplingParams(max_tokens=24, structured=big)))
        await asyncio.to_thread(started.wait, 30)
        steps = engine.stats.num_steps
        probe = await engine.generate_async([prompt], SamplingParams(max_tokens=4,
                                                                     ignore_eos=True))
        held_back = not slow.done() and not gate.is_set()
        stepped = engine.stats.num_steps - steps
        gate.set()
        return probe, held_back, stepped, await slow

    try:
        probe, held_back, stepped, slow = asyncio.run(run())
    finally:
        gate.set()
    assert held_back and stepped >= 4 and len(probe[0].token_ids) == 4
    assert slow[0].finish_reason is FinishReason.STOP and slow[0].text.startswith("choice-")


def test_a_request_whose_compile_fails_later_gets_the_error(engine, prompt):
    structured = Structured("regex", r"a[^\x00-\U0010FFFF]")  # new: not cached yet
    with pytest.raises(InvalidRequestError, match="can never be satisfied"):
        asyncio.run(engine.generate_async([prompt], SamplingParams(structured=structured)))
    engine.check_kv_invariants()
