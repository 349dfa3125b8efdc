#!/usr/bin/env bash
# The first GPU run, in one call: build for this GPU only, correctness first,
# then speed, then a verdict per capability. Logs and results go to OUTDIR.
#
# usage: scripts/gpu_check.sh OUTDIR [STEP ...]
#        scripts/gpu_check.sh --dry-run [OUTDIR]
#
# Default steps, in order of value (what the open issues need most first):
#   build      PYFASTATTN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .
#              for this GPU's arch only (H100/H200: 9.0a), MAX_JOBS=16; then the
#              kernels' registers / stack / local memory (cuobjdump) of that build
#   tests      every test marked gpu, and the checks of the built module marked
#              extension (pytest -m "gpu or extension", JUnit XML): attention forward
#              and backward against the reference under the tolerance rule over
#              the support matrix, misaligned offset views, the multi-wave
#              deterministic backward bit-equal under a watchdog, NaN-poisoned
#              outputs, grid splits, streams, the FFN against its reference, the
#              KV-cache kernels (paged, split-KV, append + rotary) against theirs
#   sanitizer  compute-sanitizer memcheck and racecheck on scripts/gpu_small_shapes.py
#   bench      scripts/gpu_kvcache_bench.py (the decode step over a KV cache, both
#              split kernels, beside SDPA); benchmarks/run.py --device cuda:
#              attention fwd and fwd+bwd, bf16 and fp16, d 64 and 128, S 512-16k,
#              causal and not, beside every torch SDPA backend, with the
#              bf16/fp16 matmul ceiling of the same run; the FFN against torch eager
#   verdict    scripts/gpu_verdict.py: one line per capability, verified or not and
#              why (verdict.md, verdict.csv), and auto_shapes.csv: the shapes where
#              the kernel was correct and faster than the best torch backend
# Optional steps, run only when named: ffn-dispatch (times both CUDA FFN paths and
# writes the dispatch table), kvcache (tests/test_gpu_kvcache.py alone -- the
# KV-cache kernels with both split kernels, which `tests` also runs -- then
# scripts/gpu_kvcache_bench.py: the issue-18 decode step, contiguous and paged,
# the CUDA-core and the tensor-core split kernel at 4 split counts each, beside
# SDPA and the measured read bandwidth, into kvcache_bench.csv), nn (the drop-in module tests on CUDA), fuzz (the
# property tests on CUDA). A rerun after a fix names only the steps it needs;
# `build` is incremental (ninja).
#
# Budget. A lent GPU gives a session 15 minutes of device time, start-up
# included, and a second run must fit: the default steps' caps add up to at
# most GPU_CHECK_BUDGET_S (480 s; checked before anything runs, and by
# --dry-run), each step gets min(its cap, what is left), and a step that finds
# less than 20 s left is skipped and reported, never started. Caps, with the
# prediction each rests on (one H200, 16 cores; predictions until a run
# measures them, which summary.txt then records):
#   build 220 s: scripts/build_time_estimate.py bounds a 16-job build by the
#     CPU times of a full build measured on the 2-core dev machine
#     (scripts/build_times.tsv: the whole build, and its longest job, the CPU
#     attention kernel's C++); --dry-run prints that bound against this cap.
#     The build passes CFLAGS=-g0: the extension is built without debug info,
#     which the GPU check does not need (predicted to shorten the C++ jobs,
#     not measured)
#   tests 120 s, sanitizer 40 s (memcheck and racecheck, bf16 only), bench
#     80 s plus whatever the earlier steps left unused (three run.py calls:
#     fwd+bwd and fwd stop starting shapes at 45% and 20% of that time, and
#     say so in their rows; then the quick FFN grid), verdict 10 s: 470 s.
#
# On the lent machine (its `run` brings back at most 8 files of $OUT), e.g.:
#   scripts/gpu_check.sh /tmp/gc; cp /tmp/gc/{summary.txt,verdict.md,all.tar.gz} "$OUT"/
# all.tar.gz holds OUTDIR whole (logs, JUnit XML, benchmark CSV/markdown); the
# session then commits the benchmark results under benchmarks/results/H200/.
#
# --dry-run needs no GPU: it checks the plan and the budget, that every
# command the steps run exists and parses (the gpu tests collect, run.py and
# the sanitizer workload parse their arguments), runs the verdict on the empty
# run, and writes OUTDIR (default build/gpu-check-dry-run) as a real run would.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; set -- "${1:-build/gpu-check-dry-run}"; fi
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [STEP ...] | --dry-run [OUTDIR]}"
shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
DEFAULT_STEPS=(build tests sanitizer bench verdict)
declare -A CAP=([build]=220 [tests]=120 [sanitizer]=40 [bench]=80 [verdict]=10
                [ffn-dispatch]=120 [nn]=90 [fuzz]=90 [kvcache]=90)
