#!/usr/bin/env bash
# Compile every kernel .cu alone with nvcc for each target arch and fail on any
# register spill or stack frame; where cuobjdump is available, also check that
# the attention kernels' SASS has the instructions we meant (HMMA tensor-core
# MMA, LDSM ldmatrix, LDGSTS cp.async; the backward also RED.E.ADD.F32 for its
# dQ accumulation and ATOMG.E.ADD for its deterministic mode's start
# ticket) and no local-memory traffic (LDL/STL).
#
# usage: scripts/check_cuda_compile.sh [LOGDIR]     (CUDA_HOME or /usr/local/cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
LOGDIR="${1:-build/cuda-compile-check}"
ARCHS="${PYFASTATTN_CUDA_ARCHS:-8.0;9.0a}"
ARCHS="${ARCHS//+PTX/}"
mkdir -p "$LOGDIR"
gencode=()
IFS=';' read -ra arr <<< "$ARCHS"
for a in "${arr[@]}"; do n="${a//./}"; gencode+=("-gencode=arch=compute_${n},code=sm_${n}"); done

mapfile -t files < <(find csrc/cuda -name '*.cu' | sort)
if [ "${#files[@]}" -eq 0 ]; then echo "no .cu files under csrc/cuda"; exit 1; fi

compile_one() {
  local f="$1" base; base="$(basename "$f" .cu)"
  local start=$SECONDS
  if ! "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas -v "${gencode[@]}" -Icsrc -c "$f" \
       -o "$LOGDIR/$base.o" > "$LOGDIR/$base.log" 2>&1; then
    echo "FAIL compile $f"; cat "$LOGDIR/$base.log"; return 1
  fi
  echo "$f: $((SECONDS - start)) s"
}
export -f compile_one; export NVCC LOGDIR; export gencode_str="${gencode[*]}"
fail=0
for f in "${files[@]}"; do
  printf '%s\n' "$f"
done | xargs -P "${MAX_JOBS:-2}" -I{} bash -c 'gencode=($gencode_str); compile_one "$@"' _ {} || fail=1

for log in "$LOGDIR"/*.log; do
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
    echo "FAIL register spills in $(basename "$log" .log):"; grep -E "Compiling|spill" "$log" | grep -B1 -E "[1-9][0-9]* bytes spill"; fail=1
  fi
  if grep -E "[1-9][0-9]* bytes stack frame" "$log" >/dev/null; then
    echo "FAIL stack frame in $(basename "$log" .log):"; grep -E "[1-9][0-9]* bytes stack frame" "$log"; fail=1
  fi
done
echo "ptxas summary (registers / shared memory per kernel):"
grep -hE "Compiling entry|Used [0-9]+ registers" "$LOGDIR"/*.log | sed 's/ptxas info    ://' | paste - - | \
  sed -E "s/.*entry function '([^']+)' for '(sm_[0-9a]+)'.*Used ([0-9]+) registers.*/\2 \3 regs  \1/" | \
  cut -c1-140 | sort -u || true

