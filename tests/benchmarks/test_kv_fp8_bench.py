"""The FP8 KV benchmark's capacity part on CPU (tiny shape): the same 1 GiB cap holds 4x
the blocks of the fp32 model's cache in e4m3, and the result file says so."""

from __future__ import annotations

import json


def test_kv_fp8_benchmark_cpu_capacity(tmp_path, monkeypatch):
    from benchmarks import kv_fp8

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "kv_fp8.json"
    result = kv_fp8.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "kv_fp8"
    auto, fp8 = result["runs"]["auto"], result["runs"]["fp8"]
    assert (auto["storage_dtype"], fp8["storage_dtype"]) == ("float32", "float8_e4m3fn")
    assert auto["kv_bytes_per_token"] == 4 * fp8["kv_bytes_per_token"]
    assert fp8["num_kv_blocks"] == 4 * auto["num_kv_blocks"] and result["block_ratio"] == 4
    assert fp8["capacity_tokens"] == 4 * auto["capacity_tokens"]
    assert abs(fp8["cache_gib"] - auto["cache_gib"]) < 0.01  # the same memory
    assert "decode_speedup" not in result  # CUDA only
