// ffn_gemm(): checks what the kernels assume and dispatches on dtype,
// epilogue and gating to the instantiations in ffn_gemm_{fwd,bwd}_*.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffn_gemm.h"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template <typename T, GemmEpilogue kEpi, bool kGated>
cudaError_t launch_ffn_gemm(const FfnGemmParams& p, cudaStream_t stream);

namespace {

template <typename T>
cudaError_t dispatch(const FfnGemmParams& p, cudaStream_t stream) {
  switch (p.epilogue) {
    case GemmEpilogue::kFwdAct:
      return p.gated ? launch_ffn_gemm<T, GemmEpilogue::kFwdAct, true>(p, stream)
                     : launch_ffn_gemm<T, GemmEpilogue::kFwdAct, false>(p, stream);
    case GemmEpilogue::kBiasResidual:
      return launch_ffn_gemm<T, GemmEpilogue::kBiasResidual, false>(p, stream);
    case GemmEpilogue::kBwdAct:
      return p.gated ? launch_ffn_gemm<T, GemmEpilogue::kBwdAct, true>(p, stream)
                     : launch_ffn_gemm<T, GemmEpilogue::kBwdAct, false>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t ffn_gemm(const FfnGemmParams& p, cudaStream_t stream) {
  if (ffn_gemm_unsupported_reason(p) != nullptr) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;  // nothing to compute; bias partials have 0 rows
  return p.dtype == DType::kFloat16 ? dispatch<__half>(p, stream)
                                    : dispatch<__nv_bfloat16>(p, stream);
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
