#!/usr/bin/env bash
# Second GPU call of session 11: tracebacks of the tests that failed in the
# first run, a C++ backtrace of the segfault, and the tests after it.
set -uo pipefail
O="${1:?outdir}"; mkdir -p "$O"; export PYTHONUNBUFFERED=1 MAX_JOBS=16
t0=$SECONDS
CFLAGS=-g0 CXXFLAGS=-g0 PYFASTATTN_BUILD_CUDA=1 PYFASTATTN_CUDA_ARCHS=9.0a python3 -m pip install -q --no-build-isolation --no-deps -e . > "$O/build.log" 2>&1 || { tail -30 "$O/build.log"; exit 1; }
echo "build $((SECONDS-t0)) s"
T="tests/test_dropout_alibi.py::test_cuda_kernel_matches_reference tests/test_ffn_gpu.py::test_cuda_ffn_on_current_stream_and_device_guard tests/test_ffn_gpu.py::test_cuda_ffn_fused_path_takes_unaligned_and_odd_stride_operands tests/test_gpu.py::test_cuda_unsupported_cases_follow_the_backend_rule tests/test_gpu_attention_bwd.py::test_cuda_backward_dense tests/test_gpu_attention_bwd.py::test_cuda_backward_attn_mask tests/test_gpu_kvcache.py::test_cuda_kvcache_backend_rule tests/test_sdpa_override.py"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short -rfE $T > "$O/failing.log" 2>&1
echo "failing tests rc=$? $((SECONDS-t0)) s"
GDB="$(command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)"
timeout 60 "$GDB" -q -batch -ex run -ex bt -ex "info sharedlibrary pyfastattn" --args python3 -m pytest -q -p no:cacheprovider \
  tests/test_gpu_kvcache.py::test_cuda_kvcache_bad_metadata_refused_before_launch > "$O/segv_gdb.log" 2>&1
echo "gdb rc=$? $((SECONDS-t0)) s"
grep -E "^#[0-9]+ " "$O/segv_gdb.log" | head -25 | cut -c1-300
grep -E "^(FAILED|ERROR) |Error|assert" "$O/failing.log" | head -60 | cut -c1-400
tail -3 "$O/failing.log"
