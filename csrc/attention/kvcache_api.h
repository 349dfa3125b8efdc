// The checked form of one torch.ops.pyfastattn.attention_kvcache_fwd call,
// shared by its CPU (kvcache_api.cpp) and CUDA (csrc/cuda/kvcache_cuda_api.cpp)
// implementations: every check that keeps a kernel inside its tensors runs
// here, whatever the device.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../cpu/attention_kvcache.h"  // KvAppendParams (plain data)
#include "params.h"

namespace pyfastattn {

struct KvCacheCall {
  AttentionFwdParams p{};  // the KV cache block filled (params.h)
  cpu::KvAppendParams a{};  // valid when `append`
  bool append = false;      // new keys to write, or rotary
  int32_t max_len_k = 0;    // the longest sequence's key count (seqused_k)
  at::Tensor out, lse;      // outputs, on q's device
  at::Tensor q_rot;         // the rotated q (rotary only)
  at::Tensor rotary_cos, rotary_sin;  // the tables the kernels read (rotary only; see prepare_kvcache_call)
  // The int32 values p and a index with, on q's device; read on the host and
  // checked there (one device-to-host copy of all of them: the op waits for
  // q's stream once), then copied back from pinned memory without a wait.
  at::Tensor meta;
};

// Checks every argument (shapes, dtypes, devices, and each metadata value
// against the tensor it indexes), then fills the params.
KvCacheCall prepare_kvcache_call(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double scale, double softcap,
    int64_t window_left, int64_t window_right, int64_t num_splits, const std::optional<at::Tensor>& alibi_slopes);

}  // namespace pyfastattn
