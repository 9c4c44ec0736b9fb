#!/usr/bin/env bash
# Everything that waits on a GPU, in ONE call of at most 8 minutes (a lent GPU session has
# 15 device minutes in all, start-up included). The GPU machine: one H200 (or H100), no
# network, no Ray, no flash-attn; torch 2.11, transformers 5.17, Triton 3.6, python3.
# Every step is guarded: a failure or a time-out is logged and the next step runs. A
# global deadline (DEADLINE_S, 450 s) shortens or skips the later steps, which are in
# order of importance.
#
#   bash benchmarks/gpu_suite.sh                                    # on the GPU machine, into $OUT
#   DRY_RUN=1 PY=.venv/bin/python OUT=/tmp/suite bash benchmarks/gpu_suite.sh   # CPU rehearsal
#
# Files written into $OUT (flat):
#   suite.log               everything printed, the step table and the summary
#   gpu_tests.log           pytest -m gpu tests/worker (Triton kernel, graphs, engine), packer tests
#   junit_gpu.xml           junit of the GPU tests
#   decode.json             benchmarks/decode.py: ms per decode step vs the bandwidth floor,
#                           triton+graphs / triton eager / gather, 1.5B and 7B shapes
#   moe.json                benchmarks/moe.py: one Mixtral-8x7B-shaped MoE block, per-expert
#                           loop vs grouped_mm at 1..2,048 tokens, and the start-up check
#   generate_steady.json    benchmarks/generate.py, 1,024 Azure requests, ours only (1.5B shape)
#   generate_128.json       the 128-request Azure run, ours, with its lower bound
#   forward.json, .png      packed vs padded prefill, Qwen2.5-7B shape (budget 65,536)
#   family_matrix.log      the family matrix on the GPU, junit_family.xml its junit
#   generate_baselines.json the 128-request run's HF baselines, if time is left
#   lora.json               benchmarks/lora.py: 1 and 8 LoRA adapters against the base model
#   fp8.json                benchmarks/fp8.py: FP8 weights against bf16, prefill and decode
#   kv_fp8.json             benchmarks/kv_fp8.py: KV blocks and decode with an FP8 KV cache
#   specdec.json            benchmarks/specdec.py: ngram / draft speculation vs none, batch 1 and 16
#   tp.json                 benchmarks/tp.py: TP=2 against TP=1 (skipped with one GPU)
#
# Optional: a folder .gpu_pydeps/ at the repository root (`pip install --target .gpu_pydeps
# pytest hypothesis pytest-timeout`, pure-Python wheels) is put on PYTHONPATH when the
# machine lacks pytest.

set -o pipefail
set -u

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/packserve-suite-out}
mkdir -p "$OUT"
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
DEADLINE_S=${DEADLINE_S:-450}
WORK=$(mktemp -d /tmp/packserve-suite.XXXXXX)

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 PACKSERVE_CHECKPOINTS=${PACKSERVE_CHECKPOINTS:-/tmp/packserve-ckpt}
mkdir -p "$PACKSERVE_CHECKPOINTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu DTYPE=float32 GEN_SHAPE=tiny PREFILL_SHAPE=tiny DECODE_ARGS=(--batches 1,16 --steps 3)
  STEADY=64 SHORT=16 NUM_SEQS=32 BUDGET=(--budget 8192)
else
  DEVICE=cuda DTYPE=bfloat16 GEN_SHAPE=qwen2.5-1.5b PREFILL_SHAPE=qwen2.5-7b DECODE_ARGS=()
  STEADY=1024 SHORT=128 NUM_SEQS=${NUM_SEQS:-256} BUDGET=(--budget 65536)
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
  if [ "$limit" -lt 20 ]; then
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
for mod in ("triton", "pynvml", "pytest", "hypothesis", "Cython", "matplotlib", "flash_attn"):
    try:
        m = __import__(mod); print(f"  {mod}: yes {getattr(m, '__version__', '')}")
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
  else
    tail -20 "$WORK/build.log"; return 1
  fi
}
if [ "$DRY_RUN" = 1 ]; then
  echo "=== build: skipped in a dry run"
  STEPS+=("build|skipped|0")
