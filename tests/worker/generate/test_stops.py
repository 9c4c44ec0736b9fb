"""Stop strings matched where the text grew (worker/generate/stops.py) against their
definition: the earliest occurrence of any stop string in the whole text, and the
longest tail that may still grow into one; then 10,000 stop strings through the engine."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import mixed_lengths, token_lists
from tests.worker._gen_helpers import add_word_tokenizer
from worker.generate.sampling import SamplingParams
from worker.generate.sequence import FinishReason
from worker.generate.stops import StopStrings

SMALL = {"max_num_batched_tokens": 64, "max_num_running_seqs": 16, "max_prefill_chunk": 16}
PROMPT = token_lists(mixed_lengths(n=12, longest=60, seed=2), seed=4)[6]
ALPHABET = "ab c."  # few letters: stop strings occur often, overlap and nest


def earliest(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def settled(text: str, stops) -> str:
    text = text.rstrip("\ufffd")
    for k in range(max((len(s) for s in stops), default=1) - 1, 0, -1):
        if len(text) >= k and any(s.startswith(text[-k:]) for s in stops):
            return text[:-k]
    return text


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=6),
       chunks=st.lists(st.text(ALPHABET, max_size=4), min_size=1, max_size=12))
def test_incremental_matches_equal_a_rescan_of_the_whole_text(stops, chunks):
    matcher, text = StopStrings(tuple(stops)), ""
    for chunk in chunks:  # the text grows as tokens are decoded
        text += chunk
        assert matcher.settled(text) == settled(text, stops)
        got, want = matcher.find(text), earliest(text, stops)
        assert got == want
        if want is not None:
            break  # the sequence stops here


def test_a_rewritten_tail_is_checked_again():
    """A detokenizer may change the last characters when a token arrives (a partial
    UTF-8 character completed): the match across them is still found."""
    matcher = StopStrings(("é!",))
    assert matcher.find("abc\ufffd") is None
    assert matcher.find("abcé!") == 3


def test_ten_thousand_stop_strings_stop_like_one(tokenized, make_engine):
    """The real stop string among 9,999 that never occur: the same cut as alone."""
    engine = make_engine(tokenized, **SMALL)
    params = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    full = engine.generate([PROMPT], SamplingParams(**params))[0]
    stop = " ".join(full.text.split(" ")[3:5])
    decoys = [f"zz{i}" for i in range(9_999)]
    alone = engine.generate([PROMPT], SamplingParams(**params, stop=[stop]))[0]
    many = engine.generate([PROMPT], SamplingParams(**params, stop=decoys + [stop]))[0]
    assert many.finish_reason is FinishReason.STOP
    assert (many.text, many.token_ids) == (alone.text, alone.token_ids)
    assert many.text == full.text[: full.text.index(stop)]


@pytest.fixture(scope="module")
def tokenized(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-stops") / "model"
    shutil.copytree(tiny_model("llama"), path)
    return add_word_tokenizer(path)
