// Per-device limits the attention launchers check before a launch, so that a
// call the device cannot run is declined with a reason (backend "auto" then
// falls back, "kernel" raises) instead of failing at launch.
#pragma once

#include <cstdlib>

#include <cuda_runtime.h>

namespace pyfastattn {
namespace cuda {
namespace attention {

// Dynamic shared memory per block the current device grants on opt-in
// (sm_80: 163 KB, sm_86/89: 99 KB, sm_90: 227 KB), lowered to
// PYFASTATTN_TEST_SMEM_LIMIT bytes when that is set: a GPU with 227 KB can then
// exercise the decline path that a 99 KB device takes for the d = 256
// backward (tests/test_gpu.py). Read on every call (a getenv, ~0.1 us).
inline cudaError_t smem_per_block_limit(int* bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky error of the failed query
    return err;
  }
  if (const char* cap = std::getenv("PYFASTATTN_TEST_SMEM_LIMIT")) {
    const long v = std::strtol(cap, nullptr, 10);
    if (v > 0 && v < *bytes) *bytes = static_cast<int>(v);
  }
  return cudaSuccess;
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
