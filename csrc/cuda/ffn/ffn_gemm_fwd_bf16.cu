// The FFN forward GEMMs for bf16: kFwdAct (plain and gated) and kBiasResidual.
#include "ffn_gemm_launch_template.h"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template cudaError_t launch_ffn_gemm<__nv_bfloat16, GemmEpilogue::kFwdAct, false>(const FfnGemmParams&, cudaStream_t);
template cudaError_t launch_ffn_gemm<__nv_bfloat16, GemmEpilogue::kFwdAct, true>(const FfnGemmParams&, cudaStream_t);
template cudaError_t launch_ffn_gemm<__nv_bfloat16, GemmEpilogue::kBiasResidual, false>(const FfnGemmParams&, cudaStream_t);

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
