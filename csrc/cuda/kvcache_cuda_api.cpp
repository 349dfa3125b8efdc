// CUDA implementation of pyfastattn::attention_kvcache_fwd: the shared checks
// (prepare_kvcache_call, csrc/attention/kvcache_api.cpp), then device guard,
// current stream, split workspace, launch check. The kernels
// (csrc/cuda/kvcache/*.cu) include no torch headers.
#include <cstdlib>
#include <string>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention/kvcache_api.h"
#include "kvcache/kvcache_fwd.h"
#include "launch_check.h"

namespace pyfastattn {
namespace {

// PYFASTATTN_KVCACHE_CUDA_KERNEL picks the split-KV kernel: 'simt' (the
// default: the CUDA-core kernel, verified on an H200) or 'mma' (the
// tensor-core kernel, emulator-tested, not yet run on a GPU). Read on every
// call, so that one process can time both.
cuda::KvCacheKernel kvcache_cuda_kernel() {
  const char* env = std::getenv("PYFASTATTN_KVCACHE_CUDA_KERNEL");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "simt") return cuda::KvCacheKernel::kSimt;
  if (v == "mma") return cuda::KvCacheKernel::kMma;
  TORCH_CHECK_VALUE(false, "PYFASTATTN_KVCACHE_CUDA_KERNEL must be 'simt' (the default) or 'mma', got '", v, "'");
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double scale, double softcap,
    int64_t window_left, int64_t window_right, int64_t num_splits, const std::optional<at::Tensor>& alibi_slopes) {
  const c10::cuda::CUDAGuard guard(q.device());
  KvCacheCall c = prepare_kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                                       block_table, rotary_cos, rotary_sin, rotary_interleaved, scale, softcap,
                                       window_left, window_right, num_splits, alibi_slopes);
  const cpu::KvAppendParams* a = c.append ? &c.a : nullptr;
  const cuda::KvCacheKernel kernel = kvcache_cuda_kernel();
  if (const char* why = cuda::kvcache_fwd_unsupported_reason(c.p, a, kernel))
    TORCH_CHECK_VALUE(false, "attention_kvcache_fwd on CUDA: ", why, " (q ", q.sizes(), ", k_cache ",
                      k_cache.sizes(), ", ", q.scalar_type(), ")");
  cuda::KvSplitOut w{nullptr, nullptr, cuda::kvcache_fwd_num_splits(c.p, c.max_len_k, kernel)};
  at::Tensor o_accum, lse_accum;
  if (w.num_splits > 1) {
    const int64_t rows = int64_t(c.p.batch) * c.p.seqlen_q * c.p.num_heads;
    o_accum = at::empty({w.num_splits, rows, c.p.head_dim}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({w.num_splits, rows}, q.options().dtype(at::kFloat));
    w.o_accum = o_accum.data_ptr<float>();
    w.lse_accum = lse_accum.data_ptr<float>();
  }
  check_launch(cuda::kvcache_fwd(c.p, a, w, kernel, c10::cuda::getCurrentCUDAStream(q.get_device()).stream()),
               "kvcache_append_kernel / ",
               kernel == cuda::KvCacheKernel::kMma ? "kvcache_split_mma_kernel" : "kvcache_split_kernel",
               " / kvcache_combine_kernel (batch ", c.p.batch,
               ", seqlen_q ", c.p.seqlen_q, ", heads ", c.p.num_heads, "/", c.p.num_heads_k, ", head_dim ",
               c.p.head_dim, ", splits ", w.num_splits, ", ", q.scalar_type(), ")");
  return {c.out, c.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastattn, CUDA, m) { m.impl("attention_kvcache_fwd", &attention_kvcache_fwd_cuda); }

}  // namespace pyfastattn
