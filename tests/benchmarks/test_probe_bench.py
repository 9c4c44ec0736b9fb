"""``python -m benchmarks.probe``: a benchmark shape's random weights through the worker's
budget CLI (which itself takes only ``--model``: ``worker/`` imports nothing from
``benchmarks/``)."""

from __future__ import annotations


def test_a_shape_is_built_and_its_budget_reported(capsys):
    from benchmarks import probe

    assert probe.main(["--shape", "tiny", "--device", "cpu", "--budget", "4096"]) == 0
    out = capsys.readouterr().out
    assert "budget: 4096 tokens" in out
    assert "model: " in out and "packserve-tiny-float32" in out  # the built checkpoint
