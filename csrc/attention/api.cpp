#include "api.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace pyfastattn {

namespace {

// A kernel reads a tensor only through data_ptr() and strides: anything else
// (sparse, nested, or a tensor without storage) is refused here.
void check_strided(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && !t.is_nested() && t.has_storage(), name,
                    " must be a dense strided tensor with storage, got layout ", t.layout(),
                    t.is_nested() ? " (nested)" : "");
}

void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_strided(t, name);
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, ".dtype must equal q.dtype (",
                    q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, ".device must equal q.device (", q.device(),
                    "), got ", t.device());
  // A size-1 last dim may carry any stride (torch calls such a tensor
  // contiguous, and .contiguous() leaves it as is): no kernel steps along it.
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dimension, got stride ", t.stride(-1));
}

// Reads a small int32 metadata tensor on the host (a device sync for CUDA
// tensors: the price of never reading outside a tensor on bad metadata).
std::vector<int32_t> host_values(const at::Tensor& t, const char* name, int64_t expected_len,
                                 const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, ".dtype must be torch.int32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dims");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, ".device must equal q.device (", q.device(),
                    "), got ", t.device());
  TORCH_CHECK_VALUE(expected_len < 0 || t.size(0) == expected_len, name, " must have ",
                    expected_len, " elements, got ", t.size(0));
  check_strided(t, name);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  at::Tensor h = t.cpu();
  return std::vector<int32_t>(h.data_ptr<int32_t>(), h.data_ptr<int32_t>() + h.numel());
}

// cu_seqlens must start at 0, never decrease, end inside the packed tensor,
// and no sequence may be longer than max_seqlen.
void check_cu_seqlens(const std::vector<int32_t>& cu, const char* name, int64_t total,
                      int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_VALUE(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (size_t i = 1; i < cu.size(); ++i) {
    TORCH_CHECK_VALUE(cu[i] >= cu[i - 1], name, " must be non-decreasing, got ", name, "[", i,
                      "] = ", cu[i], " < ", name, "[", i - 1, "] = ", cu[i - 1]);
    TORCH_CHECK_VALUE(cu[i] - cu[i - 1] <= max_seqlen, max_name, " (", max_seqlen,
                      ") is smaller than sequence ", i - 1, "'s length ", cu[i] - cu[i - 1]);
  }
  TORCH_CHECK_VALUE(cu.back() <= total, name, "[-1] = ", cu.back(),
                    " runs past the packed tensor's ", total, " rows");
}

}  // namespace

AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v,
                                      const std::optional<at::Tensor>& attn_mask,
                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                      const std::optional<at::Tensor>& cu_seqlens_k,
                                      const std::optional<at::Tensor>& seqused_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK_VALUE(kernel_dtype(q.scalar_type()), "pyfastattn kernels: q.dtype must be ", kKernelDTypes,
                    ", got ", q.scalar_type());
  check_same(q, q, "q");
  check_same(k, q, "k");
  check_same(v, q, "v");
  AttentionShape s{};
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k must be given together");
  s.varlen = cu_seqlens_q.has_value();
  const int64_t rank = s.varlen ? 3 : 4;
  TORCH_CHECK_VALUE(q.dim() == rank, "q must have ", rank, " dims (",
                    s.varlen ? "total, heads, head_dim" : "batch, seqlen, heads, head_dim",
                    "), got ", q.dim());
  TORCH_CHECK_VALUE(k.dim() == rank, "k must have ", rank, " dims, got ", k.dim());
  TORCH_CHECK_VALUE(v.dim() == rank, "v must have ", rank, " dims, got ", v.dim());
  s.heads = q.size(-2);
  s.heads_k = k.size(-2);
  s.head_dim = q.size(-1);
  s.head_dim_v = v.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, "k.shape[-1] must equal q.shape[-1] (", s.head_dim,
                    "), got ", k.size(-1));
  TORCH_CHECK_VALUE(v.size(-2) == s.heads_k, "v.shape[-2] (heads) must equal k.shape[-2] (",
                    s.heads_k, "), got ", v.size(-2));
  TORCH_CHECK_VALUE(s.heads_k > 0 && s.heads % s.heads_k == 0,
                    "q heads must be a multiple of k heads, got ", s.heads, " and ", s.heads_k);
  TORCH_CHECK_VALUE(s.head_dim > 0 && s.head_dim_v > 0, "head dims must be positive, got ",
                    s.head_dim, " and ", s.head_dim_v);
  if (s.varlen) {
    s.total_q = q.size(0);
    s.total_k = k.size(0);
    TORCH_CHECK_VALUE(v.size(0) == s.total_k, "v.shape[0] must equal k.shape[0] (", s.total_k,
                      "), got ", v.size(0));
    s.batch = cu_seqlens_q->numel() - 1;
    TORCH_CHECK_VALUE(s.batch >= 0, "cu_seqlens_q must have at least one element");
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0,
                      "max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
                      max_seqlen_k);
    auto cq = host_values(*cu_seqlens_q, "cu_seqlens_q", s.batch + 1, q);
    auto ck = host_values(*cu_seqlens_k, "cu_seqlens_k", s.batch + 1, q);
    check_cu_seqlens(cq, "cu_seqlens_q", s.total_q, max_seqlen_q, "max_seqlen_q");
    check_cu_seqlens(ck, "cu_seqlens_k", s.total_k, max_seqlen_k, "max_seqlen_k");
    s.seqlen_q = max_seqlen_q;
    s.seqlen_k = max_seqlen_k;
    s.used_rows_q = cq.back();
    s.used_rows_k = ck.back();
    TORCH_CHECK_VALUE(!attn_mask.has_value(), "attn_mask cannot be combined with cu_seqlens");
    if (seqused_k.has_value()) {
      auto used = host_values(*seqused_k, "seqused_k", s.batch, q);
      for (int64_t b = 0; b < s.batch; ++b)
        TORCH_CHECK_VALUE(used[b] >= 0 && used[b] <= ck[b + 1] - ck[b], "seqused_k[", b, "] = ",
                          used[b], " must be in [0, ", ck[b + 1] - ck[b], "]");
    }
  } else {
    s.batch = q.size(0);
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
    s.total_q = s.batch * s.seqlen_q;
    s.total_k = s.batch * s.seqlen_k;
    s.used_rows_q = s.total_q;
    s.used_rows_k = s.total_k;
    TORCH_CHECK_VALUE(k.size(0) == s.batch && v.size(0) == s.batch,
                      "k and v batch must equal q batch (", s.batch, "), got ", k.size(0), " and ",
                      v.size(0));
    TORCH_CHECK_VALUE(v.size(1) == s.seqlen_k, "v.shape[1] must equal k.shape[1] (", s.seqlen_k,
                      "), got ", v.size(1));
    if (seqused_k.has_value()) {
      auto used = host_values(*seqused_k, "seqused_k", s.batch, q);
      for (int64_t b = 0; b < s.batch; ++b)
        TORCH_CHECK_VALUE(used[b] >= 0 && used[b] <= s.seqlen_k, "seqused_k[", b, "] = ",
                          used[b], " must be in [0, ", s.seqlen_k, "]");
    }
    if (attn_mask.has_value()) {
      const at::Tensor& m = *attn_mask;
      check_strided(m, "attn_mask");
      TORCH_CHECK_VALUE(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                        "attn_mask.dtype must be torch.bool or q.dtype (", q.scalar_type(),
                        "), got ", m.scalar_type());
      TORCH_CHECK_VALUE(m.device() == q.device(), "attn_mask.device must equal q.device");
      TORCH_CHECK_VALUE(m.dim() == 4, "attn_mask must have 4 dims (b|1, h|1, sq|1, sk), got ",
                        m.dim());
      const int64_t want[4] = {s.batch, s.heads, s.seqlen_q, s.seqlen_k};
      for (int d = 0; d < 3; ++d)
        TORCH_CHECK_VALUE(m.size(d) == want[d] || m.size(d) == 1, "attn_mask.shape[", d,
                          "] must be ", want[d], " or 1, got ", m.size(d));
      TORCH_CHECK_VALUE(m.size(3) == s.seqlen_k, "attn_mask.shape[3] must be ", s.seqlen_k,
                        ", got ", m.size(3));
      TORCH_CHECK_VALUE(s.seqlen_k <= 1 || m.stride(3) == 1,
                        "attn_mask must be contiguous in its last dim, got stride ", m.stride(3));
    }
  }
  s.has_seqused_k = seqused_k.has_value();
  // The kernels index rows of one sequence in int32 and form sums like
  // `key block start + block size - 1` (a ceil-div over len_k): lengths stay a
  // block-size margin below 2^31 so that none of those sums can wrap into a
  // negative block count (a silent all-zero output), whatever the tile size.
  constexpr int64_t kMaxSeqlen = INT32_MAX - 65536;
  TORCH_CHECK_VALUE(s.seqlen_q <= kMaxSeqlen && s.seqlen_k <= kMaxSeqlen,
                    "sequence lengths (max_seqlen for cu_seqlens) must be at most ", kMaxSeqlen,
                    ", got ", s.seqlen_q, " and ", s.seqlen_k);
  TORCH_CHECK_VALUE(s.batch < INT32_MAX && s.heads < INT32_MAX,
                    "batch and heads must fit in int32, got ", s.batch, " and ", s.heads);
  return s;
}

