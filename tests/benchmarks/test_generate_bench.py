"""The generation benchmark end to end on a few Azure-shaped requests: every system
runs, and in fp32 on CPU all three produce the same greedy tokens."""

from __future__ import annotations

import json


def test_generate_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks import generate

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "generate.json"
    result = generate.main(["--num-requests", "6", "--batch-sizes", "4", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "generate"
    assert set(result["systems"]) == {"hf_static_b4", "generate_batch", "ours"}
    assert all(e["status"] == "ok" for e in result["systems"].values())
    assert result["agreement_with_ours"] == {"hf_static_b4": 1.0, "generate_batch": 1.0}
    assert result["workload"]["num_requests"] == 6
    assert set(result["ratios"]) == {"ours_vs_hf_static_b4", "ours_vs_generate_batch"}
