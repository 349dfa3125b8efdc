// The FFN forward GEMMs for fp16: kFwdAct (plain and gated) and kBiasResidual.
#include "ffn_gemm_launch_template.h"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template cudaError_t launch_ffn_gemm<__half, GemmEpilogue::kFwdAct, false>(const FfnGemmParams&, cudaStream_t);
template cudaError_t launch_ffn_gemm<__half, GemmEpilogue::kFwdAct, true>(const FfnGemmParams&, cudaStream_t);
template cudaError_t launch_ffn_gemm<__half, GemmEpilogue::kBiasResidual, false>(const FfnGemmParams&, cudaStream_t);

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
