"""The MoE benchmark end to end on CPU (tiny block): both implementations timed, equal
outputs, the start-up check recorded; the GPU suite's summary reads the file back."""

from __future__ import annotations

import json


def test_moe_benchmark_cpu(tmp_path, capsys):
    from benchmarks import moe, suite_summary

    out = tmp_path / "moe.json"
    result = moe.main(["--device", "cpu", "--shape", "tiny", "--tokens", "1,3",
                       "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "moe"
    assert result["check"] == {"layers_on_grouped_mm": 2, "of_layers": 2, "fused_kernel": False}
    assert [c["tokens"] for c in result["configs"]] == [1, 3]
    for c in result["configs"]:
        assert c["loop_ms"] > 0 and c["grouped_ms"] > 0 and c["rel_error"] < 1e-5
    assert result["configs"][0]["experts_hit"] == 2  # one token, top-2
    capsys.readouterr()
    suite_summary.main([str(tmp_path)])
    assert "moe tiny float32: start-up check 2/2" in capsys.readouterr().out
