// CUDA implementation of pyfastattn::merge_attention_states: device guard,
// current stream, launch check. The kernel (csrc/cuda/merge/*.cu) includes no
// torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../merge/api.h"
#include "launch_check.h"
#include "merge/merge_attention_states.h"

namespace pyfastattn {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& out_a,
                                                               const at::Tensor& lse_a,
                                                               const at::Tensor& out_b,
                                                               const at::Tensor& lse_b) {
  const c10::cuda::CUDAGuard guard(out_a.device());
  MergeParams p;
  auto [out, lse] = prepare_merge(p, out_a, lse_a, out_b, lse_b);
  check_launch(cuda::merge_attention_states(
                   p, c10::cuda::getCurrentCUDAStream(out_a.get_device()).stream()),
               "merge_attention_states_kernel (batch ", p.batch, ", seqlen ", p.seqlen,
               ", heads ", p.heads, ", head_dim ", p.head_dim, ")");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastattn, CUDA, m) {
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace pyfastattn
