// Definitions of AttentionFwdVariant (attention_fwd_launch.h): included only
// by the per-variant .cu files, each of which instantiates one variant.
#pragma once

#include "attention_fwd_kernel.cuh"
#include "attention_fwd_launch.h"
#include "attention_fwd_traits.h"
#include "../smem_optin.h"

namespace pyfastattn {
namespace cuda {
namespace attention {

template <typename Element, int kHeadDim>
int AttentionFwdVariant<Element, kHeadDim>::block_m() {
  return AttentionFwdTraits<kHeadDim, Element>::kBlockM;
}

template <typename Element, int kHeadDim>
int AttentionFwdVariant<Element, kHeadDim>::smem_bytes(bool with_mask) {
  using Traits = AttentionFwdTraits<kHeadDim, Element>;
  return Traits::kSmemBytes + (with_mask ? Traits::kSmemMaskBytes : 0);
}

template <typename Element, int kHeadDim>
cudaError_t AttentionFwdVariant<Element, kHeadDim>::attributes(cudaFuncAttributes* attr) {
  return cudaFuncGetAttributes(attr, attention_fwd_kernel<AttentionFwdTraits<kHeadDim, Element>>);
}

template <typename Element, int kHeadDim>
cudaError_t AttentionFwdVariant<Element, kHeadDim>::run(const AttentionFwdParams& p,
                                                        cudaStream_t stream) {
  using Traits = AttentionFwdTraits<kHeadDim, Element>;
  const AttentionFwdGrid g = attention_fwd_grid(p, Traits::kBlockM);
  if (g.m_blocks == 0 || g.y == 0) return cudaSuccess;  // no query rows or no heads: nothing to do
  if (!g.fits()) return cudaErrorInvalidConfiguration;

  auto kernel = attention_fwd_kernel<Traits>;
  const int smem = smem_bytes(p.mask_kind != MaskKind::kNone);
  // Above 48 KB: the opt-in, once per device (smem_optin.h).
  const cudaError_t err = ensure_dynamic_smem<Traits>(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(g.m_blocks), static_cast<unsigned>(g.y),
                  static_cast<unsigned>(g.z));
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
