"""The structured-outputs benchmark end to end at a small batch: every constrained output
finished by its grammar, the unconstrained run generated the same tokens, and the mask
time was measured."""

from __future__ import annotations

import json


def test_structured_bench(tmp_path):
    from benchmarks import structured

    out = tmp_path / "s.json"
    result = structured.main(["--batch", "4", "--repeats", "1", "--out", str(out)])
    (run,) = result["rounds"]
    assert run["finished_by_grammar"] == 4
    assert run["tokens"] > 4 * 20  # the schema needs at least 8 array items and 4 keys
    assert run["fill_ms_per_step"] > 0 and run["mask_ms_per_step"] >= run["fill_ms_per_step"]
    assert run["constrained_cpu_s"] > 0 and run["free_cpu_s"] > 0
    assert json.loads(out.read_text())["batch"] == 4
