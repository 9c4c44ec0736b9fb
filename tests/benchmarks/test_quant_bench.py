"""The int8 benchmark end to end on a few texts: packserve int8 and fp32 always (the
baselines join when their libraries are installed, and are named when left out), the
quality figures are cosines to the fp32 reference and int8 stays close to it."""

from __future__ import annotations

import json

import torch


def test_quant_bench(tmp_path):
    from benchmarks import quant

    out = tmp_path / "quant.json"
    quant.main(["--num-texts", "24", "--repeats", "1", "--threads",
                str(torch.get_num_threads()), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["num_texts"] == 24 and result["cpu_int8_config"] in ("avx512_vnni", "avx2")
    ran = set(result["runs"])
    assert {"packserve_int8", "packserve_fp32"} <= ran
    assert ran | set(result["modes_left_out"]) == set(quant.MODES)
    cos = result["cosine_to_reference"]
    assert cos[result["quality_reference"]]["min"] > 0.9999
    assert cos["packserve_fp32"]["min"] > 0.9999  # fp32 equals ST (or is the reference)
    assert 0.98 <= cos["packserve_int8"]["min"] < 0.99999  # quantized, and close
    assert result["packserve_int8_speedup_wall"]["packserve_int8"] == 1.0
