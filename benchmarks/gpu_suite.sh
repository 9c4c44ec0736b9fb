#!/usr/bin/env bash
# One run on a lent GPU machine (H100; no network, no Ray, no flash-attn; torch 2.11,
# transformers 5.17, Python 3.12 as python3). Every step is guarded: a failure or a
# timeout is logged and the next step runs. Total wall time is kept under 9 minutes
# by a global deadline that shortens (or skips) the later steps.
#
#   bash benchmarks/gpu_suite.sh                      # on the GPU machine, writes into $OUT
#   DRY_RUN=1 PY=.venv/bin/python bash benchmarks/gpu_suite.sh   # CPU rehearsal, tiny shape
#
# Files written into $OUT (8, flat):
#   suite.log         everything printed, the step table and the summary
#   gpu_tests.log     pytest -m gpu tests/worker, then pytest tests/packing
#   junit_gpu.xml     junit of the GPU tests
#   junit_packing.xml junit of the packer tests (built extension on this Python)
#   probe.txt         python -m worker.probe --shape qwen2.5-7b --dtype bfloat16
#   forward_h100.json benchmarks/forward.py, Qwen2.5-7B shape, Azure lengths, batch 32
#   forward_h100.png  its bar chart
#   extras.json       {"probe": ..., "fit_search": ..., "h2d": ...}
#
# Optional: a folder .gpu_pydeps/ at the repository root (e.g. `pip install --target
# .gpu_pydeps pytest hypothesis pytest-timeout`, pure-Python wheels) is put on
# PYTHONPATH when the machine lacks pytest.

set -o pipefail
set -u

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/packserve-suite-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
DEADLINE_S=${DEADLINE_S:-530}
WORK=$(mktemp -d /tmp/packserve-suite.XXXXXX)

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 PACKSERVE_CHECKPOINTS=${PACKSERVE_CHECKPOINTS:-/tmp/packserve-ckpt}
mkdir -p "$PACKSERVE_CHECKPOINTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 1 ]; then
  SHAPE=tiny DEVICE=cpu DTYPE=float32 NUM_SEQS=48 REPEATS=1 FIT_MAX=16384
else
  SHAPE=qwen2.5-7b DEVICE=cuda DTYPE=bfloat16 NUM_SEQS=${NUM_SEQS:-256} REPEATS=${REPEATS:-1}
  FIT_MAX=1048576
fi

exec > >(tee -a "$OUT/suite.log") 2>&1
STEPS=()

