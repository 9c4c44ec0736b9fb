"""The LoRA benchmark end to end on a few requests, and its adapters (written without
peft) are real PEFT adapters: peft loads them, and its merged model's greedy tokens are
the engine's with the adapter."""

from __future__ import annotations

import json


def test_lora_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks import lora

    monkeypatch.setenv("PACKSERVE_CHECKPOINTS", str(tmp_path))
    out = tmp_path / "lora.json"
    result = lora.main(["--shape", "tiny", "--num-requests", "6", "--adapters", "1,3",
                        "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "lora"
    assert set(result["systems"]) == {"base", "lora0", "qv_1", "qv_3", "all_1", "all_3"}
    assert result["systems"]["base"]["throughput_vs_base"] == 1.0
    assert all(len(e["runs"]) == 1 and e["generated_tokens_per_s"] > 0
               for e in result["systems"].values())
    assert result["grouped_mm"] is True


def test_benchmark_adapters_load_in_peft(tiny_model, tmp_path):
    from benchmarks.adapters import ALL_LINEAR, write_adapter
    from tests.factories import token_lists
    from tests.lora_factories import merged_model
    from tests.worker._gen_helpers import hf_greedy
    from worker import Engine, EngineConfig
    from worker.generate.sampling import SamplingParams

    base = tiny_model("qwen2")
    path = write_adapter(base, tmp_path / "a", r=8, targets=ALL_LINEAR, scale=0.3)
    prompt = token_lists([12], seed=4)[0]
    with Engine(EngineConfig(str(base), lora_modules=(("a", str(path)),))) as engine:
        got = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8),
                              lora="a")[0].token_ids
    assert got == hf_greedy(merged_model(base, path), prompt, 8)
