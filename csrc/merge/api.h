// Tensors -> MergeParams for pyfastattn::merge_attention_states, shared by the
// CPU and CUDA implementations. Python (pyfastattn/distributed/merge.py) gives
// the friendly errors; this layer re-checks what would let a kernel read or
// write outside a tensor.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "params.h"

namespace pyfastattn {

// Checks out_a/out_b [b, s, h, d] (last dim contiguous, dtypes fp32/fp16/bf16,
// may differ) and lse_a/lse_b [b, h, s] fp32 on the same device; allocates
// out (out_a's dtype, contiguous) and lse (fp32, contiguous) and fills p.
std::tuple<at::Tensor, at::Tensor> prepare_merge(MergeParams& p, const at::Tensor& out_a,
                                                 const at::Tensor& lse_a, const at::Tensor& out_b,
                                                 const at::Tensor& lse_b);

}  // namespace pyfastattn
