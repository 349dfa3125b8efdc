// Host entry of the CUDA KV-cache attention: decides whether a compiled
// variant covers the call, picks the number of key splits and launches.
// No kernel is compiled here; the variants live in kvcache_fwd_<dtype>.cu.
#include "kvcache_fwd.h"

#include <algorithm>

#include "../attention/static_switch.h"

namespace pyfastattn {
namespace cuda {

namespace {

using kvcache::KvCacheVariant;

// Calls f(KvCacheVariant<Element, kHeadDim>{}) for the variant that runs p:
// the dtype's, with the smallest compiled head dim (64, 128, 256) >= d.
template <typename F>
auto with_variant(const AttentionFwdParams& p, F&& f) {
  return PFA_FP16_SWITCH(p.dtype == DType::kBFloat16, Element, [&] {
    if (p.head_dim <= 64) return f(KvCacheVariant<Element, 64>{});
    if (p.head_dim <= 128) return f(KvCacheVariant<Element, 128>{});
    return f(KvCacheVariant<Element, 256>{});
  });
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

const char* kvcache_fwd_unsupported_reason(const AttentionFwdParams& p, const KvAppendParams* a,
                                           KvCacheKernel kernel) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "the CUDA KV-cache kernel supports float16 and bfloat16 only";
  if (p.head_dim != p.head_dim_v) return "the CUDA KV-cache kernel needs head_dim_v == head_dim";
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 8 != 0)
    return "the CUDA KV-cache kernel needs head_dim a multiple of 8 in [8, 256]";
  // 16-byte copies of every row: pointers 16-byte aligned, strides multiples of 8 elements.
  const bool rows16 = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.o) &&
                      p.q_batch_stride % 8 == 0 && p.q_row_stride % 8 == 0 && p.q_head_stride % 8 == 0 &&
                      p.k_batch_stride % 8 == 0 && p.k_row_stride % 8 == 0 && p.k_head_stride % 8 == 0 &&
                      p.v_batch_stride % 8 == 0 && p.v_row_stride % 8 == 0 && p.v_head_stride % 8 == 0;
  if (!rows16)
    return "the CUDA KV-cache kernel needs q, k_cache and v_cache 16-byte aligned with strides that are "
           "multiples of 8 elements";
  if (a != nullptr) {
    if (a->s_new > 0 &&
        !(aligned16(a->k_new) && aligned16(a->v_new) && a->kn_batch_stride % 8 == 0 && a->kn_row_stride % 8 == 0 &&
          a->kn_head_stride % 8 == 0 && a->vn_batch_stride % 8 == 0 && a->vn_row_stride % 8 == 0 &&
          a->vn_head_stride % 8 == 0))
      return "the CUDA KV-cache kernel needs k and v 16-byte aligned with strides that are multiples of 8 elements";
    if (a->rotary_dim % 16 != 0) return "the CUDA KV-cache kernel needs rotary_dim a multiple of 16";
    if (a->rotary_dim > 0 && !(aligned16(a->q) && a->q_batch_stride % 8 == 0 && a->q_row_stride % 8 == 0 &&
                               a->q_head_stride % 8 == 0))
      return "the CUDA KV-cache kernel needs q 16-byte aligned with strides that are multiples of 8 elements";
  }
  cudaFuncAttributes attr;
  const cudaError_t image = with_variant(p, [&](auto variant) { return decltype(variant)::attributes(kernel, &attr); });
  if (image != cudaSuccess) {
    (void)cudaGetLastError();
    return "the CUDA KV-cache kernel has no kernel image for this GPU in this build";
  }
  return nullptr;
}

int kvcache_fwd_num_splits(const AttentionFwdParams& p, int max_len_k, KvCacheKernel kernel) {
  if (p.num_splits > 0) return std::min(p.num_splits, kKvCacheMaxSplits);
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    sms = 108;  // an A100's count: the split count changes speed, never results
  }
  const int rows = with_variant(p, [&](auto variant) { return decltype(variant)::rows_per_cta(kernel); });
  const int64_t ctas = int64_t(p.batch) * p.num_heads_k *
                       ((int64_t(p.seqlen_q) * (p.num_heads / p.num_heads_k) + rows - 1) / rows);
  if (ctas == 0) return 1;
  // Two waves of CTAs over the device, but no split under 256 keys.
  const int64_t want = (2 * int64_t(sms) + ctas - 1) / ctas;
  const int64_t cap = std::max<int64_t>(1, (int64_t(max_len_k) + 255) / 256);
  return int(std::max<int64_t>(1, std::min<int64_t>({want, cap, kKvCacheMaxSplits})));
}

cudaError_t kvcache_fwd(const AttentionFwdParams& p, const KvAppendParams* a, const KvSplitOut& w,
                        KvCacheKernel kernel, cudaStream_t stream) {
  // The caller has checked kvcache_fwd_unsupported_reason; these would
  // otherwise run a wrong variant silently.
  if ((p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || p.head_dim <= 0 || p.head_dim > 256 ||
      p.head_dim != p.head_dim_v || w.num_splits < 1 || (w.num_splits > 1 && w.o_accum == nullptr))
    return cudaErrorInvalidValue;
  return with_variant(p, [&](auto variant) {
    using V = decltype(variant);
    if (a != nullptr) {
      const cudaError_t err = V::append(p, *a, stream);
      if (err != cudaSuccess) return err;
    }
    return V::attend(p, w, kernel, stream);
  });
}

}  // namespace cuda
}  // namespace pyfastattn
