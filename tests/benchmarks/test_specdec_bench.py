"""The speculative decoding benchmark end to end (``--quick``: tiny shape, 16 tokens,
batches 1 and 4, the load sweep at 1 and 2, k fixed and the engine's rule): every configuration runs, the JSON has its
fields, and, a real check of exactness, speculative greedy tokens equal the
non-speculative ones for ngram and the draft model on both workloads, with the copy
workload built so that prompt lookup is accepted."""

from __future__ import annotations

import json


def test_specdec_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks import specdec

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "specdec.json"
    result = specdec.main(["--quick", "--sweep-load", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "specdec" and saved["quick"] is True
    assert {(c["workload"], c["batch"]) for c in saved["cases"]} == {
        (w, b) for w in ("copy", "plain") for b in (1, 4)}
    fields = {"wall_s", "speedup", "tokens_per_step", "tokens_per_step_per_seq", "acceptance",
              "acceptance_by_position", "proposed", "accepted", "greedy_identical", "runs"}
    for case in saved["cases"]:
        assert set(case["configs"]) == {"base", "ngram", "draft", "draft_fixed"}
        for name, entry in case["configs"].items():
            assert fields <= set(entry), (case["workload"], case["batch"], name)
            assert entry["greedy_identical"] is True, (case["workload"], case["batch"], name,
                                                       entry.get("mismatch"))
            assert len(entry["runs"]) == 1 and entry["wall_s"] > 0
        base = case["configs"]["base"]
        assert base["proposed"] == 0 and base["tokens_per_step_per_seq"] <= 1.0
        for name in ("ngram", "draft", "draft_fixed"):
            assert len(case["configs"][name]["acceptance_by_position"]) == 4  # k
        if case["workload"] == "copy":  # the answers quote the prompt, lookup finds them
            assert base["quote_fraction"] >= 0.9
            ngram = case["configs"]["ngram"]
            assert ngram["acceptance"] >= 0.9 and ngram["tokens_per_step_per_seq"] > 2
        assert case["configs"]["draft_fixed"]["proposed"] > 0  # the draft's tokens verified
    assert set(saved["targets"]) == set(specdec.TARGETS)
    assert all(isinstance(t["pass"], bool) for t in saved["targets"].values())
    rows = saved["sweep_load"]["rows"]
    assert [(r["workload"], r["batch"]) for r in rows] == [
        ("copy", 1), ("copy", 2), ("plain", 1), ("plain", 2)]
    assert all(r["greedy_identical"] is True and r["speedup"] > 0 and r["rule"]["speedup"] > 0
               for r in rows)
    assert saved["sweep_load"]["fixed_k"]["adaptive"] is False
    assert all(r["acceptance"] >= 0.9 for r in rows if r["workload"] == "copy")
    assert result["all_greedy_identical"] is True
