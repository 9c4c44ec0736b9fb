"""The GPU suite's summary: each result file of a suite run, read back against the
targets (``python -m benchmarks.suite_summary OUT_DIR``; ``gpu_suite.sh`` runs it last)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(out: Path, name: str) -> dict:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else {}


def tests(out: Path) -> list[str]:
    path = out / "junit_gpu.xml"
    if not path.exists():
        return ["gpu tests: no junit file"]
    root = ET.parse(path).getroot()
    s = root if root.tag == "testsuite" else root.find("testsuite")
    return [f"gpu tests: {s.get('tests')} run, {s.get('failures')} failed, {s.get('errors')} "
            f"errors, {s.get('skipped')} skipped"]


def decode(out: Path) -> list[str]:
    lines = []
    for entry in _load(out, "decode.json").get("shapes", []):
        lines.append(f"decode {entry['shape']}: backend {entry.get('paged_backend')}, graphs "
                     f"{'captured' if entry.get('graphs') else 'none'}")
        for cfg in entry.get("configs", []):
            modes = cfg.get("modes", {})
            ms = {m: r.get("ms_per_step") for m, r in modes.items()}
            floor = cfg.get("floor_ms")
            attn = cfg.get("attention_ms", {})
            parts = [f"{m} {v:.2f} ms" for m, v in ms.items() if isinstance(v, float)]
            if floor and isinstance(ms.get("triton+graphs"), float):
                parts.append(f"{ms['triton+graphs'] / floor:.2f}x floor ({floor:.2f} ms)")
            if isinstance(attn.get("triton"), float) and isinstance(attn.get("gather"), float):
                parts.append(f"attention gather/triton {attn['gather'] / attn['triton']:.1f}x")
            lines.append(f"  b={cfg['batch']} ctx={cfg['context']}: "
                         + ("; ".join(parts) if parts else cfg.get("status", "")))
    return lines


def generate(out: Path) -> list[str]:
    lines = []
    for name in ("generate_steady.json", "generate_128.json", "generate_baselines.json"):
        result = _load(out, name)
        for system, e in result.get("systems", {}).items():
            if e.get("status") != "ok":
                lines.append(f"{name} {system}: {e.get('status')} {e.get('error', '')}")
                continue
            extra = ""
            if e.get("ttft_s"):
                extra = (f", TTFT p50 {e['ttft_s']['p50']:.2f} s, TPOT p50 "
                         f"{e['tpot_s']['p50'] * 1e3:.1f} ms p99 {e['tpot_s']['p99'] * 1e3:.1f} ms")
            lines.append(f"{name} {system}: {e['generated_tokens_per_s']:,.0f} generated tok/s "
                         f"in {e['time_s']:.1f} s{extra}")
        bound = result.get("lower_bound")
        if bound:
            lines.append(f"{name}: lower bound {bound['lower_bound_s']:.2f} s, ours "
                         f"{bound['ours_vs_lower_bound']:.2f}x it")
    return lines


def forward(out: Path) -> list[str]:
    result = _load(out, "forward.json")
    lines = []
    for mode, e in result.get("modes", {}).items():
        lines.append(f"forward {mode}: {e.get('status')} {e.get('real_tokens_per_s') or 0:,.0f} "
                     f"real tok/s, MFU {e.get('mfu')}")
    return lines


def moe(out: Path) -> list[str]:
    result = _load(out, "moe.json")
    if not result:
        return []
    check = result["check"]
    lines = [f"moe {result['shape']} {result['dtype']}: start-up check "
             f"{check['layers_on_grouped_mm']}/{check['of_layers']} layers on grouped_mm, "
             f"fused kernel {check['fused_kernel']}"]
    for c in result.get("configs", []):
        lines.append(f"  T={c['tokens']}: loop {c['loop_ms']:.3f} ms, grouped {c['grouped_ms']:.3f}"
                     f" ms, {c['speedup']:.2f}x, rel err {c['rel_error']:.1e}")
    return lines


def specdec(out: Path) -> list[str]:
    result = _load(out, "specdec.json")
    lines = []
    for case in result.get("cases", []):
        for name, e in case["configs"].items():
            if name == "base":
                continue
            acc = "-" if e["acceptance"] is None else f"{e['acceptance']:.2f}"
            lines.append(f"specdec {case['workload']} b={case['batch']} {name}: "
                         f"{e['speedup']:.2f}x base, {e['tokens_per_step_per_seq']:.2f} "
                         f"tok/step/seq, acceptance {acc}, greedy identical "
                         f"{e['greedy_identical']}")
    for key, t in result.get("targets", {}).items():
        lines.append(f"specdec target {key}: {t['value']} (>= {t['target']}: {t['pass']})")
    return lines


def main(argv=None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    print("=== summary")
    for part in (tests, decode, moe, generate, forward, specdec):
        for line in part(out):
            print(line)


if __name__ == "__main__":
    main()
