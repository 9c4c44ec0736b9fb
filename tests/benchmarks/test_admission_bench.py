"""The admission benchmark's workload without Serve: lengths from the Azure trace that
fit the context, and prompt texts of the drawn token counts that share no prefix (the
prefix cache would otherwise hide the KV they use). The Serve run itself is `make
bench-admission`."""

from __future__ import annotations

import argparse

import numpy as np


def test_the_workload_fits_the_context_and_prompts_share_no_prefix():
    from transformers import AutoTokenizer

    from benchmarks.admission import chat_lengths, prompt_texts
    from worker.models.sources import resolve_model

    args = argparse.Namespace(scale=0.25, context=1024)
    prompt, output = chat_lengths(args)
    assert len(prompt) == len(output) > 1000
    assert prompt.min() >= 4 and output.min() >= 1
    assert (prompt + output).max() <= args.context - 32  # room for the chat template
    assert np.percentile(output, 99) > 3 * np.percentile(output, 50)  # long-tailed
    tok = AutoTokenizer.from_pretrained(resolve_model("smoke:decoder"))
    lengths = np.array([4, 40, 255, 512])
    texts = prompt_texts(tok, lengths, np.random.default_rng(0))
    for n in lengths:
        got = len(tok(texts[int(n)])["input_ids"])
        assert n <= got <= n + 8, (n, got)
    heads = {tuple(tok(texts[int(n)])["input_ids"][:4]) for n in lengths}
    assert len(heads) == len(lengths)