else
  run_step build 90 bash -c "$(declare -f build_packer); PY='$PY' WORK='$WORK' build_packer"
fi
if ! $PY -W error::RuntimeWarning -c "import packing_cy; assert packing_cy.IMPLEMENTATION == 'cython'" 2>/dev/null; then
  echo "NOTE: the Cython packer is not importable here; the pure-Python twin runs instead"
  export PACKSERVE_PURE_PYTHON=1
fi

# 2. Tests: every gpu-marked worker test (the Triton kernel compiled, graphs, the engine's
#    fast path against the eager gather path), then the packer suite.
if [ "$DRY_RUN" = 1 ]; then
  TESTS="tests/worker/generate/test_decode_graphs.py tests/worker/attention/test_paged_selection.py"
  MARK=()
else
  TESTS="tests/worker --ignore=tests/worker/models/test_gpu_family_matrix.py"
  MARK=(-m gpu)
fi
run_step gpu_tests 110 bash -c "$PY -m pytest ${MARK[*]} $TESTS -q -rs -x -p no:cacheprovider \
  --junitxml='$OUT/junit_gpu.xml' >'$OUT/gpu_tests.log' 2>&1; rc=\$?; tail -8 '$OUT/gpu_tests.log'; exit \$rc"
run_step packing_tests 40 bash -c "$PY -m pytest tests/packing -q -p no:cacheprovider \
  >>'$OUT/gpu_tests.log' 2>&1; rc=\$?; tail -2 '$OUT/gpu_tests.log'; exit \$rc"

# 3. Decode steps against the bandwidth floor (builds the 1.5B and 7B checkpoints).
DECODE_SHAPES=qwen2.5-1.5b,qwen2.5-7b; [ "$DRY_RUN" = 1 ] && DECODE_SHAPES=tiny
run_step decode 150 $PY -m benchmarks.decode --device $DEVICE --shapes $DECODE_SHAPES \
  ${DECODE_ARGS[@]+"${DECODE_ARGS[@]}"} --out "$OUT/decode.json"

# 4. The MoE layer: transformers' per-expert loop vs grouped_mm experts, one Mixtral-8x7B
#    block in bf16 (2.6 GiB), well under the 45 s cap; the dry run times a tiny CPU block.
MOE_ARGS=(); [ "$DRY_RUN" = 1 ] && MOE_ARGS=(--shape tiny --tokens 1,16 --repeats 2 --threads 1)
run_step moe 45 $PY -m benchmarks.moe --device $DEVICE ${MOE_ARGS[@]+"${MOE_ARGS[@]}"} \
  --out "$OUT/moe.json"

# 5. Generation under steady load: 1,024 Azure requests (contexts clipped to 4k), ours.
run_step generate_steady 110 $PY -m benchmarks.generate --shape $GEN_SHAPE --device $DEVICE \
  --num-requests $STEADY --systems ours --out "$OUT/generate_steady.json"

# 6. The 128-request run, ours, with its lower bound (batch-1 steps + prefill).
run_step generate_128 70 $PY -m benchmarks.generate --shape $GEN_SHAPE --device $DEVICE \
  --num-requests $SHORT --systems ours --lower-bound --out "$OUT/generate_128.json"

# 7. Packed vs padded prefill, Qwen2.5-7B shape (the headline of the forward path).
run_step forward 110 $PY benchmarks/forward.py --shape $PREFILL_SHAPE --device $DEVICE --dtype $DTYPE \
  --workload azure --batch-size 32 --num-seqs "$NUM_SEQS" --repeats 1 "${BUDGET[@]}" \
  --out "$OUT/forward.json" --plot "$OUT/forward.png"

# 8. The family matrix on the GPU: every decoder family on each paged backend that runs
#    there, bf16, tokens checked against HF fp32 (tests/worker/models/test_gpu_family_matrix.py).
#    A dry run collects it only (it needs CUDA).
FAMILY_ARGS=(-m gpu); [ "$DRY_RUN" = 1 ] && FAMILY_ARGS=(--collect-only)
run_step family_matrix 90 bash -c "$PY -m pytest ${FAMILY_ARGS[*]} \
  tests/worker/models/test_gpu_family_matrix.py -q -rs -p no:cacheprovider \
  --junitxml='$OUT/junit_family.xml' >'$OUT/family_matrix.log' 2>&1; rc=\$?; \
  tail -8 '$OUT/family_matrix.log'; exit \$rc"

# 9. Multi-LoRA serving cost (benchmarks/lora.py): 1 and 8 adapters, q/v and all-linear,
#    rank 16, against the base model on 128 Azure requests (target: 8 adapters within 15%).
LORA_ARGS=(--shape $GEN_SHAPE --num-requests $SHORT --adapters 1,8 --repeats 1)
[ "$DRY_RUN" = 1 ] && LORA_ARGS=(--shape tiny --num-requests 16 --adapters 1,8 --repeats 1)
run_step lora 90 $PY -m benchmarks.lora --device $DEVICE "${LORA_ARGS[@]}" --out "$OUT/lora.json"

# 9b. FP8 weights (benchmarks/fp8.py): quantization=fp8 against bf16, prefill and decode
#     on 128 Azure requests, weight bytes (target: decode >= 1.3x bf16 at batch 128).
FP8_ARGS=(--shape $GEN_SHAPE --num-requests $SHORT --repeats 1)
[ "$DRY_RUN" = 1 ] && FP8_ARGS=(--shape tiny --num-requests 16 --repeats 1)
run_step fp8 75 $PY -m benchmarks.fp8 --device $DEVICE "${FP8_ARGS[@]}" --out "$OUT/fp8.json"

# 9c. FP8 KV cache (benchmarks/kv_fp8.py): KV blocks at the same budget, and decode at
#     batch 128 over 1,024-token prompts, with the model dtype's cache and with FP8.
KV_FP8_ARGS=(--steps 32); [ "$DRY_RUN" = 1 ] && KV_FP8_ARGS=()
run_step kv_fp8 120 $PY -m benchmarks.kv_fp8 --device $DEVICE "${KV_FP8_ARGS[@]}" \
  --out "$OUT/kv_fp8.json"

# 9d. Speculative decoding (benchmarks/specdec.py): ngram and a 1-layer draft against none,
#     greedy, batch 1 and 16, copy-heavy and plain prompts, 1.5B dims (Mistral, window 4,
#     random weights): wall time, tokens per step, acceptance, tokens identical to base.
#     JSON written after each case, so a time-out keeps what ran.
SPECDEC_ARGS=(--shape qwen2.5-1.5b --batches 1,16 --max-tokens 64 --repeats 1)
[ "$DRY_RUN" = 1 ] && SPECDEC_ARGS=(--quick)
run_step specdec 60 $PY -m benchmarks.specdec --device $DEVICE "${SPECDEC_ARGS[@]}" \
  --out "$OUT/specdec.json"

# 10. The 128-request run's baselines (HF static batches of 32, generate_batch), if time is left.
run_step generate_baselines 400 $PY -m benchmarks.generate --shape $GEN_SHAPE --device $DEVICE \
  --num-requests $SHORT --systems hf_static,generate_batch --batch-sizes 32 \
  --out "$OUT/generate_baselines.json"

# 11. Tensor parallelism at 2 ranks against 1, the smoke decoder (benchmarks/tp.py): skips
#     itself (SKIP, exit 0) on a machine with one GPU; the dry run runs it on the CPU.
run_step tp 60 $PY -m benchmarks.tp --device $DEVICE --tp 2 --out "$OUT/tp.json"

echo
echo "=== steps (deadline ${DEADLINE_S}s, total ${SECONDS}s)"
printf '%-20s %-10s %6s\n' step status seconds
for row in "${STEPS[@]}"; do IFS='|' read -r n s t <<<"$row"; printf '%-20s %-10s %6s\n' "$n" "$s" "$t"; done
$PY -m benchmarks.suite_summary "$OUT" || true
rm -rf "$WORK"
echo "done in ${SECONDS}s"
sleep 1  # let tee flush suite.log
