"""The FP8 benchmark end to end on a few requests: both configurations run, the FP8 one
on FP8 layers (``_scaled_mm`` on this CPU) with fewer weight bytes."""

from __future__ import annotations

import json


def test_fp8_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks import fp8

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "fp8.json"
    result = fp8.main(["--shape", "tiny", "--num-requests", "6", "--repeats", "1",
                       "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "fp8"
    base, q = result["systems"]["base"], result["systems"]["fp8"]
    assert base["fp8_layers"] == 0 and q["fp8_layers"] == 2 * 7  # tiny: 2 layers
    assert q["fp8_mode"] == "scaled_mm"
    assert q["weight_bytes"] < base["weight_bytes"]
    assert all(len(e["runs"]) == 1 and e["generated_tokens_per_s"] > 0
               and e["prefill_tokens_per_s"] > 0 for e in (base, q))
