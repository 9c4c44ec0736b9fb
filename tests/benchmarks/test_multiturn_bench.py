"""The multi-turn benchmark's in-process mode end to end on the tiny shape: the shared
workload hits the prefix cache only with caching on, the fresh one never does."""

from __future__ import annotations


def test_multiturn_inprocess(tmp_path, monkeypatch):
    from benchmarks import multiturn

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    result = multiturn.main(["--modes", "inprocess", "--shape", "tiny", "--conversations", "2",
                             "--turns", "3", "--system-tokens", "40", "--repeats", "1",
                             "--max-model-len", "2048", "--out", str(tmp_path / "m.json")])
    runs = result["inprocess"]
    assert runs["cache_on"]["hit_rate"] > 0.3  # the system prompt and earlier turns
    assert runs["cache_off"]["hit_rate"] == 0
    assert runs["unique_cache_on"]["hit_rate"] == 0 == runs["unique_cache_off"]["hit_rate"]
    assert runs["cache_on"]["computed_tokens"] < runs["cache_off"]["computed_tokens"]
    assert runs["cache_on"]["requests"] == 6
    assert set(runs["ratios"]) == {"throughput_on_vs_off", "ttft_p50_off_vs_on",
                                   "unique_throughput_on_vs_off", "unique_cpu_s_on_vs_off",
                                   "unique_cache_work_share"}
    assert runs["unique_cache_on"]["cache_work_s"] > 0 == runs["unique_cache_off"]["cache_work_s"]
    assert runs["cache_on"]["cpu_s"] > 0
