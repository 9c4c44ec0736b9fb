"""The decode benchmark and the GPU suite's summary end to end on CPU (tiny shape): every
configuration runs and reports its host split; the summary reads the files back."""

from __future__ import annotations

import json


def test_decode_benchmark_cpu(tmp_path, monkeypatch, capsys):
    from benchmarks import decode, suite_summary

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "decode.json"
    result = decode.main(["--device", "cpu", "--batches", "1,4", "--contexts", "40",
                          "--steps", "3", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "decode"
    configs = result["shapes"][0]["configs"]
    assert [(c["batch"], c["context"]) for c in configs] == [(1, 40), (4, 40)]
    for c in configs:
        run = c["modes"]["eager"]
        assert run["ms_per_step"] > 0 and run["host_ms_total"] > 0
        assert set(run["host_ms"]) == {"schedule", "stage", "postprocess"}
    capsys.readouterr()
    suite_summary.main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "decode tiny" in printed and "b=4 ctx=40" in printed


def test_generate_lower_bound_and_latency(tmp_path, monkeypatch):
    from benchmarks import generate

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    result = generate.main(["--num-requests", "4", "--systems", "ours", "--lower-bound",
                            "--out", str(tmp_path / "g.json")])
    ours = result["systems"]["ours"]
    assert ours["status"] == "ok"
    assert 0 < ours["ttft_s"]["p50"] <= ours["time_s"]
    assert ours["tpot_s"]["p50"] > 0
    bound = result["lower_bound"]
    assert bound["lower_bound_s"] > 0 and bound["ours_vs_lower_bound"] > 0
    assert bound["longest_generated"] == max(result["workload"]["generated_tokens"]["max"], 1)
