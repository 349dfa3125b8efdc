// Host entry of the CUDA attention backward: decides whether a compiled
// variant covers the call, and launches preprocess -> main kernel -> convert.
// The main-kernel variants live in attention_bwd_hdim<d>_<dtype>.cu; the two
// row kernels (templated on the dtype only) are compiled here.
#include "attention_bwd.h"

#include "attention_bwd_kernel.cuh"
#include "attention_bwd_launch.h"
#include "device_limits.h"
#include "static_switch.h"

namespace pyfastattn {
namespace cuda {

namespace {

using attention::AttentionBwdVariant;

template <typename F>
auto with_variant(const AttentionBwdParams& p, F&& f) {
  return PFA_FP16_SWITCH(p.dtype == DType::kBFloat16, Element, [&] {
    return PFA_HEADDIM_SWITCH(p.head_dim, kHeadDim,
                              [&] { return f(AttentionBwdVariant<Element, kHeadDim>{}); });
  });
}

}  // namespace

int attention_bwd_block_m(const AttentionBwdParams& p) {
  return with_variant(p, [](auto variant) { return decltype(variant)::block_m(); });
}

const char* attention_bwd_unsupported_reason(const AttentionBwdParams& p, int sm) {
  if (sm < 80) return "the CUDA attention backward needs compute capability 8.0 or newer";
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "the CUDA attention backward supports float16 and bfloat16 only";
  if (p.head_dim != p.head_dim_v) return "the CUDA attention backward needs head_dim_v == head_dim";
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 8 != 0)
    return "the CUDA attention backward needs head_dim a multiple of 8 in [8, 256]";
  if (p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0)
    return "the CUDA attention backward needs num_heads to be a multiple of num_heads_k";
  if (p.mask_kind != MaskKind::kNone && p.cu_seqlens_q != nullptr)
    return "the CUDA attention backward takes no attn_mask with variable-length sequences";
  const int block_n = with_variant(p, [](auto variant) { return decltype(variant)::block_n(); });
  if (!attention::attention_bwd_grid(p.seqlen_k, block_n, p.num_heads_k, p.batch).fits() ||
      !attention::attention_bwd_grid(p.seqlen_q, attention::kRowKernelRows, p.num_heads, p.batch)
           .fits())
    return "the CUDA attention backward grid is too large (num_heads * batch over 65535^2)";
  if (p.deterministic) {
    const attention::AttentionBwdGrid g =
        attention::attention_bwd_grid(p.seqlen_k, block_n, p.num_heads_k, p.batch);
    if (double(g.x) * double(g.y) * double(g.z) >= 4294967296.0)
      return "the deterministic CUDA attention backward takes fewer than 2^32 CTAs (its 32-bit start tickets)";
  }
  int smem_optin = 0;
  if (attention::smem_per_block_limit(&smem_optin) != cudaSuccess)
    return "the CUDA attention backward could not query the current CUDA device";
  const bool with_mask = p.mask_kind != MaskKind::kNone;
  const int smem =
      with_variant(p, [&](auto variant) { return decltype(variant)::smem_bytes(with_mask); });
  if (smem_optin < smem)
    return "the CUDA attention backward needs more shared memory per block than this GPU has";
  cudaFuncAttributes attr;
  const cudaError_t image =
      with_variant(p, [&](auto variant) { return decltype(variant)::attributes(&attr); });
  if (image != cudaSuccess) {
    (void)cudaGetLastError();
    return "the CUDA attention backward has no kernel image for this GPU in this build";
  }
  return nullptr;
}

cudaError_t attention_bwd(const AttentionBwdKernelParams& p, cudaStream_t stream,
                          const char** failed_kernel) {
  const char* unused = nullptr;
  const char*& failed = failed_kernel ? *failed_kernel : unused;
  // The caller has checked attention_bwd_unsupported_reason; these would
  // otherwise run a wrong variant silently.
  failed = "attention_bwd (params rejected)";
  if ((p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || p.head_dim <= 0 ||
      p.head_dim > 256 || p.head_dim % 8 != 0 || p.head_dim != p.head_dim_v)
    return cudaErrorInvalidValue;
  const attention::AttentionBwdGrid rows =
      attention::attention_bwd_grid(p.seqlen_q, attention::kRowKernelRows, p.num_heads, p.batch);
  failed = "attention_bwd_kernel";
  if (rows.x == 0 || rows.y == 0) {
    // No query rows: dK and dV are 0 wherever a sequence owns keys.
    return with_variant(p, [&](auto variant) { return decltype(variant)::run(p, stream); });
  }
  failed = "attention_bwd_preprocess_kernel";
  if (!rows.fits()) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(rows.x), unsigned(rows.y), unsigned(rows.z));
  const cudaError_t err = PFA_FP16_SWITCH(p.dtype == DType::kBFloat16, Element, [&] {
    attention::attention_bwd_preprocess_kernel<Element>
        <<<grid, attention::kRowKernelThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  failed = "attention_bwd_kernel";
  const cudaError_t main =
      with_variant(p, [&](auto variant) { return decltype(variant)::run(p, stream); });
  if (main != cudaSuccess) return main;
  failed = "attention_bwd_convert_dq_kernel";
  return PFA_FP16_SWITCH(p.dtype == DType::kBFloat16, Element, [&] {
    attention::attention_bwd_convert_dq_kernel<Element>
        <<<grid, attention::kRowKernelThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace pyfastattn
