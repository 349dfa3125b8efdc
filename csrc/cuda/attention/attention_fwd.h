// Host-side entry of the CUDA attention forward. Plain CUDA: no torch headers,
// so every .cu that includes this compiles in about a second per arch.
//
// The caller (csrc/cuda/attention_cuda_api.cpp) guarantees, before calling:
//   - dtype is fp16 or bf16; q, k, v, o share it;
//   - head_dim == head_dim_v, head_dim % 8 == 0 and head_dim <= 256
//     (other head dims are zero-padded to a multiple of 8 by the caller);
//   - q, k, v, o base pointers are 16-byte aligned and every batch/row/head
//     stride is a multiple of 8 elements (so 16-byte vector loads are legal);
//   - lse is fp32, and cu_seqlens / seqused_k / mask were validated on the host
//     against the tensor sizes, so every index the params imply is in bounds;
//   - the current device is the tensors' device.
#pragma once

#include <cuda_runtime.h>

#include "../../attention/params.h"

namespace pyfastattn {
namespace cuda {

// nullptr when a compiled variant covers `p` on a device of compute capability
// `sm` (e.g. 80, 90); otherwise a short reason, for the backend rule's error.
const char* attention_fwd_unsupported_reason(const AttentionFwdParams& p, int sm);

// Launches the forward on `stream`. Returns the launch error (cudaSuccess if
// none). Never synchronises.
cudaError_t attention_fwd(const AttentionFwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyfastattn
