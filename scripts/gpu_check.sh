#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: build, GPU tests, benchmarks, the
# drop-in modules and property tests on CUDA, compute-sanitizer. Logs and
# results go to OUTDIR; OUTDIR/summary.txt has one line per step.
#
# usage: scripts/gpu_check.sh OUTDIR [STEP ...]
#   STEP: build tests bench ffn-dispatch nn fuzz sanitizer (default: all, in
#   that order: what the open issues need most comes first). A rerun after a
#   fix names only the steps it needs; `build` is incremental (ninja).
#
# Budget. A lent GPU gives a session ~15 minutes of device time, start-up
# included, so the whole script must finish in GPU_CHECK_BUDGET_S (default
# 480 s) and each step gets min(its own cap, what is left); a step that finds
# less than 20 s left is skipped and reported, never started. Expected on one
# H200 + 16 cores (predicted, not yet measured): build ~90 s (sm_90a only),
# tests ~90 s, bench ~120 s, ffn-dispatch ~60 s, nn ~30 s, fuzz ~40 s,
# sanitizer ~60 s.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [STEP ...]}"
shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
STEPS=("$@")
[ "${#STEPS[@]}" -gt 0 ] || STEPS=(build tests bench ffn-dispatch nn fuzz sanitizer)
t0=$SECONDS
status=0
: > "$OUT/summary.txt"

wanted() { local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# run_step NAME CAP_S LOG CMD...: runs CMD under `timeout`, output to
# OUT/LOG (and its tail to the console), one summary line.
run_step() {
  local name="$1" cap="$2" log="$3"; shift 3
  wanted "$name" || return 0
  local left=$((BUDGET - (SECONDS - t0)))
  if [ "$left" -lt 20 ]; then note "SKIP $name: budget spent ($BUDGET s)"; status=1; return 0; fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  echo; echo "=== [$((SECONDS - t0)) s] $name (limit $limit s)"
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  tail -25 "$OUT/$log"
  if [ "$rc" = 0 ]; then note "PASS $name $((SECONDS - start)) s"
  elif [ "$rc" = 124 ]; then note "TIMEOUT $name after $limit s (see $log)"; status=1
  else note "FAIL $name rc=$rc $((SECONDS - start)) s (see $log)"; status=1; fi
}

echo "=== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv | tee "$OUT/env.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"
# Build SASS for this GPU only: half the compile time of the default list.
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')"
case "$CAP" in 9.0) ARCH="9.0a" ;; "") ARCH="8.0;9.0a" ;; *) ARCH="$CAP" ;; esac
export PYFASTATTN_CUDA_ARCHS="${PYFASTATTN_CUDA_ARCHS:-$ARCH}"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"

build() {
  PYFASTATTN_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . &&
    python3 -m pyfastattn.info
}
export -f build
run_step build 300 build.log bash -c build
if wanted build && ! grep -q "^PASS build" "$OUT/summary.txt"; then
  note "build failed: nothing else can run"; exit 1
fi
python3 -m pyfastattn.info > "$OUT/info.txt" 2>&1

# Every test marked gpu: attention forward (features x odd sizes, 10-run
# bit-identity, streams, memory), backward (gradients, deterministic mode),
# dropout and ALiBi (tests/test_dropout_alibi.py: the CUDA kernels against the
# reference with the same keep pattern, and CPU and CUDA dropping the same
# elements for the same seed and offset), FFN (both CUDA paths, every
# activation, odd sizes).
run_step tests 200 tests_gpu.log \
  python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE --durations=15

# The perf tables: attention fwd and bwd against every SDPA backend and
# FlexAttention, the FFN against eager / torch.compile / the cuBLAS floor.
run_step bench 200 bench.log python3 benchmarks/run.py --device cuda --suite all --quick --out "$OUT/bench"

# Times both CUDA FFN paths on the issue's grid and writes the dispatch table
# (commit it as pyfastattn/ffn_cuda_dispatch.py).
run_step ffn-dispatch 120 ffn_dispatch.log \
  python3 benchmarks/ffn_bench.py --device cuda --dtype bfloat16 --tokens 16,512,8192 --dmodel 1024,4096 \
  --write-dispatch "$OUT/ffn_cuda_dispatch.py"

run_step nn 90 tests_nn_cuda.log env PYFASTATTN_TEST_DEVICE=cuda \
  python3 -m pytest -q tests/test_nn.py -p no:cacheprovider -rfE

run_step fuzz 90 tests_fuzz_cuda.log env PYFASTATTN_BACKEND=kernel PYFASTATTN_FUZZ_DEVICE=cuda \
  PYFASTATTN_FUZZ_NATIVE=120 PYFASTATTN_FUZZ_SDPA=40 python3 -m pytest -q tests/test_fuzz.py -p no:cacheprovider -rfE

sanitize() {
  local rc=0
  # synccheck: a __syncthreads / bar.sync in divergent code or a __syncwarp /
  # shfl mask naming an exited lane -- hazards the CPU emulator (one fiber per
  # thread, a lenient barrier) cannot show. Before racecheck, the slowest.
  for tool in memcheck synccheck racecheck; do
    echo "--- $tool"
    "$SANITIZER" --tool "$tool" --error-exitcode 9 python3 scripts/gpu_small_shapes.py || rc=1
  done
  return "$rc"
}
export -f sanitize
export SANITIZER
run_step sanitizer 150 sanitizer.log bash -c sanitize

echo
note "done in $((SECONDS - t0)) s, status $status"
exit "$status"
