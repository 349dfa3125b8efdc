// Definitions of AttentionBwdVariant (attention_bwd_launch.h): included only
// by the per-variant .cu files, each of which instantiates one variant.
#pragma once

#include "attention_bwd_kernel.cuh"
#include "attention_bwd_launch.h"
#include "attention_bwd_traits.h"
#include "../smem_optin.h"

namespace pyfastattn {
namespace cuda {
namespace attention {

template <typename Element, int kHeadDim>
int AttentionBwdVariant<Element, kHeadDim>::block_m() {
  return AttentionBwdTraits<kHeadDim, Element>::kBlockM;
}

template <typename Element, int kHeadDim>
int AttentionBwdVariant<Element, kHeadDim>::block_n() {
  return AttentionBwdTraits<kHeadDim, Element>::kBlockN;
}

template <typename Element, int kHeadDim>
int AttentionBwdVariant<Element, kHeadDim>::smem_bytes(bool with_mask) {
  using Traits = AttentionBwdTraits<kHeadDim, Element>;
  return Traits::kSmemBytes + (with_mask ? 2 * Traits::kSmemMaskBytes : 0);
}

template <typename Element, int kHeadDim>
cudaError_t AttentionBwdVariant<Element, kHeadDim>::attributes(cudaFuncAttributes* attr) {
  return cudaFuncGetAttributes(attr, attention_bwd_kernel<AttentionBwdTraits<kHeadDim, Element>>);
}

template <typename Element, int kHeadDim>
cudaError_t AttentionBwdVariant<Element, kHeadDim>::run(const AttentionBwdKernelParams& p,
                                                        cudaStream_t stream) {
  using Traits = AttentionBwdTraits<kHeadDim, Element>;
  const AttentionBwdGrid g = attention_bwd_grid(p.seqlen_k, Traits::kBlockN, p.num_heads_k, p.batch);
  if (g.x == 0 || g.y == 0) return cudaSuccess;
  if (!g.fits()) return cudaErrorInvalidConfiguration;
  auto kernel = attention_bwd_kernel<Traits>;
  const int smem = smem_bytes(p.mask_kind != MaskKind::kNone);
  // Above 48 KB: the opt-in, once per device (smem_optin.h).
  const cudaError_t err = ensure_dynamic_smem<Traits>(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(g.x), unsigned(g.y), unsigned(g.z)), Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
