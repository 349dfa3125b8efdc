// The compiled variants of the attention backward main kernel, as seen by the
// launcher (attention_bwd.cu). AttentionBwdVariant<Element, kHeadDim> is
// defined in attention_bwd_launch_template.h; each
// attention_bwd_hdim<d>_<dtype>.cu instantiates one, so nvcc builds them in
// parallel.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_bwd.h"

namespace pyfastattn {
namespace cuda {
namespace attention {

template <typename Element, int kHeadDim>
struct AttentionBwdVariant {
  static int block_m();
  static int block_n();
  // Dynamic shared memory per CTA in bytes (2 mask staging tiles with a mask).
  static int smem_bytes(bool with_mask);
  // Attributes of the main kernel on the current device; fails when the build
  // holds no image for it.
  static cudaError_t attributes(cudaFuncAttributes* attr);
  // Launches the main kernel on `stream` (preprocess must have run).
  static cudaError_t run(const AttentionBwdKernelParams& p, cudaStream_t stream);
};

// Grids: x = block index along a sequence, (y, z) = heads * batch split so
// that y and z stay within their 65535 limit.
struct AttentionBwdGrid {
  int64_t x, y, z;
  bool fits() const { return x <= 0x7fffffff && y <= 65535 && z <= 65535; }
};

inline AttentionBwdGrid attention_bwd_grid(int64_t seqlen, int block, int64_t heads, int64_t batch) {
  const int64_t x = (seqlen + block - 1) / block;
  const int64_t head_seqs = heads * batch;
  const int64_t y = head_seqs < 65535 ? head_seqs : 65535;
  const int64_t z = y > 0 ? (head_seqs + y - 1) / y : 0;
  return {x, y, z};
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
