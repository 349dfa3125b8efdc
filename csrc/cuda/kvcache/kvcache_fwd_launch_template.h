// Definitions of KvCacheVariant (kvcache_fwd.h): included only by the
// per-dtype .cu files, each of which instantiates its dtype's head dims.
#pragma once

#include "kvcache_fwd.h"
#include "../smem_optin.h"
#include "kvcache_fwd_kernel.cuh"
#include "kvcache_fwd_mma_kernel.cuh"

namespace pyfastattn {
namespace cuda {
namespace kvcache {

template <typename Element, int kHeadDim>
int KvCacheVariant<Element, kHeadDim>::rows_per_cta(KvCacheKernel kernel) {
  return kernel == KvCacheKernel::kMma ? KvMmaTraits<Element, kHeadDim>::kRows : KvCacheTraits<Element, kHeadDim>::kRows;
}

template <typename Element, int kHeadDim>
cudaError_t KvCacheVariant<Element, kHeadDim>::append(const AttentionFwdParams& p, const KvAppendParams& a,
                                                      cudaStream_t stream) {
  const int64_t chunks = p.head_dim / 8;
  const int64_t items = 2 * int64_t(p.batch) * a.s_new * p.num_heads_k * chunks +
                        (a.rotary_dim > 0 ? int64_t(p.batch) * p.seqlen_q * p.num_heads * chunks : 0);
  if (items == 0) return cudaSuccess;
  const int64_t blocks = (items + 127) / 128;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  kvcache_append_kernel<Element><<<unsigned(blocks), 128, 0, stream>>>(p, a);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim>
cudaError_t KvCacheVariant<Element, kHeadDim>::attend(const AttentionFwdParams& p, const KvSplitOut& w,
                                                      KvCacheKernel kernel, cudaStream_t stream) {
  const KvCacheGrid g = kvcache_grid(p, rows_per_cta(kernel), w.num_splits);
  if (g.x == 0 || g.y == 0) return cudaSuccess;  // no query rows: nothing to do
  if (!g.fits()) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(g.x), unsigned(g.y), unsigned(g.z));
  if (kernel == KvCacheKernel::kMma) {
    using Traits = KvMmaTraits<Element, kHeadDim>;
    auto* fn = kvcache_split_mma_kernel<Traits>;
    const cudaError_t err = ensure_dynamic_smem<Traits>(fn, Traits::kSmemBytes);
    if (err != cudaSuccess) return err;
    fn<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, w);
  } else {
    using Traits = KvCacheTraits<Element, kHeadDim>;
    kvcache_split_kernel<Traits><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, w);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || w.num_splits == 1) return err;
  const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.num_heads;
  const int64_t blocks = (rows + 3) / 4;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  kvcache_combine_kernel<Element><<<unsigned(blocks), 128, 0, stream>>>(p, w);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim>
cudaError_t KvCacheVariant<Element, kHeadDim>::attributes(KvCacheKernel kernel, cudaFuncAttributes* attr) {
  if (kernel == KvCacheKernel::kMma)
    return cudaFuncGetAttributes(attr, kvcache_split_mma_kernel<KvMmaTraits<Element, kHeadDim>>);
  return cudaFuncGetAttributes(attr, kvcache_split_kernel<KvCacheTraits<Element, kHeadDim>>);
}

}  // namespace kvcache
}  // namespace cuda
}  // namespace pyfastattn
