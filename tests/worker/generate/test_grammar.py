"""Structured outputs in the engine (worker/generate/grammar.py): closed object schemas,
the bitmask applied as the reference says, and constrained generation on the smoke
decoder (random weights: every valid output is the grammar's doing)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from worker.core.errors import InvalidRequestError
from worker.generate.grammar import Structured, apply_bitmask, closed
from worker.generate.sampling import SamplingParams


def test_closed_schemas_list_only_their_properties():
    schema = {"type": "object",
              "properties": {"a": {"type": "object", "properties": {"x": {}}},
                             "b": {"type": "array", "items": {"properties": {"y": {}}}},
                             "open": {"properties": {}, "additionalProperties": True}},
              "$defs": {"D": {"properties": {"z": {}}}},
              "anyOf": [{"properties": {"q": {}}}]}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["b"]["items"]["additionalProperties"] is False
    assert out["properties"]["open"]["additionalProperties"] is True  # said so: kept
    assert out["$defs"]["D"]["additionalProperties"] is False
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not changed
    assert closed({"type": "object"}) == {"type": "object"}  # no properties: any object


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [1, 3]])
def test_apply_bitmask_matches_the_reference(rows):
    rng = np.random.default_rng(0)
    vocab = 70  # not a multiple of 32: the last word's high bits are past the vocabulary
    bits = rng.integers(0, 2, size=(len(rows), 96)).astype(np.uint8)
    mask = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(np.int32).copy())
    logits = torch.randn(5, vocab)
    want = logits.clone()
    for k, r in enumerate(rows):
        want[r, torch.from_numpy(bits[k, :vocab] == 0)] = float("-inf")
    apply_bitmask(logits, torch.tensor(rows), mask)
    assert torch.equal(logits, want)


@pytest.fixture(scope="module")
def engine():
    from worker import Engine, EngineConfig

    with Engine(EngineConfig(model="smoke:decoder", max_model_len=512,
                             num_kv_blocks=256)) as e:
        yield e


def test_constrained_generation_follows_the_grammar(engine):
    tok = engine.generation.processor.tokenizer
    prompt = tok("give me json")["input_ids"]
    schema = {"type": "object", "required": ["name", "n"],  # no additionalProperties
              "properties": {"name": {"type": "string", "maxLength": 8},
                             "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s,
                             structured=Structured.json(schema)) for s in range(6)]
    for out in engine.generate([prompt] * 6, params):
        assert out.finish_reason.value == "stop"
        value = json.loads(out.text)
        assert set(value) == {"name", "n"} and 0 <= value["n"] <= 9
    choice = engine.generate([prompt], SamplingParams(
        max_tokens=20, temperature=1.0, seed=1, structured=Structured.choice(["yes", "no"])))
    assert choice[0].text in ("yes", "no")
    regex = engine.generate([prompt], SamplingParams(
        max_tokens=20, temperature=1.0, seed=2, structured=Structured("regex", r"[0-9]{3}")))
    assert re.fullmatch(r"[0-9]{3}", regex[0].text)


def test_a_constraint_that_does_not_compile_names_response_format(engine):
    with pytest.raises(InvalidRequestError, match="does not compile") as info:
        engine.generate([[5, 6]], SamplingParams(
            max_tokens=4, structured=Structured.json({"type": "frobnicate"})))
    assert info.value.setting == "response_format"
