// Host entry of the CUDA attention forward: decides whether a compiled variant
// covers the call and launches it. No kernel is compiled here; the variants
// live in attention_fwd_hdim<d>_<dtype>.cu.
#include "attention_fwd.h"

#include "attention_fwd_launch.h"
#include "device_limits.h"
#include "static_switch.h"

namespace pyfastattn {
namespace cuda {

namespace {

using attention::AttentionFwdVariant;

// Calls f(AttentionFwdVariant<Element, kHeadDim>{}) for the variant that runs
// p: the dtype's, with the smallest compiled head dim >= p.head_dim.
template <typename F>
auto with_variant(const AttentionFwdParams& p, F&& f) {
  return PFA_FP16_SWITCH(p.dtype == DType::kBFloat16, Element, [&] {
    return PFA_HEADDIM_SWITCH(p.head_dim, kHeadDim,
                              [&] { return f(AttentionFwdVariant<Element, kHeadDim>{}); });
  });
}

}  // namespace

const char* attention_fwd_unsupported_reason(const AttentionFwdParams& p, int sm) {
  if (sm < 80) return "the CUDA attention forward needs compute capability 8.0 or newer";
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "the CUDA attention forward supports float16 and bfloat16 only";
  if (p.head_dim != p.head_dim_v) return "the CUDA attention forward needs head_dim_v == head_dim";
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 8 != 0)
    return "the CUDA attention forward needs head_dim a multiple of 8 in [8, 256]";
  if (p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0)
    return "the CUDA attention forward needs num_heads to be a multiple of num_heads_k";
  if (p.mask_kind != MaskKind::kNone && p.cu_seqlens_q != nullptr)
    return "the CUDA attention forward takes no attn_mask with variable-length sequences";
  const int block_m = with_variant(p, [](auto variant) { return decltype(variant)::block_m(); });
  if (!attention::attention_fwd_grid(p, block_m).fits())
    return "the CUDA attention forward grid is too large (num_heads * batch over 65535^2)";

  // The current device must have the shared memory and a kernel image for
  // this build (sm_80 SASS runs on sm_80..89, sm_90a SASS on sm_90 only).
  int smem_optin = 0;
  if (attention::smem_per_block_limit(&smem_optin) != cudaSuccess)
    return "the CUDA attention forward could not query the current CUDA device";
  const bool with_mask = p.mask_kind != MaskKind::kNone;
  const int smem =
      with_variant(p, [&](auto variant) { return decltype(variant)::smem_bytes(with_mask); });
  if (smem_optin < smem)
    return "the CUDA attention forward needs more shared memory per block than this GPU has";
  cudaFuncAttributes attr;
  const cudaError_t image =
      with_variant(p, [&](auto variant) { return decltype(variant)::attributes(&attr); });
  if (image != cudaSuccess) {
    (void)cudaGetLastError();
    return "the CUDA attention forward has no kernel image for this GPU in this build";
  }
  return nullptr;
}

cudaError_t attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  // The caller has checked attention_fwd_unsupported_reason; these two would
  // otherwise run a wrong variant silently (the dtype switch, the 256 cap).
  if ((p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || p.head_dim <= 0 ||
      p.head_dim > 256 || p.head_dim != p.head_dim_v)
    return cudaErrorInvalidValue;
  return with_variant(p, [&](auto variant) { return decltype(variant)::run(p, stream); });
}

}  // namespace cuda
}  // namespace pyfastattn
