// The compiled variants of the attention forward, as seen by the launcher.
//
// AttentionFwdVariant<Element, kHeadDim> is declared here and defined in
// attention_fwd_launch_template.h; each attention_fwd_hdim<d>_<dtype>.cu
// instantiates one, so nvcc builds the variants in parallel and the launcher
// (attention_fwd.cu) links against them without compiling any kernel.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../../attention/params.h"

namespace pyfastattn {
namespace cuda {
namespace attention {

template <typename Element, int kHeadDim>
struct AttentionFwdVariant {
  // Query rows per CTA; dynamic shared memory per CTA in bytes, which grows by
  // the attn_mask staging tile when a mask is given.
  static int block_m();
  static int smem_bytes(bool with_mask);
  // Attributes of the kernel on the current device; fails (e.g.
  // cudaErrorInvalidDeviceFunction) when the build holds no image for it.
  static cudaError_t attributes(cudaFuncAttributes* attr);
  // Launches on `stream`; returns the launch error.
  static cudaError_t run(const AttentionFwdParams& p, cudaStream_t stream);
};

// Grid of one forward: x = query block, (y, z) = head + num_heads * sequence,
// split so that y and z stay within their 65535 limit.
struct AttentionFwdGrid {
  int64_t m_blocks, y, z;
  bool fits() const { return m_blocks <= 0x7fffffff && y <= 65535 && z <= 65535; }
};

inline AttentionFwdGrid attention_fwd_grid(const AttentionFwdParams& p, int block_m) {
  const int64_t m_blocks = (int64_t(p.seqlen_q) + block_m - 1) / block_m;
  const int64_t head_seqs = int64_t(p.num_heads) * p.batch;
  const int64_t y = head_seqs < 65535 ? head_seqs : 65535;
  const int64_t z = y > 0 ? (head_seqs + y - 1) / y : 0;
  return {m_blocks, y, z};
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