STEPS=("$@")
[ "${#STEPS[@]}" -gt 0 ] || STEPS=("${DEFAULT_STEPS[@]}")
for s in "${STEPS[@]}"; do
  [ -n "${CAP[$s]:-}" ] || { echo "unknown step '$s'; steps: ${!CAP[*]}"; exit 2; }
done
t0=$SECONDS
status=0
: > "$OUT/summary.txt"

wanted() { local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# The plan: the default steps' caps must fit the budget.
planned=0
for s in "${DEFAULT_STEPS[@]}"; do planned=$((planned + CAP[$s])); done
note "plan: ${DEFAULT_STEPS[*]} with caps$(for s in "${DEFAULT_STEPS[@]}"; do printf ' %s=%ss' "$s" "${CAP[$s]}"; done) = $planned s of a $BUDGET s budget"
if [ "$planned" -gt "$BUDGET" ]; then note "FAIL plan: the default steps' caps ($planned s) exceed the budget ($BUDGET s)"; exit 1; fi

# run_step NAME LOG CMD...: runs CMD under `timeout` (cap or what is left),
# output to OUT/LOG (its tail to the console), one summary line.
run_step() {
  local name="$1" log="$2"; shift 2
  wanted "$name" || return 0
  local cap="${CAP[$name]}" left=$((BUDGET - (SECONDS - t0)))
  if [ "$left" -lt 20 ]; then note "SKIP $name: budget spent ($BUDGET s)"; status=1; return 0; fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  echo; echo "=== [$((SECONDS - t0)) s] $name (limit $limit s)"
  timeout -k 5 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  tail -25 "$OUT/$log"
  if [ "$rc" = 0 ]; then note "PASS $name $((SECONDS - start)) s (cap $cap s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note "TIMEOUT $name after $limit s (see $log)"; status=1
  else note "FAIL $name rc=$rc $((SECONDS - start)) s (see $log)"; status=1; fi
}

PY=python3
# The attention grid and providers of the bench step (three run.py calls, one
# per suite, each with its own --budget-s so that a slow one cannot starve the
# next: fwd+bwd first, then fwd, then the FFN).
ATTN_BENCH="--device cuda --dtype bfloat16,float16 --headdims 64,128 --seqlens 512,2048,8192,16384"
ATTN_PROVIDERS="pyfastattn,torch sdpa (flash),torch sdpa (efficient),torch sdpa (cudnn),torch sdpa (math)"
export ATTN_BENCH ATTN_PROVIDERS
SMALL=(scripts/gpu_small_shapes.py)

if [ "$DRY" = 1 ]; then
  # No GPU: prove the plumbing. Every step's command exists and parses.
  note "DRY build: would run PYFASTATTN_BUILD_CUDA=1 PYFASTATTN_CUDA_ARCHS=<this GPU, 9.0a on H100/H200> MAX_JOBS=$MAX_JOBS $PY -m pip install --no-build-isolation --no-deps -e ."
  est="$($PY scripts/build_time_estimate.py --jobs 16 --budget "${CAP[build]}" 2>&1 | tail -1)"
  note "DRY build-estimate: $est"
  if $PY -m pytest -q --collect-only -m "gpu or extension" tests -p no:cacheprovider > "$OUT/tests_collect.log" 2>&1; then
    note "DRY tests: $(grep -cE '::' "$OUT/tests_collect.log") gpu and extension tests collect (pytest -m 'gpu or extension' --collect-only)"
  else note "FAIL tests: the gpu tests do not collect (see tests_collect.log)"; status=1; fi
  if $PY "${SMALL[@]}" --check-args > "$OUT/sanitizer_args.log" 2>&1; then
    note "DRY sanitizer: scripts/gpu_small_shapes.py parses; would run compute-sanitizer memcheck, racecheck on it"
  else note "FAIL sanitizer: scripts/gpu_small_shapes.py does not start (see sanitizer_args.log)"; status=1; fi
  if $PY benchmarks/run.py --help > "$OUT/bench_help.log" 2>&1 &&
     for o in --budget-s --providers --headdims --seqlens --dtype --suite --out; do
       grep -q -- "$o" "$OUT/bench_help.log" || exit 1; done; then
    note "DRY bench: benchmarks/run.py takes $ATTN_BENCH --providers \"$ATTN_PROVIDERS\" --suite attention-bwd|attention|ffn --budget-s --out"
  else note "FAIL bench: benchmarks/run.py lacks an option the bench step passes (see bench_help.log)"; status=1; fi
  if $PY scripts/gpu_kvcache_bench.py --kernels simt,mma --splits 0,64 --reps 20 --check-args \
       > "$OUT/kvcache_bench_args.log" 2>&1; then
    note "DRY bench: scripts/gpu_kvcache_bench.py parses --kernels simt,mma --splits 0,64 --reps 20"
  else note "FAIL bench: scripts/gpu_kvcache_bench.py rejects the bench step's arguments (see kvcache_bench_args.log)"; status=1; fi
  $PY scripts/gpu_verdict.py "$OUT" --dry-run > "$OUT/verdict.log" 2>&1 || status=1
  note "DRY verdict: $(grep -c 'VERIFIED' "$OUT/verdict.log") capability lines (verdict.md, verdict.csv, auto_shapes.csv)"
  cat "$OUT/verdict.log" | tee -a "$OUT/summary.txt"
  note "dry run done in $((SECONDS - t0)) s, status $status"
  exit "$status"
fi

echo "=== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv | tee "$OUT/env.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"
nproc | sed 's/^/cores /' | tee -a "$OUT/env.txt"
# SASS for this GPU only (sm_90a on H100/H200): a third of the default list's compile time.
CAPA="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')"
case "$CAPA" in 9.0) ARCH="9.0a" ;; "") ARCH="8.0;9.0a" ;; *) ARCH="$CAPA" ;; esac
export PYFASTATTN_CUDA_ARCHS="${PYFASTATTN_CUDA_ARCHS:-$ARCH}"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
CUOBJDUMP="$(command -v cuobjdump || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump")"
export SANITIZER CUOBJDUMP PY

