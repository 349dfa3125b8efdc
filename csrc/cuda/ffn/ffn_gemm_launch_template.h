// Kernel entry points and launchers of the FFN GEMMs; included by the
// ffn_gemm_{fwd,bwd}_{fp16,bf16}.cu files, one per (direction, dtype) so that
// nvcc builds them in parallel.
#pragma once

#include <type_traits>

#include "../smem_optin.h"
#include "ffn_gemm_kernel.cuh"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template <typename T, GemmEpilogue kEpi, bool kGated, int kBM>
__global__ void __launch_bounds__(128) ffn_gemm_kernel(const __grid_constant__ FfnGemmParams p) {
  ffn_gemm_cta<T, GemmTile<kBM, kEpi, kGated>>(p);
}

// A type per compiled GEMM kernel, for its shared-memory opt-in state.
template <typename T, typename Tile>
struct GemmKernelTag {};

template <typename T, GemmEpilogue kEpi, bool kGated, int kBM>
cudaError_t launch_tile(const FfnGemmParams& p, cudaStream_t stream) {
  using Tile = GemmTile<kBM, kEpi, kGated>;
  auto kernel = ffn_gemm_kernel<T, kEpi, kGated, kBM>;
  // Over 48 KiB of dynamic shared memory needs the opt-in: once per device
  // (smem_optin.h); (T, Tile) names this instantiation.
  const cudaError_t err = ensure_dynamic_smem<GemmKernelTag<T, Tile>>(kernel, Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<gemm_grid<Tile>(p), Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, GemmEpilogue kEpi, bool kGated>
cudaError_t launch_ffn_gemm(const FfnGemmParams& p, cudaStream_t stream) {
  return gemm_block_m(p.m) == 64 ? launch_tile<T, kEpi, kGated, 64>(p, stream)
                                 : launch_tile<T, kEpi, kGated, 128>(p, stream);
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
