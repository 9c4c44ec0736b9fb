"""The pooled benchmark's decoder case end to end on a few sequences: every packserve
attention rule scores like Hugging Face's padded batches, and the file says which rule
shipped."""

from __future__ import annotations

import json

import torch


def test_pooled_decoder_bench(tmp_path, monkeypatch):
    from benchmarks import pooled
    from worker.attention import cpu

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "pooled.json"
    pooled.main(["--tasks", "decoder", "--num-seqs", "6", "--repeats", "1",
                 "--threads", str(torch.get_num_threads()), "--out", str(out)])
    result = json.loads(out.read_text())["decoder"]
    assert result["num_seqs"] == 6 and 8 <= result["max_tokens"] <= 2048
    assert set(result["runs"]) == {"packserve", "packserve_legacy_grouping",
                                   "packserve_per_sequence_attention", "hf_padded_batches"}
    assert max(result["max_abs_diff_logprob"].values()) < 1e-4
    assert result["attention_rule"] == {"max_causal_len": cpu.MAX_CAUSAL_LEN,
                                        "causal_mask": False}
    assert cpu.RULE == cpu.GroupingRule()  # the benchmark put the shipped rule back