build() {
  # -g0 after the interpreter's -g: no debug info in the C++ objects (shorter
  # compiles of the heavy CPU-kernel files; nvcc does not see CFLAGS).
  # -v: the compile and link command lines go into build.log.
  CFLAGS="${CFLAGS:-} -g0" CXXFLAGS="${CXXFLAGS:-} -g0" PYFASTATTN_BUILD_CUDA=1 \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . || return 1
  "$PY" -m pyfastattn.info
  local so; so="$(ls pyfastattn/_C*.so | head -1)"
  "$CUOBJDUMP" --dump-resource-usage "$so" > "$OUT_DIR/resource_usage.txt" 2>&1 ||
    echo "cuobjdump failed: no resource report" >&2
  grep -c "Function" "$OUT_DIR/resource_usage.txt" | sed 's/^/kernels in the module: /'
  # libstdc++'s own compiled functions defined in the module mean a static
  # copy was linked in: on the first H200 run every C++ argument error that
  # formats a number then segfaulted (benchmarks/results/H200/README.md).
  local own
  own="$("$PY" -c "import sys; from pyfastattn.info import libstdcxx_functions_in_module as f; o = f(sys.argv[1]); print('?' if o is None else len(o))" "$so" 2>/dev/null)"
  echo "libstdc++ functions defined in the module: ${own:-?} (expected 0)" | tee "$OUT_DIR/libstdcxx_check.txt"
  grep -E -- '-shared .*_C\..*\.so|-o [^ ]*_C\.[^ ]*\.so' "$OUT_DIR/build.log" | tail -1 | cut -c1-3000 >> "$OUT_DIR/libstdcxx_check.txt"
}
export OUT_DIR="$OUT"
export -f build
run_step build build.log bash -c build
if wanted build && ! grep -q "^PASS build" "$OUT/summary.txt"; then
  note "build failed: nothing else can run"
  "$PY" scripts/gpu_verdict.py "$OUT" | tee -a "$OUT/summary.txt"
  exit 1
fi
"$PY" -m pyfastattn.info > "$OUT/info.txt" 2>&1
[ -f "$OUT/libstdcxx_check.txt" ] && note "$(head -1 "$OUT/libstdcxx_check.txt")"