# run_step NAME CAP_SECONDS COMMAND...: runs under `timeout`, capped by the deadline.
# ONLY="name name ..." runs just those steps (e.g. a second call for what is left).
ONLY=${ONLY:-}
run_step() {
  local name=$1 cap=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((DEADLINE_S - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: skipped, ${left}s left before the deadline"
    STEPS+=("$name|skipped|0")
    return 0
  fi
  echo "=== $name (limit ${limit}s, t=${SECONDS}s): $*"
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  local status=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timeout"
  [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="rc=$rc"
  echo "=== $name: $status in $((SECONDS - start))s"
  STEPS+=("$name|$status|$((SECONDS - start))")
  return 0
}

echo "packserve GPU suite: $(date -u +%FT%TZ), dry_run=$DRY_RUN, out=$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
$PY - <<'EOF' 2>&1 || true
import sys, torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers",
      transformers.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for mod in ("pynvml", "pytest", "hypothesis", "Cython", "matplotlib", "flash_attn"):
    try:
        __import__(mod); print(f"  {mod}: yes")
    except ImportError:
        print(f"  {mod}: NO")
EOF

if ! $PY -c "import pytest" 2>/dev/null && [ -d "$REPO/.gpu_pydeps" ]; then
  export PYTHONPATH="$REPO/.gpu_pydeps:$PYTHONPATH"
  echo "pytest missing: using $REPO/.gpu_pydeps"
fi

# 1. The Cython packer for this Python (never in a dry run: it would overwrite the
#    checkout's build). Falls back to the pure-Python twin.
build_packer() {
  if $PY setup.py build_ext --inplace >"$WORK/build.log" 2>&1; then
    echo "built with setup.py build_ext --inplace"
  elif $PY -m pip install --no-build-isolation --no-deps -e . >>"$WORK/build.log" 2>&1; then
    echo "built with pip install --no-build-isolation --no-deps -e ."
  else
    tail -20 "$WORK/build.log"; return 1
  fi
}
if [ "$DRY_RUN" = 1 ]; then
  echo "=== build: skipped in a dry run"
  STEPS+=("build|skipped|0")
else
  run_step build 150 bash -c "$(declare -f build_packer); PY='$PY' WORK='$WORK' build_packer"
fi
if ! $PY -W error::RuntimeWarning -c "import packing_cy; assert packing_cy.IMPLEMENTATION == 'cython'" 2>/dev/null; then
  echo "NOTE: the Cython packer is not importable here; the pure-Python twin runs instead"
  export PACKSERVE_PURE_PYTHON=1
fi
$PY -c "import packing_cy; print('packing_cy implementation:', packing_cy.IMPLEMENTATION)" || true

# 2. Tests: GPU-marked worker tests, then the packer suite against the built kernel.
run_step gpu_tests 150 bash -c "$PY -m pytest -m gpu tests/worker -q -rs --continue-on-collection-errors \
  --junitxml='$OUT/junit_gpu.xml' >'$OUT/gpu_tests.log' 2>&1; rc=\$?; tail -5 '$OUT/gpu_tests.log'; exit \$rc"
run_step packing_tests 60 bash -c "$PY -m pytest tests/packing -q --junitxml='$OUT/junit_packing.xml' \
  >>'$OUT/gpu_tests.log' 2>&1; rc=\$?; tail -3 '$OUT/gpu_tests.log'; exit \$rc"

# 3. The random-weight checkpoint, built once on the device in its dtype and reused.
run_step checkpoint 150 $PY -c "from benchmarks._common import ensure_checkpoint as e; \
print(e('$SHAPE', '$DTYPE', '$DEVICE'))"

# 4. The Phase-0 probe, as the engine runs it at start-up.
run_step probe 120 bash -c "$PY -m worker.probe --shape $SHAPE --dtype $DTYPE --device $DEVICE \
  --json '$WORK/probe.json' >'$OUT/probe.txt' 2>&1; rc=\$?; cat '$OUT/probe.txt' | grep -v '^INFO'; exit \$rc"
BUDGET_ARGS=()
PROBED=$($PY -c "import json; print(json.load(open('$WORK/probe.json'))['budget_tokens'])" 2>/dev/null) \
  && [ "$DRY_RUN" != 1 ] && BUDGET_ARGS=(--budget "$PROBED")

# 5. Packed vs padded forward (the headline), with the probed budget.
run_step forward 240 $PY benchmarks/forward.py --shape $SHAPE --device $DEVICE --dtype $DTYPE \
  --workload azure --batch-size 32 --num-seqs "$NUM_SEQS" --repeats "$REPEATS" ${BUDGET_ARGS[@]+"${BUDGET_ARGS[@]}"} \
  --out "$OUT/forward_h100.json" --plot "$OUT/forward_h100.png"

# 6. Host-to-device bandwidth, pinned vs pageable.
run_step h2d 60 $PY benchmarks/h2d.py --device $DEVICE --out "$WORK/h2d.json"

# 7. The probe's budget against the largest packed bin that fits (time-boxed search).
# Search seconds: what is left after the model load and the probe's warm-ups (~60 s).
FIT_LIMIT=$((DEADLINE_S - SECONDS - 60))
[ "$FIT_LIMIT" -gt 120 ] && FIT_LIMIT=120
[ "$FIT_LIMIT" -lt 20 ] && FIT_LIMIT=20
run_step fit_search 200 $PY benchmarks/fit_search.py --shape $SHAPE --device $DEVICE --dtype $DTYPE \
  --max-tokens $FIT_MAX --time-limit $FIT_LIMIT --out "$WORK/fit_search.json"

# 8. Generation: every gpu test again (paged attention included), then offline throughput against HF
#    generate (static batches of 32) and transformers' generate_batch, Qwen2.5-1.5B shape.
run_step gen_tests 120 bash -c "$PY -m pytest -m gpu tests/worker -q -rs --continue-on-collection-errors \
  --junitxml='$OUT/junit_gen.xml' >'$OUT/gen_tests.log' 2>&1; rc=\$?; tail -5 '$OUT/gen_tests.log'; exit \$rc"
GEN_SHAPE=qwen2.5-1.5b; [ "$DRY_RUN" = 1 ] && GEN_SHAPE=tiny
run_step generate 330 $PY -m benchmarks.generate --shape $GEN_SHAPE --device $DEVICE \
  --num-requests "${GEN_REQUESTS:-128}" --batch-sizes 32 --out "$OUT/generate_h100.json"

# 9. The probe without the clamp: its extrapolated budget must be verified by a run.
run_step probe_verify 150 bash -c "$PY -m worker.probe --shape $SHAPE --dtype $DTYPE --device $DEVICE \
  --max-budget-tokens $FIT_MAX --json '$WORK/probe_verify.json' >'$OUT/probe_verify.txt' 2>&1; \
  rc=\$?; grep -v '^INFO' '$OUT/probe_verify.txt' | tail -12; exit \$rc"

# Combine the small results, then the summary.
$PY - "$WORK" "$OUT" <<'EOF' || true
import json, sys, pathlib
work, out = map(pathlib.Path, sys.argv[1:])
extras = {}
for name in ("probe", "fit_search", "h2d", "probe_verify"):
    path = work / f"{name}.json"
    extras[name] = json.loads(path.read_text()) if path.exists() else None
if any(extras.values()):
    (out / "extras.json").write_text(json.dumps(extras, indent=2))
EOF

echo
echo "=== steps (deadline ${DEADLINE_S}s, total ${SECONDS}s)"
printf '%-16s %-10s %6s\n' step status seconds
for row in "${STEPS[@]}"; do IFS='|' read -r n s t <<<"$row"; printf '%-16s %-10s %6s\n' "$n" "$s" "$t"; done
$PY - "$OUT" <<'EOF' || true
import json, pathlib, sys, xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else {}
print("=== summary")
for junit in ("junit_gpu.xml", "junit_packing.xml"):
    p = out / junit
    if p.exists():
        s = ET.parse(p).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        print(f"{junit:<18} tests {s.get('tests')} failures {s.get('failures')} "
              f"errors {s.get('errors')} skipped {s.get('skipped')}")
fw, ex = load("forward_h100.json"), load("extras.json")
for mode, e in fw.get("modes", {}).items():
    tps, mfu, peak = e.get("real_tokens_per_s"), e.get("mfu"), e.get("peak_memory_gib")
    print(f"{mode:<18} {e.get('status'):<6} real tok/s {tps or 0:>10,.0f}  peak GiB "
          f"{'n/a' if peak is None else round(peak, 2)}  MFU {mfu if mfu is None else round(mfu, 3)}")
for k, v in fw.get("ratios", {}).items():
    print(f"{k:<28} {v if v is None else round(v, 3)}")
probe = (ex.get("probe") or {})
print("probe budget tokens", probe.get("budget_tokens"), "raw", probe.get("raw_budget_tokens"))
fit = ex.get("fit_search") or {}
print("fit search: largest fit", fit.get("largest_fit_tokens"), "smallest OOM",
      fit.get("smallest_oom_tokens"), "stop", fit.get("stop"))
for row in (ex.get("h2d") or {}).get("sizes", [])[-1:]:
    print(f"h2d {row['mib']} MiB: pageable {row['pageable']['gb_per_s']:.1f} GB/s, pinned "
          f"{(row.get('pinned') or {}).get('gb_per_s', float('nan')):.1f} GB/s")
EOF
rm -rf "$WORK"
echo "done in ${SECONDS}s"
sleep 1  # let tee flush suite.log
