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

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
// Optional operands: absent, or 16-byte aligned rows.
bool opt_ok(const void* ptr, int64_t row_stride) {
  return ptr == nullptr || (aligned16(ptr) && row_stride % 8 == 0);
}

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

const char* ffn_gemm_unsupported_reason(const FfnGemmParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "the FFN GEMM kernels take float16 or bfloat16 only";
  if (p.m < 0 || p.n <= 0 || p.k <= 0) return "the FFN GEMM kernels need n > 0 and k > 0";
  if (p.k % 8 != 0 || p.n % 8 != 0)
    return "the FFN GEMM kernels need d_model, d_ff and d_out to be multiples of 8";
  if (!aligned16(p.a) || !aligned16(p.b) || p.a_row_stride % 8 != 0 || p.b_row_stride % 8 != 0)
    return "the FFN GEMM kernels need 16-byte aligned operands with row strides a multiple of 8";
  if (p.gated && p.epilogue == GemmEpilogue::kFwdAct && !aligned16(p.b_up))
    return "the FFN GEMM kernels need 16-byte aligned operands with row strides a multiple of 8";
  if (!opt_ok(p.bias, 0) || !opt_ok(p.bias_up, 0) ||
      !opt_ok(p.residual, p.residual_row_stride) || !opt_ok(p.gate_in, p.gate_in_row_stride) ||
      !opt_ok(p.up_in, p.up_in_row_stride) || !opt_ok(p.out, p.out_row_stride) ||
      !opt_ok(p.out_up, p.out_up_row_stride) || !opt_ok(p.out_h, p.out_h_row_stride) ||
      !opt_ok(p.pre_gate, p.pre_gate_row_stride) || !opt_ok(p.pre_up, p.pre_up_row_stride))
    return "the FFN GEMM kernels need 16-byte aligned epilogue tensors with row strides a "
           "multiple of 8";
  if (p.out == nullptr) return "the FFN GEMM kernels need an output";
  // grid.y = column blocks (64 or 128 columns); grid.x = row blocks.
  if ((p.n + 63) / 64 > 65535) return "the FFN GEMM kernels take at most 4194240 columns";
  if ((p.m + 63) / 64 > 2147483647LL) return "too many rows for the FFN GEMM grid";
  return nullptr;
}

cudaError_t ffn_gemm(const FfnGemmParams& p, cudaStream_t stream) {
  if (ffn_gemm_unsupported_reason(p) != nullptr) return cudaErrorInvalidValue;
  if (p.m == 0) return cudaSuccess;  // nothing to compute; bias partials have 0 rows
  return p.dtype == DType::kFloat16 ? dispatch<__half>(p, stream)
                                    : dispatch<__nv_bfloat16>(p, stream);
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