# Correctness: every test marked gpu, with per-test results for the verdict.
# pytest-timeout (on the lent machine's image) stops one hung test at 90 s
# instead of the whole step at its cap.
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 90)
# pytest-xdist (on the lent machine's image) with one worker: a test that
# crashes the process is reported failed and the worker restarts, instead of
# the crash ending the step with no results (the first H200 run lost its
# JUnit XML that way).
"$PY" -c "import xdist" 2>/dev/null && PER_TEST+=(-n 1)
export PER_TEST_ARGS="${PER_TEST[*]}"
run_step tests tests_gpu.log \
  "$PY" -m pytest -q -m "gpu or extension" tests -p no:cacheprovider -rfE --durations=15 "${PER_TEST[@]}" \
  --junitxml="$OUT/tests_gpu.xml"

sanitize() {
  local rc=0
  # memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory
  # hazards (a missing barrier) the emulator's race model might not see.
  for tool in memcheck racecheck; do
    echo "--- $tool"
    # One dtype: fp16 and bf16 instantiate the same kernel code.
    "$SANITIZER" --tool "$tool" --error-exitcode 9 "$PY" scripts/gpu_small_shapes.py --dtypes bfloat16 2>&1 ||
      rc=1
  done
  return "$rc"
}
export -f sanitize
run_step sanitizer sanitizer.log bash -c sanitize

# Speed: ours beside every torch SDPA backend and the matmul ceiling, same run.
bench() {
  local rc=0
  # The decode step over a KV cache first (~10 s): both split kernels, the
  # kernel's split count and 64, contiguous and paged, beside SDPA.
  mkdir -p "$OUT_DIR/bench"
  "$PY" scripts/gpu_kvcache_bench.py --kernels simt,mma --splits 0,64 --reps 20 \
    --out "$OUT_DIR/bench/kvcache_bench.csv" || rc=1
  # shellcheck disable=SC2086
  "$PY" benchmarks/run.py $ATTN_BENCH --providers "$ATTN_PROVIDERS" --suite attention-bwd \
    --budget-s $((BENCH_S * 45 / 100)) --out "$OUT_DIR/bench/attention-bwd" || rc=1
  # shellcheck disable=SC2086
  "$PY" benchmarks/run.py $ATTN_BENCH --providers "$ATTN_PROVIDERS" --suite attention \
    --budget-s $((BENCH_S * 20 / 100)) --out "$OUT_DIR/bench/attention" || rc=1
  "$PY" benchmarks/run.py --device cuda --suite ffn --dtype bfloat16 --out "$OUT_DIR/bench/ffn" || rc=1
  return "$rc"
}
export -f bench
# The bench takes what the earlier steps left unused, less the verdict's share.
left=$((BUDGET - (SECONDS - t0) - CAP[verdict]))
[ "$left" -gt "${CAP[bench]}" ] && CAP[bench]=$left
export BENCH_S="${CAP[bench]}"
run_step bench bench.log bash -c bench

run_step ffn-dispatch ffn_dispatch.log \
  "$PY" benchmarks/ffn_bench.py --device cuda --dtype bfloat16 --tokens 16,512,8192 --dmodel 1024,4096 \
  --write-dispatch "$OUT/ffn_cuda_dispatch.py"
run_step kvcache tests_kvcache_cuda.log bash -c '"$PY" -m pytest -q tests/test_gpu_kvcache.py -p no:cacheprovider -rfE $PER_TEST_ARGS &&
  "$PY" scripts/gpu_kvcache_bench.py --kernels simt,mma --splits 0,32,64,128 --out "$OUT_DIR/kvcache_bench.csv"'
run_step nn tests_nn_cuda.log env PYFASTATTN_TEST_DEVICE=cuda \
  "$PY" -m pytest -q tests/test_nn.py -p no:cacheprovider -rfE
run_step fuzz tests_fuzz_cuda.log env PYFASTATTN_BACKEND=kernel PYFASTATTN_FUZZ_DEVICE=cuda \
  PYFASTATTN_FUZZ_NATIVE=120 PYFASTATTN_FUZZ_SDPA=40 "$PY" -m pytest -q tests/test_fuzz.py -p no:cacheprovider -rfE

note "done in $((SECONDS - t0)) s, status $status"
# The verdict last, so that summary.txt (and the console) end with one line
# per capability.
if wanted verdict; then
  echo; echo "=== [$((SECONDS - t0)) s] verdict"
  timeout 30 "$PY" scripts/gpu_verdict.py "$OUT" > "$OUT/verdict.log" 2>&1 || status=1
  cat "$OUT/verdict.log" | tee -a "$OUT/summary.txt"
fi
# Everything in one file, for a caller that can bring back only a few files.
tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null && mv "$OUT.tar.gz" "$OUT/all.tar.gz"
exit "$status"
