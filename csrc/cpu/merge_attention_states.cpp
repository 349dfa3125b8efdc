// CPU implementation of pyfastattn::merge_attention_states (schema in
// csrc/ops.cpp, math in csrc/merge/params.h). One task per (batch, row, head)
// row range; each row reads two lse values, computes its two weights once and
// streams the head dim in fp32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../merge/api.h"

namespace pyfastattn {
namespace {

template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename TA, typename TB>
void merge_rows(const MergeParams& p) {
  const auto* a = static_cast<const TA*>(p.out_a);
  const auto* b = static_cast<const TB*>(p.out_b);
  auto* o = static_cast<TA*>(p.out);
  const int64_t rows = p.batch * p.seqlen * p.heads;
  const int64_t d = p.head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // ~4 KB of output per task at the smallest grain keeps the split cheap.
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % p.heads;
      const int64_t s = (r / p.heads) % p.seqlen;
      const int64_t bi = r / (p.heads * p.seqlen);
      const float la = p.lse_a[bi * p.la_batch_stride + h * p.la_head_stride + s * p.la_row_stride];
      const float lb = p.lse_b[bi * p.lb_batch_stride + h * p.lb_head_stride + s * p.lb_row_stride];
      TA* orow = o + bi * p.o_batch_stride + s * p.o_row_stride + h * p.o_head_stride;
      float& lse = p.lse[bi * p.lo_batch_stride + h * p.lo_head_stride + s * p.lo_row_stride];
      const float m = std::max(la, lb);
      if (std::isnan(la) || std::isnan(lb)) {  // NaN in, NaN out: never hidden
        lse = std::numeric_limits<float>::quiet_NaN();
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<TA>(lse);
        continue;
      }
      if (m == neg_inf) {  // neither part saw a key
        lse = neg_inf;
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<TA>(0.0f);
        continue;
      }
      const float wa = std::exp(la - m), wb = std::exp(lb - m);
      const float inv = 1.0f / (wa + wb);
      const float ca = wa * inv, cb = wb * inv;
      lse = m + std::log(wa + wb);
      const TA* arow = a + bi * p.a_batch_stride + s * p.a_row_stride + h * p.a_head_stride;
      const TB* brow = b + bi * p.b_batch_stride + s * p.b_row_stride + h * p.b_head_stride;
      // A part of weight 0 is not read: its rows may hold anything.
      if (wb == 0.0f) {
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<TA>(load(arow, j));
      } else if (wa == 0.0f) {
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<TA>(load(brow, j));
      } else {
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<TA>(ca * load(arow, j) + cb * load(brow, j));
      }
    }
  });
}

template <typename TA>
void merge_dispatch_b(const MergeParams& p) {
  switch (p.b_dtype) {
    case DType::kFloat32: return merge_rows<TA, float>(p);
    case DType::kFloat16: return merge_rows<TA, c10::Half>(p);
    case DType::kBFloat16: return merge_rows<TA, c10::BFloat16>(p);
  }
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& out_a,
                                                              const at::Tensor& lse_a,
                                                              const at::Tensor& out_b,
                                                              const at::Tensor& lse_b) {
  MergeParams p;
  auto [out, lse] = prepare_merge(p, out_a, lse_a, out_b, lse_b);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  switch (p.a_dtype) {
    case DType::kFloat32: merge_dispatch_b<float>(p); break;
    case DType::kFloat16: merge_dispatch_b<c10::Half>(p); break;
    case DType::kBFloat16: merge_dispatch_b<c10::BFloat16>(p); break;
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastattn, CPU, m) {
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace pyfastattn
