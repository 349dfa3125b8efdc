// CPU kernels of the fused FFN: the elementwise step between the GEMMs, one
// pass each way (csrc/ffn/params.h defines every field's meaning). The GEMMs
// themselves are at::mm calls in csrc/ffn/ffn_ops.cpp.
#pragma once

#include "../ffn/params.h"

namespace pyfastattn {
namespace cpu {

// h = act(gate + b1) [* (up + b3)]. Parallel with at::parallel_for.
void ffn_act_fwd(const FfnActFwdParams& p);

// dgate [, dup], the fp32 bias sums and optionally h, in one pass. The bias
// sums are bit-identical for any thread count.
void ffn_act_bwd(const FfnActBwdParams& p);

// g = act(g) [* u] in place over n contiguous fp32 values (u: nullptr for
// the plain FFN); no threads of its own. The fused small-token forward
// (ffn_small_tokens.h) runs it on each task's pre-activations.
void ffn_act_fp32(Activation act, float* g, const float* u, int64_t n);

// The instruction set the kernels above run with here: "avx512", "avx2" or
// "portable" (for tests and benchmarks to report).
const char* ffn_cpu_isa();

}  // namespace cpu
}  // namespace pyfastattn