# cuobjdump (and the nvdisasm it calls) from the toolkit, PATH, or the
# nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels.
find_tool() {
  local name="$1"
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/$name" "$(command -v "$name" || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
  done
  python3 - "$name" <<'PY' 2>/dev/null || true
import glob, os, sys
for p in sys.path:
    for c in glob.glob(os.path.join(p, "nvidia", "*", "bin", sys.argv[1])):
        print(c); raise SystemExit
PY
}
CUOBJDUMP="$(find_tool cuobjdump)"
NVDISASM="$(find_tool nvdisasm)"
[ -n "$NVDISASM" ] && export PATH="$(dirname "$NVDISASM"):$PATH"
if [ -n "$CUOBJDUMP" ]; then
  for o in "$LOGDIR"/attention_fwd_hdim*.o "$LOGDIR"/attention_bwd_hdim*.o; do
    [ -e "$o" ] || continue
    if ! sass="$("$CUOBJDUMP" --dump-sass "$o" 2>&1)"; then
      echo "FAIL cuobjdump on $(basename "$o"): $sass" | head -3; fail=1; continue
    fi
    for ins in HMMA LDSM LDGSTS; do
      if ! grep -q "$ins" <<< "$sass"; then echo "FAIL $(basename "$o"): no $ins in SASS"; fail=1; fi
    done
    # The backward adds dQ into its fp32 accumulator with RED (REDG on sm_90).
    # The deterministic mode's start ticket: an atomic add that returns (ATOMG).
    case "$o" in *attention_bwd_*)
      if ! grep -qE "\bREDG?\.E\.ADD\.F32" <<< "$sass"; then
        echo "FAIL $(basename "$o"): no RED.E.ADD.F32 (dQ atomics) in SASS"; fail=1; fi
      if ! grep -qE "\bATOMG\.E\.ADD\b" <<< "$sass"; then
        echo "FAIL $(basename "$o"): no ATOMG.E.ADD (the CTA start ticket) in SASS"; fail=1; fi ;;
    esac
    if grep -qE "\b(LDL|STL)\b" <<< "$sass"; then echo "FAIL $(basename "$o"): local memory (LDL/STL) in SASS"; fail=1; fi
  done
  # FFN: the GEMMs need the tensor-core path (HMMA, LDSM, LDGSTS); the
  # elementwise kernels 16-byte global accesses (LDG.E.128 / STG.E.128); none
  # of them local memory.
  for o in "$LOGDIR"/ffn_gemm_fwd_*.o "$LOGDIR"/ffn_gemm_bwd_*.o "$LOGDIR"/ffn_elementwise.o; do
    [ -e "$o" ] || continue
    if ! sass="$("$CUOBJDUMP" --dump-sass "$o" 2>&1)"; then
      echo "FAIL cuobjdump on $(basename "$o"): $sass" | head -3; fail=1; continue
    fi
    case "$(basename "$o")" in
      ffn_gemm_*) want="HMMA LDSM LDGSTS" ;;
      *) want="LDG.E.128 STG.E.128" ;;
    esac
    for ins in $want; do
      if ! grep -q "$ins" <<< "$sass"; then echo "FAIL $(basename "$o"): no $ins in SASS"; fail=1; fi
    done
    if grep -qE "\b(LDL|STL)\b" <<< "$sass"; then echo "FAIL $(basename "$o"): local memory (LDL/STL) in SASS"; fail=1; fi
  done
  # KV cache: the split kernels' cp.async tile loads (LDGSTS), the append's
  # 16-byte copies (LDG.E.128 / STG.E.128), the tensor-core split kernel's
  # MMAs and ldmatrix (HMMA, LDSM: only it has them), no local memory.
  for o in "$LOGDIR"/kvcache_fwd_bf16.o "$LOGDIR"/kvcache_fwd_fp16.o; do
    [ -e "$o" ] || continue
    if ! sass="$("$CUOBJDUMP" --dump-sass "$o" 2>&1)"; then
      echo "FAIL cuobjdump on $(basename "$o"): $sass" | head -3; fail=1; continue
    fi
    for ins in LDGSTS LDG.E.128 STG.E.128 HMMA LDSM; do
      if ! grep -q "$ins" <<< "$sass"; then echo "FAIL $(basename "$o"): no $ins in SASS"; fail=1; fi
    done
    if grep -qE "\b(LDL|STL)\b" <<< "$sass"; then echo "FAIL $(basename "$o"): local memory (LDL/STL) in SASS"; fail=1; fi
  done
  echo "SASS check done with $CUOBJDUMP"
else
  echo "cuobjdump not found: SASS check skipped (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
  [ "${PYFASTATTN_REQUIRE_SASS_CHECK:-0}" = 1 ] && fail=1
fi
[ "$fail" = 0 ] && echo "CUDA compile check: OK (${#files[@]} files, archs $ARCHS, zero spills)"
exit "$fail"
