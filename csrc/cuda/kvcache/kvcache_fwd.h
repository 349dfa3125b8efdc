// CUDA launchers of attention over a KV cache (no torch headers): the
// kernels are in kvcache_fwd_kernel.cuh, one .cu per dtype compiles them.
#pragma once

#include <cuda_runtime.h>

#include "../../attention/params.h"
#include "../../cpu/attention_kvcache.h"  // KvAppendParams (plain data)

namespace pyfastattn {
namespace cuda {

using KvAppendParams = cpu::KvAppendParams;

// Where the partials of several key splits go: o_accum [splits, b * sq * hq,
// d] fp32, each normalised by its own row sum (0 for a split that saw no
// key); lse_accum [splits, b * sq * hq], natural log (-inf: no key). Row
// index (b * sq + i) * hq + h. Unused (nullptr) with one split.
struct KvSplitOut {
  float* o_accum;
  float* lse_accum;
  int num_splits;
};

// Which split-KV attention kernel runs (kvcache_fwd_kernel.cuh,
// kvcache_fwd_mma_kernel.cuh): the CUDA-core one, verified on an H200, or the
// tensor-core one with per-warp key tiles, written for decode's bandwidth and
// not yet run on a GPU. Same contract and results up to rounding.
enum class KvCacheKernel { kSimt, kMma };

// Why the CUDA kernels cannot run this (checked, host-pointer-free) call on
// the current device, or nullptr. `a` is nullptr when nothing is appended
// and there is no rotary.
const char* kvcache_fwd_unsupported_reason(const AttentionFwdParams& p, const KvAppendParams* a,
                                           KvCacheKernel kernel);

// The number of key splits for a call: p.num_splits when set (at most
// kvcache_max_splits), else enough CTAs to fill the device twice over with
// at least 256 keys per split. `max_len_k` is the longest sequence's key count.
constexpr int kKvCacheMaxSplits = 128;
int kvcache_fwd_num_splits(const AttentionFwdParams& p, int max_len_k, KvCacheKernel kernel);

// Append / rotary (when a != nullptr), the split kernel, and the combine
// kernel when w.num_splits > 1, all on `stream`.
cudaError_t kvcache_fwd(const AttentionFwdParams& p, const KvAppendParams* a, const KvSplitOut& w,
                        KvCacheKernel kernel, cudaStream_t stream);

namespace kvcache {

// One compiled (dtype, head dim) variant; instantiated in kvcache_fwd_<dtype>.cu.
template <typename Element, int kHeadDim>
struct KvCacheVariant {
  static int rows_per_cta(KvCacheKernel kernel);
  static cudaError_t append(const AttentionFwdParams& p, const KvAppendParams& a, cudaStream_t stream);
  static cudaError_t attend(const AttentionFwdParams& p, const KvSplitOut& w, KvCacheKernel kernel,
                            cudaStream_t stream);
  static cudaError_t attributes(KvCacheKernel kernel, cudaFuncAttributes* attr);
};

}  // namespace kvcache
}  // namespace cuda
}  // namespace pyfastattn