namespace {
// An uninitialised [b, s, h, dv] tensor whose (b, s, h) dims lie in memory in
// the same order as q's (outermost = largest stride; ties keep b, s, h order;
// the head dim stays innermost). torch's SDPA returns its output in its
// query's layout: a contiguous (b, h, s, d) query reaches the op as a
// (b, s, h, d) view with the head stride above the row stride, gets a
// (b, h, s, dv) buffer here, and the drop-in's transpose back is free.
at::Tensor empty_dense_like_layout(const at::Tensor& q, at::IntArrayRef sizes) {
  std::array<int64_t, 3> order = {0, 1, 2};
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return q.stride(a) > q.stride(b); });
  // The strides of a contiguous buffer of the sizes in that order, permuted
  // back; one empty_strided instead of empty + permute (one dispatch and one
  // tensor less per call: ~0.3 us of a decode call, PERF_NOTES "The fixed
  // cost of a call").
  std::array<int64_t, 4> strides = {0, 0, 0, 1};
  int64_t step = sizes[3];
  for (int64_t i = 2; i >= 0; --i) {
    strides[order[i]] = step;
    step *= sizes[order[i]];
  }
  return at::empty_strided(sizes, strides, q.options());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> empty_fwd_outputs(const at::Tensor& q,
                                                     const AttentionShape& s) {
  auto sizes = q.sizes().vec();
  sizes.back() = s.head_dim_v;
  at::Tensor out = s.varlen ? at::empty(sizes, q.options()) : empty_dense_like_layout(q, sizes);
  at::Tensor lse = s.varlen ? at::empty({s.heads, s.total_q}, q.options().dtype(at::kFloat))
                            : at::empty({s.batch, s.heads, s.seqlen_q},
                                        q.options().dtype(at::kFloat));
  if (s.varlen && s.used_rows_q < s.total_q) {
    out.narrow(0, s.used_rows_q, s.total_q - s.used_rows_q).zero_();
    lse.narrow(1, s.used_rows_q, s.total_q - s.used_rows_q).fill_(-INFINITY);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_bwd_outputs(const at::Tensor& q,
                                                                 const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const AttentionShape& s) {
  const bool q_gaps = s.varlen && s.used_rows_q < s.total_q;
  const bool k_gaps = s.has_seqused_k || (s.varlen && s.used_rows_k < s.total_k);
  auto make = [](const at::Tensor& t, bool zero) {
    return zero ? at::zeros(t.sizes(), t.options()) : at::empty(t.sizes(), t.options());
  };
  return {make(q, q_gaps), make(k, k_gaps), make(v, k_gaps)};
}

namespace {
// (batch, row, head) strides of a [b, s, h, d] or [total, h, d] tensor.
void strides3(const at::Tensor& t, bool varlen, int64_t& b, int64_t& r, int64_t& h) {
  b = varlen ? 0 : t.stride(0);
  r = t.stride(-3);
  h = t.stride(-2);
}
}  // namespace

void fill_fwd_params(AttentionFwdParams& p, const AttentionShape& s, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
                     const std::optional<at::Tensor>& cu_seqlens_q,
                     const std::optional<at::Tensor>& cu_seqlens_k,
                     const std::optional<at::Tensor>& seqused_k, double scale, double softcap,
                     int64_t window_left, int64_t window_right, bool bottom_right) {
  p = AttentionFwdParams{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  strides3(q, s.varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides3(k, s.varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides3(v, s.varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides3(out, s.varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.lse_batch_stride = s.varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(-2);
  p.batch = static_cast<int32_t>(s.batch);
  p.seqlen_q = static_cast<int32_t>(s.seqlen_q);
  p.seqlen_k = static_cast<int32_t>(s.seqlen_k);
  p.num_heads = static_cast<int32_t>(s.heads);
  p.num_heads_k = static_cast<int32_t>(s.heads_k);
  p.head_dim = static_cast<int32_t>(s.head_dim);
  p.head_dim_v = static_cast<int32_t>(s.head_dim_v);
  p.dtype = to_dtype(q.scalar_type());
  p.cu_seqlens_q = cu_seqlens_q ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = cu_seqlens_k ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  p.seqused_k = seqused_k ? seqused_k->data_ptr<int32_t>() : nullptr;
  // Windows larger than any sequence are the same as no window.
  auto clamp_window = [](int64_t w) -> int32_t {
    return w < 0 ? -1 : static_cast<int32_t>(std::min<int64_t>(w, INT32_MAX / 2));
  };
  p.window_left = clamp_window(window_left);
  p.window_right = clamp_window(window_right);
  p.bottom_right = bottom_right;
  if (attn_mask.has_value() && s.seqlen_q > 0 && s.seqlen_k > 0) {
    const at::Tensor& m = *attn_mask;
    p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    p.mask = m.data_ptr();
    p.mask_batch_stride = m.size(0) == 1 ? 0 : m.stride(0);
    p.mask_head_stride = m.size(1) == 1 ? 0 : m.stride(1);
    p.mask_row_stride = m.size(2) == 1 ? 0 : m.stride(2);
  } else {
    p.mask_kind = MaskKind::kNone;
    p.mask = nullptr;
  }
  constexpr double kLog2e = 1.4426950408889634;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.scale_log2 = softcap > 0 ? 0.0f : static_cast<float>(scale * kLog2e);
}

void fill_dropout_alibi(AttentionFwdParams& p, const AttentionShape& s, const at::Tensor& q,
                        double dropout_p, const std::optional<at::Tensor>& dropout_rng,
                        const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ",
                    dropout_p);
  p.dropout_p = 0.0f;
  p.dropout_rescale = 1.0f;
  p.dropout_rng = nullptr;
  p.dropout = DropoutKey{0, 0, 0};
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(dropout_rng.has_value(),
                      "dropout_p > 0 needs dropout_rng, an int64 tensor [2] (seed, offset)");
    const at::Tensor& r = *dropout_rng;
    check_strided(r, "dropout_rng");
    TORCH_CHECK_VALUE(r.scalar_type() == at::kLong && r.dim() == 1 && r.size(0) == 2 &&
                          r.is_contiguous(),
                      "dropout_rng must be a contiguous int64 tensor of shape [2] (seed, offset), got ",
                      r.scalar_type(), " of shape ", r.sizes());
    TORCH_CHECK_VALUE(r.device() == q.device() || r.device().is_cpu(),
                      "dropout_rng.device must be q.device (", q.device(), ") or cpu, got ",
                      r.device());
    p.dropout_p = static_cast<float>(dropout_p);
    p.dropout_rescale = dropout_p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
    p.dropout.threshold = dropout_threshold(dropout_p);
    if (r.device().is_cpu()) {
      const int64_t* v = r.data_ptr<int64_t>();
      p.dropout.seed = static_cast<uint64_t>(v[0]);
      p.dropout.offset = static_cast<uint64_t>(v[1]);
    }
    p.dropout_rng = r.device() == q.device() ? r.data_ptr<int64_t>() : nullptr;
  }
  p.alibi_slopes = nullptr;
  p.alibi_batch_stride = 0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    check_strided(a, "alibi_slopes");
    TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat, "alibi_slopes.dtype must be torch.float32, got ",
                      a.scalar_type());
    TORCH_CHECK_VALUE(a.device() == q.device(), "alibi_slopes.device must equal q.device (",
                      q.device(), "), got ", a.device());
    const bool per_head = a.dim() == 1 && a.size(0) == s.heads;
    const bool per_batch = a.dim() == 2 && a.size(0) == s.batch && a.size(1) == s.heads;
    TORCH_CHECK_VALUE(per_head || per_batch, "alibi_slopes must have shape (", s.heads, ",) or (",
                      s.batch, ", ", s.heads, "), got ", a.sizes());
    TORCH_CHECK_VALUE(a.numel() == 0 || a.stride(-1) == 1,
                      "alibi_slopes must be contiguous in its last dim");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = per_batch && s.batch > 1 ? a.stride(0) : 0;
  }
}

void check_bwd_inputs(const AttentionShape& s, const at::Tensor& q, const at::Tensor& dout,
                      const at::Tensor& out, const at::Tensor& lse) {
  check_same(dout, q, "dout");
  check_same(out, q, "out");
  auto want = q.sizes().vec();
  want.back() = s.head_dim_v;
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(want), "out.shape must be ", at::IntArrayRef(want),
                    ", got ", out.sizes());
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(want), "dout.shape must be ",
                    at::IntArrayRef(want), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat, "lse.dtype must be torch.float32, got ",
                    lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse.device must equal q.device");
  std::vector<int64_t> lse_want = s.varlen ? std::vector<int64_t>{s.heads, s.total_q}
                                           : std::vector<int64_t>{s.batch, s.heads, s.seqlen_q};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_want), "lse.shape must be ",
                    at::IntArrayRef(lse_want), ", got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.numel() == 0 || lse.stride(-1) == 1,
                    "lse must be contiguous in its last dim");
}

void fill_bwd_grads(AttentionBwdParams& p, const at::Tensor& dout, const at::Tensor& dq,
                    const at::Tensor& dk, const at::Tensor& dv, bool deterministic) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  p.dout = dout.data_ptr();
  strides3(dout, varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides3(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides3(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides3(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.deterministic = deterministic;
}

}  // namespace pyfastattn
