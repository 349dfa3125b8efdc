// The FFN backward dH GEMM (kBwdAct, plain and gated) for bf16.
#include "ffn_gemm_launch_template.h"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template cudaError_t launch_ffn_gemm<__nv_bfloat16, GemmEpilogue::kBwdAct, false>(const FfnGemmParams&, cudaStream_t);
template cudaError_t launch_ffn_gemm<__nv_bfloat16, GemmEpilogue::kBwdAct, true>(const FfnGemmParams&, cudaStream_t);

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
