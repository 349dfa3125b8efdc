#!/usr/bin/env bash
# Third GPU call of session 11 (sketch; run from the repo root): build, the
# segfault probes, every gpu test again (the crashing one deselected), then the
# KV-cache decode bench and the FFN bench with the kernel timed.
set -uo pipefail
O="${1:?workdir}"; R="${2:?outdir}"; mkdir -p "$O" "$R"; export PYTHONUNBUFFERED=1 MAX_JOBS=16
t0=$SECONDS
CFLAGS=-g0 CXXFLAGS=-g0 PYFASTATTN_BUILD_CUDA=1 PYFASTATTN_CUDA_ARCHS=9.0a timeout 150 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.log" 2>&1 || { tail -30 "$O/build.log"; exit 1; }
echo "build $((SECONDS-t0)) s"
{ c++ --version | head -1; python3 -c "import torch; print('cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
  nm -C pyfastattn/_C*.so | grep -E "_M_insert<long>|codecvt<char16_t" | head -5
  for d in cpu cuda; do for w in table capacity; do timeout 25 python3 scripts/gpu_diag_segv.py $d $w 2>&1 | tail -2; echo "rc=$?"; done; done
} > "$O/segv.txt" 2>&1
cat "$O/segv.txt"; cp "$O/segv.txt" "$R"/
timeout 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE --tb=short --timeout 60 \
  --deselect tests/test_gpu_kvcache.py::test_cuda_kvcache_bad_metadata_refused_before_launch \
  --junitxml="$O/tests_gpu.xml" > "$O/tests_gpu.log" 2>&1
echo "tests rc=$? $((SECONDS-t0)) s"; cp "$O"/tests_gpu.* "$R"/; grep -E "^(FAILED|ERROR)|passed|failed" "$O/tests_gpu.log" | tail -15 | cut -c1-300
timeout 60 python3 scripts/gpu_kvcache_bench.py --out "$O/kvcache_bench.csv" > "$O/kvcache_bench.log" 2>&1
echo "kvcache bench rc=$? $((SECONDS-t0)) s"; cp "$O"/kvcache_bench.* "$R"/; tail -12 "$O/kvcache_bench.log" | cut -c1-200
timeout 70 python3 benchmarks/run.py --device cuda --suite ffn --dtype bfloat16 --out "$O/ffn" > "$O/ffn.log" 2>&1
echo "ffn bench rc=$? $((SECONDS-t0)) s"; cp "$O/ffn.log" "$R"/; cp "$O/ffn/results.csv" "$R/ffn_results.csv"; grep -A20 "^summary" "$O/ffn.log" | cut -c1-170
tar czf "$R/all3.tgz" -C "$O" .
