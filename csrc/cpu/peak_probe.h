// The machine's physical limits, measured: the FMA / dot-product peak of one
// core's vector units and the read bandwidth of a buffer far larger than the
// caches. The benchmarks report every kernel row as a fraction of these
// (issue 21), not of what torch.matmul happens to reach.
//
// Each function is the work of ONE thread; csrc/ops.cpp runs it on every
// thread of torch's pool at once and divides the total work by the wall time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyfastattn {
namespace cpu {

// The instruction a probe kind runs on this CPU:
//   "fp32_fma":  vfmadd231ps zmm (AVX-512) / ymm (AVX2) / scalar fmaf;
//   "bf16_dot":  vdpbf16ps zmm (AVX512_BF16), else the fp32 FMA (what the
//                kernels then run on bf16 data, converted to fp32).
// fp16 data is converted to fp32 by the kernels, so its peak is fp32's.
const char* peak_probe_isa(const char* kind);

// Runs `iters` iterations of the kind's loop (16 independent accumulators,
// so neither the FMA latency nor a dependency chain limits it) and returns
// the floating-point operations done (a multiply-add counts 2).
double peak_probe_run(const char* kind, int64_t iters);

// Reads n floats from p once (64-byte vector loads where AVX-512 exists, 4 independent
// sums) and returns their sum, so the loads cannot be optimised away.
// prefetch_floats > 0: every line is also prefetched into L2 that many
// floats ahead, in address order (on Zen 4 the hardware prefetchers alone
// read 5-20 % less than with it: PERF_NOTES.md "Session 13: the read probe").
float read_probe_run(const float* p, size_t n, size_t prefetch_floats = 0);

}  // namespace cpu
}  // namespace pyfastattn
