"""The token budget probe on CPU: fake NVML, a fake allocator, a fake packed forward."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from worker.budget.nvml import FakeNvmlReader, NvmlDeviceRef, PynvmlReader, resolve_nvml_device
from worker.budget.probe import (
    BudgetError,
    ProbeSettings,
    WarmupPoint,
    WarmupStop,
    config_budget,
    conservative_line,
    fit_line,
    kv_bytes_per_token,
    measure_budget,
)
from worker.budget.report import GIB, KIB

MIB = 1 << 20
QWEN7B = SimpleNamespace(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         hidden_size=3584)


class FakeGpu:
    """Allocator counters plus a forward that peaks at baseline + fixed + per_token * n.

    ``capacity`` is what the allocator can really get; a forward above it raises the
    error torch raises, whatever NVML claims.
    """

    def __init__(self, *, baseline: int, fixed: int, per_token: int, capacity: int) -> None:
        self.baseline, self.fixed, self.per_token = baseline, fixed, per_token
        self.capacity = capacity
        self.peak, self.calls, self.released = baseline, [], 0

    def allocated_bytes(self) -> int:
        return self.baseline

    def reset_peak(self) -> None:
        self.peak = self.baseline

    def peak_allocated_bytes(self) -> int:
        return self.peak

    def release_cached(self) -> None:
        self.released += 1

    def run_packed(self, n: int) -> None:
        self.calls.append(n)
        need = self.baseline + self.fixed + self.per_token * n
        if need > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {need} bytes")
        self.peak = need


def _measure(gpu: FakeGpu, nvml: FakeNvmlReader, **settings) -> object:
    return measure_budget(gpu.run_packed, model_config=QWEN7B, dtype_bytes=2, nvml=nvml,
                          memory=gpu, settings=ProbeSettings(**settings), parameter_bytes=15 * GIB)


def _expected(total, used, cap, margin, fixed, per_token) -> int:
    """The documented formula, in exact integer arithmetic (cap as a fraction of 100)."""
    usable = total * int(cap * 100) // 100 - used - margin - fixed
    return usable // per_token


def test_budget_arithmetic_matches_the_formula():
    gpu = FakeGpu(baseline=15 * GIB, fixed=256 * MIB, per_token=100 * KIB + 40, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=16 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=1 << 22, margin_bytes=GIB)
    raw = _expected(80 * GIB, 16 * GIB, 0.90, GIB, 256 * MIB, 100 * KIB + 40)
    assert report.source == "measured"
    assert report.activation_bytes_per_token == pytest.approx(100 * KIB + 40)
    assert report.activation_fixed_bytes == pytest.approx(256 * MIB)
    assert report.raw_budget_tokens == raw
    assert report.budget_tokens == raw // 16 * 16
    assert report.total_bytes == 80 * GIB and report.used_bytes == 16 * GIB
    assert report.weights_allocated_bytes == 15 * GIB and report.parameter_bytes == 15 * GIB
    assert report.kv_bytes_per_token == 57344 and not report.reserve_kv
    # It stopped growing before a size the fit says would not fit; it never hit OOM.
    assert report.warmup_stop == WarmupStop.PREDICTED_OVER_CAP.value
    # The warm-ups, then one run of the (extrapolated) budget itself, which fits.
    assert gpu.calls[-2] * 2 > raw and gpu.released == 0
    assert [p.num_tokens for p in report.warmup] == gpu.calls[:-1]
    assert gpu.calls[-1] == report.budget_tokens and report.verify_backoffs == 0


def test_reserving_kv_adds_kv_bytes_per_token():
    gpu = FakeGpu(baseline=15 * GIB, fixed=0, per_token=64 * KIB, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=16 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=1 << 22, reserve_kv=True, margin_bytes=0)
    raw = _expected(80 * GIB, 16 * GIB, 0.90, 0, 0, 64 * KIB + 57344)
    assert report.raw_budget_tokens == raw
    assert report.bytes_per_token == pytest.approx(64 * KIB + 57344)


def test_budget_is_clamped_to_max_and_rounded_to_align():
    gpu = FakeGpu(baseline=GIB, fixed=0, per_token=KIB, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=2 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=5000, align=64)
    assert report.warmup_stop == WarmupStop.REACHED_MAX.value
    assert gpu.calls == [512, 1024, 2048, 4096, 5000]
    assert report.raw_budget_tokens > 5000
    assert report.budget_tokens == 4992  # 5000 rounded down to a multiple of 64


@pytest.mark.parametrize("align", [1, 16, 48, 128])
def test_rounding_down_to_align(align):
    gpu = FakeGpu(baseline=GIB, fixed=3 * MIB, per_token=777 * KIB + 13, capacity=40 * GIB)
    nvml = FakeNvmlReader(total_bytes=40 * GIB, used_bytes=3 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=1 << 20, align=align)
    assert report.budget_tokens % align == 0
    assert report.budget_tokens <= report.raw_budget_tokens < report.budget_tokens + align


def test_override_skips_measurement_but_reports_what_was_read():
    gpu = FakeGpu(baseline=15 * GIB, fixed=0, per_token=KIB, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=17 * GIB)
    report = _measure(gpu, nvml, override_tokens=12345)
    assert gpu.calls == []
    assert report.source == "override" and report.budget_tokens == 12345
    assert report.total_bytes == 80 * GIB and report.used_bytes == 17 * GIB
    assert report.weights_allocated_bytes == 15 * GIB
    assert report.activation_bytes_per_token is None and report.warmup == ()


def test_oom_during_warm_up_stops_growing_and_uses_the_points_so_far():
    # NVML claims 80 GiB but the allocator gets only 20: the fit cannot foresee the OOM.
    gpu = FakeGpu(baseline=15 * GIB, fixed=0, per_token=MIB, capacity=15 * GIB + 3000 * MIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=16 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=1 << 20)
    assert gpu.calls[:4] == [512, 1024, 2048, 4096]
    assert report.warmup_stop == WarmupStop.OUT_OF_MEMORY.value
    assert [p.num_tokens for p in report.warmup] == [512, 1024, 2048]
    assert report.activation_bytes_per_token == pytest.approx(MIB)
    # The extrapolation (from NVML's 80 GiB) does not fit the real 3000 MiB: verification
    # backs off, freeing the cache after each OOM, until the budget runs, or falls back
    # to the largest warm-up that ran.
    assert report.verify_backoffs > 0 and gpu.released == 1 + report.verify_backoffs
    assert report.budget_tokens * MIB <= 3000 * MIB


def test_oom_at_the_first_size_raises_naming_it():
    gpu = FakeGpu(baseline=15 * GIB, fixed=0, per_token=MIB, capacity=15 * GIB + 100 * MIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=16 * GIB)
    with pytest.raises(BudgetError, match="512 tokens"):
        _measure(gpu, nvml)


def test_errors_other_than_oom_propagate():
    def broken(n: int) -> None:
        raise RuntimeError("device-side assert triggered")

    gpu = FakeGpu(baseline=GIB, fixed=0, per_token=KIB, capacity=80 * GIB)
    with pytest.raises(RuntimeError, match="device-side assert"):
        measure_budget(broken, model_config=QWEN7B, dtype_bytes=2,
                       nvml=FakeNvmlReader(80 * GIB, 2 * GIB), memory=gpu)


def test_too_little_memory_raises_naming_the_settings():
    gpu = FakeGpu(baseline=GIB, fixed=0, per_token=MIB, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=20 * GIB, used_bytes=18 * GIB - 5 * MIB)
    with pytest.raises(BudgetError, match="utilization_cap"):
        _measure(gpu, nvml, margin_bytes=0)


def test_log_lines_give_every_factor_in_gib_and_kib():
    gpu = FakeGpu(baseline=15 * GIB, fixed=256 * MIB, per_token=100 * KIB, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=16 * GIB, name="H100 test")
    report = _measure(gpu, nvml, max_budget_tokens=1 << 22, margin_bytes=2 * GIB)
    text = "\n".join(report.to_log_lines())
    for expected in (
        "total memory (NVML): 80.000 GiB",
        "used after weights (NVML): 16.000 GiB",
        "free after weights (NVML): 64.000 GiB",
        "weights allocated (torch): 15.000 GiB",
        "parameter bytes: 15.000 GiB",
        "margin: 2.000 GiB",
        "activation fixed (fit intercept): 0.250 GiB",
        "used after warm-up (NVML, allocator cache kept): 16.000 GiB",
        "utilization cap: 0.90 -> 72.000 GiB",
        "activation per token: 100.00 KiB",
        "kv per token: 56.00 KiB",
        "H100 test",
        f"budget: {report.budget_tokens} tokens",
        "of free memory",
        "stop: next size predicted over the cap",
    ):
        assert expected in text, expected


def test_config_budget_for_cpu():
    report = config_budget(8192, align=16)
    assert report.source == "config" and report.budget_tokens == 8192
    assert report.total_bytes is None
    assert report.to_log_lines() == ["budget source: config", "budget: 8192 tokens (align 16)"]


def test_kv_bytes_per_token_with_and_without_head_dim():
    assert kv_bytes_per_token(QWEN7B, 2) == 2 * 28 * 4 * 128 * 2
    mha = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, head_dim=32)
    assert kv_bytes_per_token(mha, 4) == 2 * 2 * 4 * 32 * 4


def test_fit_line_clamps_a_negative_intercept():
    slope, intercept = fit_line([WarmupPoint(100, 900), WarmupPoint(200, 2100)])
    assert intercept == 0.0
    assert slope == pytest.approx((100 * 900 + 200 * 2100) / (100**2 + 200**2))
    assert fit_line([WarmupPoint(512, 1024)]) == (2.0, 0.0)


@pytest.mark.parametrize(
    "field, value, name",
    [("utilization_cap", 1.5, "utilization_cap"), ("margin_bytes", -1, "margin_bytes"),
     ("align", 0, "align"), ("override_tokens", 0, "override_tokens"),
     ("max_budget_tokens", 8, "max_budget_tokens")],
)
def test_settings_errors_name_the_field(field, value, name):
    with pytest.raises(ValueError, match=name):
        ProbeSettings(**{field: value})


# --- CUDA_VISIBLE_DEVICES -> NVML ------------------------------------------------------

@pytest.mark.parametrize(
    "visible, cuda_index, expected",
    [
        (None, 0, NvmlDeviceRef("index", "0")),
        (None, 3, NvmlDeviceRef("index", "3")),
        ("2,3", 1, NvmlDeviceRef("index", "3")),
        (" 6 , 7 ", 0, NvmlDeviceRef("index", "6")),
        ("GPU-aaaa-1111,GPU-bbbb-2222", 1, NvmlDeviceRef("uuid", "GPU-bbbb-2222")),
        ("MIG-0f3c-77", 0, NvmlDeviceRef("uuid", "MIG-0f3c-77")),
        ("5,GPU-cc", 1, NvmlDeviceRef("uuid", "GPU-cc")),
    ],
)
def test_visible_devices_map_to_nvml(visible, cuda_index, expected):
    assert resolve_nvml_device(cuda_index, visible) == expected


@pytest.mark.parametrize("visible, cuda_index", [("", 0), ("0,-1,2", 1), ("4", 1)])
def test_devices_cuda_cannot_see_raise_naming_the_variable(visible, cuda_index):
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        resolve_nvml_device(cuda_index, visible)


def _fake_pynvml(monkeypatch) -> list:
    """A stand-in ``pynvml`` module recording which handle was opened."""
    opened: list = []
    uuids = ["GPU-aaaa-1111", "GPU-bbbb-2222"]
    mod = types.ModuleType("pynvml")
    mod.NVMLError = type("NVMLError", (Exception,), {})
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(uuids)
    mod.nvmlDeviceGetHandleByIndex = lambda i: opened.append(("index", i)) or ("h", i)
    mod.nvmlDeviceGetUUID = lambda h: uuids[h[1]]

    def by_uuid(uuid):
        if uuid not in uuids:
            raise mod.NVMLError("not found")
        opened.append(("uuid", uuid))
        return ("h", uuids.index(uuid))

    mod.nvmlDeviceGetHandleByUUID = by_uuid
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=80, used=10 + h[1],
                                                            free=70 - h[1])
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return opened


def test_pynvml_reader_opens_the_physical_device(monkeypatch):
    opened = _fake_pynvml(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    reader = PynvmlReader()
    assert reader.read(0).used_bytes == 11
    assert opened == [("index", 1)]
    assert reader.device_name(0) == "NVIDIA H100 80GB HBM3"


def test_pynvml_reader_accepts_uuid_prefixes(monkeypatch):
    opened = _fake_pynvml(monkeypatch)
    reader = PynvmlReader("GPU-bbbb")
    assert reader.read(0).used_bytes == 11
    assert reader.read(0).free_bytes == 69
    assert ("uuid", "GPU-bbbb") not in opened  # the prefix went through enumeration


# --- the CLI and the engine hook, on CPU ---------------------------------------------

class _FlatMemory:
    """Allocator counters that never move: the fit sees no activation growth."""

    def __init__(self) -> None:
        self.resets = 0

    def allocated_bytes(self) -> int:
        return GIB

    def reset_peak(self) -> None:
        self.resets += 1

    def peak_allocated_bytes(self) -> int:
        return GIB

    def release_cached(self) -> None:
        pass


def test_measure_engine_runs_the_engines_synthetic_forward(tiny_model):
    from worker import Engine, EngineConfig
    from worker.budget.cli import measure_engine

    settings = ProbeSettings(max_budget_tokens=512, warmup_start_tokens=64)
    memory = _FlatMemory()
    with Engine(EngineConfig(model=str(tiny_model("llama")), max_num_batched_tokens=512)) as engine:
        report = measure_engine(engine, settings, nvml=FakeNvmlReader(8 * GIB, GIB), memory=memory)
    assert [p.num_tokens for p in report.warmup] == [64, 128, 256, 512]
    assert memory.resets == 4
    assert report.activation_bytes_per_token == 0.0 and report.budget_tokens == 512
    assert report.parameter_bytes > 0 and report.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_cli_on_cpu_says_the_budget_comes_from_configuration(tiny_model, capsys):
    from worker.budget.cli import main

    assert main(["--model", str(tiny_model("llama")), "--device", "cpu", "--budget", "4096"]) == 0
    out = capsys.readouterr().out
    assert "budget comes from configuration" in out
    assert "budget source: config" in out and "budget: 4096 tokens" in out
    assert out.startswith("family: llama (proven:")  # the family matrix proves it


def test_cli_says_when_a_family_is_not_proven(tmp_path, capsys):
    from transformers import FalconConfig

    from worker.budget.cli import main

    FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=512).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("family: falcon NOT PROVEN (model family 'falcon')")
    assert "allow_untested_model" in out and "gemma2" in out


def test_cli_probe_flags_run_the_probe_over_the_engine(tiny_model, monkeypatch):
    """The CUDA branch with --cap/--margin-gib, on CPU with fake memory readers."""
    import argparse

    import worker.budget.nvml
    import worker.budget.probe
    from worker.budget.cli import cuda_report

    monkeypatch.setattr(worker.budget.probe, "TorchCudaMemory", lambda index: _FlatMemory())
    monkeypatch.setattr(worker.budget.nvml, "default_reader", lambda: FakeNvmlReader(8 * GIB, GIB))
    args = argparse.Namespace(dtype="auto", align=16, cap=0.5, margin_gib=0.25, override=None,
                              reserve_kv=None, max_budget_tokens=256, allow_untested_model=False)
    report = cuda_report(args, str(tiny_model("llama")), "cpu")
    assert report.source == "measured"
    assert report.utilization_cap == 0.5 and report.margin_bytes == GIB // 4
    assert report.max_budget_tokens == 256 and report.budget_tokens == 256
    assert [p.num_tokens for p in report.warmup] == [256]


def test_cli_probe_flags_are_for_one_device(tiny_model):
    """``-tp N`` is the engine's own probe over its N ranks; the flags that re-run the
    probe by hand drive one device, so together they are refused before anything loads."""
    import argparse

    from worker.budget.cli import _parse, cuda_report

    assert _parse(["--model", "m", "-tp", "4"]).tensor_parallel_size == 4
    args = argparse.Namespace(dtype="auto", align=16, cap=0.5, margin_gib=None, override=None,
                              reserve_kv=None, max_budget_tokens=None, allow_untested_model=False,
                              tensor_parallel_size=2)
    with pytest.raises(SystemExit, match="probe one device; drop them, or --tensor-parallel"):
        cuda_report(args, str(tiny_model("llama")), "cuda")


# Warm-up peaks over baseline measured on an H100 (Qwen2.5-7B shape, bf16), and the
# peak over baseline of the largest bin that fit there: benchmarks/results/h100/extras.json.
H100_WARMUP = [(512, 575_157_760), (1024, 713_037_824), (2048, 720_381_952),
               (4096, 735_070_208), (8192, 1_205_862_400), (16384, 2_375_024_640),
               (32768, 4_715_970_560), (65536, 9_396_289_536)]
H100_LARGEST_FIT = (397_696, 72_155_738_624 - 15_279_468_544)


def test_conservative_slope_follows_the_largest_warm_ups():
    points = [WarmupPoint(n, b) for n, b in H100_WARMUP]
    lsq_slope, lsq_intercept = fit_line(points)
    slope, intercept = conservative_line(points)
    top = (H100_WARMUP[-1][1] - H100_WARMUP[-2][1]) / (H100_WARMUP[-1][0] - H100_WARMUP[-2][0])
    assert slope == pytest.approx(top) and slope > lsq_slope
    n, measured = H100_LARGEST_FIT
    # The least-squares line under-predicts the real bin by over 3%; the top segment's
    # line is within 1% of it.
    assert (lsq_intercept + lsq_slope * n) / measured < 0.97
    assert abs((intercept + slope * n) / measured - 1) < 0.01


def test_conservative_line_is_the_fit_on_linear_data():
    points = [WarmupPoint(n, 1000 + 7 * n) for n in (512, 1024, 2048)]
    assert conservative_line(points) == pytest.approx(fit_line(points))


def test_an_extrapolated_budget_is_run_and_backed_off_until_it_fits():
    # NVML claims 80 GiB, but the allocator can only reach 60 GiB (fragmentation, other
    # allocations): the extrapolated budget runs out of memory and must back off.
    gpu = FakeGpu(baseline=15 * GIB, fixed=256 * MIB, per_token=140 * KIB, capacity=60 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=15 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=1 << 20, warmup_start_tokens=4096)
    assert report.warmup_stop == WarmupStop.PREDICTED_OVER_CAP.value
    assert report.verify_backoffs > 0
    assert report.budget_tokens > report.warmup[-1].num_tokens
    assert gpu.baseline + gpu.fixed + gpu.per_token * report.budget_tokens <= gpu.capacity
    assert report.budget_tokens in gpu.calls  # the budget itself ran
    assert any("back-off" in line for line in report.to_log_lines())


def test_a_budget_within_the_warm_ups_is_not_rerun():
    gpu = FakeGpu(baseline=15 * GIB, fixed=256 * MIB, per_token=140 * KIB, capacity=80 * GIB)
    nvml = FakeNvmlReader(total_bytes=80 * GIB, used_bytes=15 * GIB)
    report = _measure(gpu, nvml, max_budget_tokens=65536)
    assert report.budget_tokens == 65536 and report.verify_backoffs == 0
    assert gpu.calls.count(65536) == 1
