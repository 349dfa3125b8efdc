// torch.ops.pyfastattn.attention_kvcache_fwd: attention over a KV cache with
// in-place append, rotary, a batch index, left padding, paged blocks and
// ALiBi (FlashAttention 2's flash_attn_with_kvcache semantics). The schema, the
// checks that protect memory, tensors -> params, and the CPU implementation.
// The CUDA implementation (csrc/cuda/kvcache_cuda_api.cpp) runs the same
// checks through prepare_kvcache_call.
//
// pyfastattn/kvcache.py validates user input first; this layer re-checks every
// value a kernel would index with (cache_seqlens, cache_batch_idx,
// cache_leftpad, block_table entries, rotary table length), read on the host,
// so that direct callers of the op can never make a kernel read or write
// outside a tensor.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kvcache_api.h"

#include "../cpu/attention_cpu.h"
#include "../cpu/attention_kvcache.h"
#include "api.h"

namespace pyfastattn {
namespace {

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name, int64_t dims) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && !t.is_nested() && t.has_storage(), name,
                    " must be a dense strided tensor with storage");
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, ".dtype must equal q.dtype (", q.scalar_type(),
                    "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, ".device must equal q.device (", q.device(), "), got ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim(), " (shape ", t.sizes(),
                    ")");
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dimension, got stride ", t.stride(-1));
}

// The int32 metadata tensors (cache_seqlens, block_table, cache_batch_idx,
// cache_leftpad): each one's dtype, device, layout and shape checked, then
// all their values read on the host together. On CUDA that is one gather on
// q's stream and one device-to-host copy, i.e. the op waits for the stream
// once per call, not once per tensor.
struct MetaArg {
  const at::Tensor* t;  // nullptr: not given (its vector stays empty)
  const char* name;
  std::vector<int64_t> shape;
  std::vector<int32_t>* out;
};

void read_metadata(const std::vector<MetaArg>& args, const at::Tensor& q) {
  std::vector<at::Tensor> flat;
  for (const MetaArg& m : args) {
    if (m.t == nullptr) continue;
    const at::Tensor& t = *m.t;
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, m.name, ".dtype must be torch.int32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == q.device(), m.name, ".device must equal q.device (", q.device(), "), got ",
                      t.device());
    TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.has_storage(), m.name, " must be a dense strided tensor");
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(m.shape), m.name, ".shape must be ", at::IntArrayRef(m.shape),
                      ", got ", t.sizes());
    flat.push_back(t.reshape({-1}));
  }
  if (flat.empty()) return;
  const at::Tensor host = (flat.size() == 1 ? flat[0] : at::cat(flat)).contiguous().cpu();
  const int32_t* v = host.data_ptr<int32_t>();
  for (const MetaArg& m : args) {
    if (m.t == nullptr) continue;
    const int64_t n = m.t->numel();
    m.out->assign(v, v + n);
    v += n;
  }
}

}  // namespace

KvCacheCall prepare_kvcache_call(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double scale, double softcap,
    int64_t window_left, int64_t window_right, int64_t num_splits, const std::optional<at::Tensor>& alibi_slopes) {
  // ---- shapes -------------------------------------------------------------
  to_dtype(q.scalar_type());
  check_like_q(q, q, "q", 4);
  const bool paged = block_table.has_value();
  check_like_q(k_cache, q, "k_cache", 4);
  check_like_q(v_cache, q, "v_cache", 4);
  const int64_t batch = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t hk = k_cache.size(2), dv = v_cache.size(3);
  TORCH_CHECK_VALUE(k_cache.size(3) == d, "k_cache.shape[3] (head dim) must equal q.shape[3] (", d, "), got ",
                    k_cache.size(3));
  TORCH_CHECK_VALUE(v_cache.size(2) == hk, "v_cache.shape[2] (kv heads) must equal k_cache.shape[2] (", hk,
                    "), got ", v_cache.size(2));
  TORCH_CHECK_VALUE(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1),
                    "v_cache.shape[:2] must equal k_cache.shape[:2] (", k_cache.sizes().slice(0, 2), "), got ",
                    v_cache.sizes().slice(0, 2));
  TORCH_CHECK_VALUE(hk > 0 && hq % hk == 0, "q heads (", hq, ") must be a multiple of the cache's kv heads (", hk,
                    ")");
  TORCH_CHECK_VALUE(d > 0 && dv > 0, "head dims must be positive, got ", d, " and ", dv);
  const int64_t cache_rows = k_cache.size(0);  // sequences, or blocks when paged
  int64_t capacity = k_cache.size(1);          // keys per sequence
  int64_t page = 0;
  std::vector<int32_t> table;
  int64_t max_blocks = 0;
  if (paged) {
    page = k_cache.size(1);
    TORCH_CHECK_VALUE(page > 0, "k_cache.shape[1] (block size) must be positive, got ", page);
    TORCH_CHECK_VALUE(!cache_batch_idx.has_value(), "cache_batch_idx cannot be combined with block_table");
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == batch, "block_table must have shape (",
                      batch, ", max_blocks), got ", block_table->sizes());
    max_blocks = block_table->size(1);
    capacity = max_blocks * page;
  } else if (cache_batch_idx.has_value()) {
    // Checked below, per value.
  } else {
    TORCH_CHECK_VALUE(cache_rows == batch, "k_cache.shape[0] (", cache_rows,
                      ") must equal q.shape[0] (batch, ", batch, ") without cache_batch_idx");
  }
  constexpr int64_t kMaxSeqlen = INT32_MAX - 65536;  // as check_attention_inputs
  TORCH_CHECK_VALUE(capacity <= kMaxSeqlen, "the cache's capacity per sequence (", capacity,
                    " keys) must be at most ", kMaxSeqlen);
  int64_t s_new = 0;
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together");
  if (k.has_value()) {
    check_like_q(*k, q, "k", 4);
    check_like_q(*v, q, "v", 4);
    s_new = k->size(1);
    const std::vector<int64_t> kw = {batch, s_new, hk, d}, vw = {batch, s_new, hk, dv};
    TORCH_CHECK_VALUE(k->sizes() == at::IntArrayRef(kw), "k must have shape ", at::IntArrayRef(kw),
                      " (batch, seqlen_new, kv heads of the cache, head dim), got ", k->sizes());
    TORCH_CHECK_VALUE(v->sizes() == at::IntArrayRef(vw), "v must have shape ", at::IntArrayRef(vw), ", got ",
                      v->sizes());
  }

  // ---- metadata values (host) ----------------------------------------------
  std::vector<int32_t> seqlens, bidx, leftpad;
  read_metadata({{&cache_seqlens, "cache_seqlens", {batch}, &seqlens},
                 {paged ? &*block_table : nullptr, "block_table", {batch, max_blocks}, &table},
                 {cache_batch_idx ? &*cache_batch_idx : nullptr, "cache_batch_idx", {batch}, &bidx},
                 {cache_leftpad ? &*cache_leftpad : nullptr, "cache_leftpad", {batch}, &leftpad}},
                q);
  std::vector<int32_t> used(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t sl = seqlens[b];
    TORCH_CHECK_VALUE(sl >= 0, "cache_seqlens[", b, "] must be >= 0, got ", sl);
    TORCH_CHECK_VALUE(sl + s_new <= capacity, "cache_seqlens[", b, "] + seqlen_new = ", sl, " + ", s_new, " = ",
                      sl + s_new, " exceeds the cache's capacity of ", capacity, " keys per sequence");
    const int64_t lp = leftpad.empty() ? 0 : leftpad[b];
    TORCH_CHECK_VALUE(lp >= 0 && lp <= sl, "cache_leftpad[", b, "] must be in [0, cache_seqlens[", b, "] = ", sl,
                      "], got ", lp);
    if (!bidx.empty())
      TORCH_CHECK_VALUE(bidx[b] >= 0 && bidx[b] < cache_rows, "cache_batch_idx[", b, "] must be in [0, ",
                        cache_rows, ") (k_cache.shape[0]), got ", bidx[b]);
    if (paged) {
      // Every block a key of this sequence lies in (read or written).
      const int64_t first = lp / page, last = (sl + s_new + page - 1) / page;
      for (int64_t blk = first; blk < last; ++blk) {
        const int32_t e = table[size_t(b * max_blocks + blk)];
        TORCH_CHECK_VALUE(e >= 0 && e < cache_rows, "block_table[", b, ", ", blk, "] must be in [0, ", cache_rows,
                          ") (k_cache.shape[0], the number of blocks), got ", e);
      }
    }
    used[size_t(b)] = int32_t(sl + s_new - lp);
  }
  if (s_new > 0 && !bidx.empty()) {
    // Two batch rows that append into one cache row would write the same
    // slots (which write wins is undefined; FlashAttention races): an error.
    // The values are on the host already, so this costs no device sync.
    std::vector<std::pair<int32_t, int64_t>> rows;
    rows.reserve(bidx.size());
    for (size_t b = 0; b < bidx.size(); ++b) rows.emplace_back(bidx[b], int64_t(b));
    std::sort(rows.begin(), rows.end());
    for (size_t i = 1; i < rows.size(); ++i)
      TORCH_CHECK_VALUE(rows[i].first != rows[i - 1].first,
                        "cache_batch_idx must not repeat a cache row when k / v are appended (two batch rows "
                        "would write the same cache slots), got cache_batch_idx[",
                        rows[i - 1].second, "] = cache_batch_idx[", rows[i].second, "] = ", rows[i].first);
  }
  if (s_new > 0 && paged) {
    // The same for a block table that sends two appended positions (of two
    // sequences, or of one) to one cache slot. Checked per run of positions
    // inside one block (B x (s_new / page + 1) spans), not per position.
    struct Span {
      int32_t block;
      int64_t lo, hi, b, pos;  // rows [lo, hi) of the block: positions pos.. of sequence b
    };
    std::vector<Span> spans;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t end = int64_t(seqlens[b]) + s_new;
      for (int64_t t = seqlens[b]; t < end;) {
        const int64_t row = t % page, n = std::min(page - row, end - t);
        spans.push_back(Span{table[size_t(b * max_blocks + t / page)], row, row + n, b, t});
        t += n;
      }
    }
    std::sort(spans.begin(), spans.end(),
              [](const Span& x, const Span& y) { return x.block != y.block ? x.block < y.block : x.lo < y.lo; });
    size_t widest = 0;  // of the spans so far in the current block, the one reaching furthest
    for (size_t i = 1; i < spans.size(); ++i) {
      const Span& x = spans[i];
      if (x.block != spans[i - 1].block) {
        widest = i;
        continue;
      }
      const Span& w = spans[widest];
      if (x.lo < w.hi) {
        const int64_t row = x.lo, wpos = w.pos + (row - w.lo);
        TORCH_CHECK_VALUE(false, "block_table must not send two appended positions to one cache slot (two writes "
                          "to the same block row), got block ", x.block, ", row ", row, " for position ", wpos,
                          " of sequence ", w.b, " and position ", x.pos, " of sequence ", x.b);
      }
      if (x.hi > w.hi) widest = i;
    }
  }

  // ---- rotary ----------------------------------------------------------------
  TORCH_CHECK_VALUE(rotary_cos.has_value() == rotary_sin.has_value(), "rotary_cos and rotary_sin must be given together");
  const bool rotary = rotary_cos.has_value();
  const bool q_per_row = (window_left >= 0 && window_left < capacity) || (window_right >= 0 && window_right < capacity);
  int64_t rd = 0;
  bool rotary_fp32 = false;
  if (rotary) {
    TORCH_CHECK_VALUE(k.has_value(), "rotary_cos / rotary_sin need the new k and v to append (as FlashAttention)");
    const at::Tensor& cs = *rotary_cos;
    const at::Tensor& sn = *rotary_sin;
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cs, "rotary_cos"},
                                  std::pair<const at::Tensor&, const char*>{sn, "rotary_sin"}}) {
      TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.has_storage(), name, " must be a dense strided tensor");
      TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type() || t.scalar_type() == at::kFloat, name,
                        ".dtype must be q.dtype (", q.scalar_type(), ") or torch.float32, got ", t.scalar_type());
      TORCH_CHECK_VALUE(t.device() == q.device(), name, ".device must equal q.device");
      TORCH_CHECK_VALUE(t.dim() == 2, name, " must have 2 dims (seqlen_ro, rotary_dim / 2), got ", t.dim());
    }
    TORCH_CHECK_VALUE(sn.sizes() == cs.sizes() && sn.scalar_type() == cs.scalar_type(),
                      "rotary_sin must have rotary_cos's shape and dtype (", cs.sizes(), ", ", cs.scalar_type(),
                      "), got ", sn.sizes(), ", ", sn.scalar_type());
    rd = 2 * cs.size(1);
    TORCH_CHECK_VALUE(rd > 0 && rd <= d, "rotary_dim = 2 * rotary_cos.shape[1] = ", rd, " must be in [2, ", d,
                      "] (the head dim)");
    int64_t need = 0;
    for (int64_t b = 0; b < batch; ++b)
      need = std::max<int64_t>(need, int64_t(seqlens[b]) + std::max<int64_t>(s_new, q_per_row ? sq : 1));
    TORCH_CHECK_VALUE(cs.size(0) >= need, "rotary_cos.shape[0] (seqlen_ro) must be at least ", need,
                      " (the last position rotated + 1), got ", cs.size(0));
    rotary_fp32 = cs.scalar_type() == at::kFloat && q.scalar_type() != at::kFloat;
  }

  // ---- params -----------------------------------------------------------------
  KvCacheCall call;
  call.out = at::empty({batch, sq, hq, dv}, q.options());
  call.lse = at::empty({batch, hq, sq}, q.options().dtype(at::kFloat));
  at::Tensor& out = call.out;
  at::Tensor& lse = call.lse;
  // The int32 values the kernels index with (exactly the values checked
  // above), in one tensor on q's device: used | seqlens | table | bidx | leftpad.
  std::vector<int32_t> meta(used);
  const size_t at_sl = meta.size();
  meta.insert(meta.end(), seqlens.begin(), seqlens.end());
  const size_t at_bt = meta.size();
  meta.insert(meta.end(), table.begin(), table.end());
  const size_t at_bidx = meta.size();
  meta.insert(meta.end(), bidx.begin(), bidx.end());
  const size_t at_lp = meta.size();
  meta.insert(meta.end(), leftpad.begin(), leftpad.end());
  // On CUDA the values go back from pinned memory without a wait (the copy is
  // ordered on q's stream before the kernels, and torch's pinned allocator
  // keeps the buffer until the copy is done); on the CPU the host tensor is
  // the one the kernel reads.
  at::Tensor meta_host =
      at::empty({int64_t(meta.size())}, at::TensorOptions().dtype(at::kInt).pinned_memory(q.is_cuda()));
  std::copy(meta.begin(), meta.end(), meta_host.data_ptr<int32_t>());
  call.meta = q.is_cuda() ? meta_host.to(q.device(), /*non_blocking=*/true) : meta_host;
  int32_t* meta_ptr = call.meta.data_ptr<int32_t>();
  for (int32_t u : used) call.max_len_k = std::max(call.max_len_k, u);
  at::Tensor q_in = q;
  if (rotary) q_in = call.q_rot = at::empty({batch, sq, hq, d}, q.options());

  AttentionFwdParams& p = call.p;
  p.q = q_in.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.q_batch_stride = q_in.stride(0);
  p.q_row_stride = q_in.stride(1);
  p.q_head_stride = q_in.stride(2);
  p.k_batch_stride = k_cache.stride(0);
  p.k_row_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.v_batch_stride = v_cache.stride(0);
  p.v_row_stride = v_cache.stride(1);
  p.v_head_stride = v_cache.stride(2);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.batch = int32_t(batch);
  p.seqlen_q = int32_t(sq);
  p.seqlen_k = int32_t(capacity);
  p.num_heads = int32_t(hq);
  p.num_heads_k = int32_t(hk);
  p.head_dim = int32_t(d);
  p.head_dim_v = int32_t(dv);
  p.dtype = to_dtype(q.scalar_type());
  p.seqused_k = meta_ptr;
  auto clamp_window = [](int64_t w) -> int32_t {
    return w < 0 ? -1 : static_cast<int32_t>(std::min<int64_t>(w, INT32_MAX / 2));
  };
  p.window_left = clamp_window(window_left);
  p.window_right = clamp_window(window_right);
  p.bottom_right = true;
  p.mask_kind = MaskKind::kNone;
  constexpr double kLog2e = 1.4426950408889634;
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.scale_log2 = softcap > 0 ? 0.0f : float(scale * kLog2e);
  p.block_table = paged ? meta_ptr + at_bt : nullptr;
  p.block_table_batch_stride = paged ? max_blocks : 0;
  p.page_block_size = int32_t(page);
  p.cache_batch_idx = bidx.empty() ? nullptr : meta_ptr + at_bidx;
  p.cache_leftpad = leftpad.empty() ? nullptr : meta_ptr + at_lp;
  p.num_splits = int32_t(std::max<int64_t>(0, std::min<int64_t>(num_splits, 1 << 16)));
  // ALiBi: the one check of the slopes (dtype, device, shape (hq) or (b, hq))
  // that attention_fwd uses; dropout stays off (FlashAttention's KV-cache
  // call has none).
  AttentionShape shape{};
  shape.batch = batch;
  shape.heads = hq;
  fill_dropout_alibi(p, shape, q, 0.0, std::nullopt, alibi_slopes);

  // Appending writes one cache slot per (sequence, position, kv head): a
  // cache whose memory overlaps itself (a stride-0 dim of size > 1, as
  // expand() makes) would have several of them land in one place, and other
  // sequences read the result. torch warns for index_put_ there; this is
  // an error, as nothing here could be right.
  if (s_new > 0) {
    for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&k_cache, "k_cache"},
                                  std::pair<const at::Tensor*, const char*>{&v_cache, "v_cache"}}) {
      TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, name,
                        " must not overlap itself to append k / v into it (a dim of size > 1 with stride 0, as "
                        "expand() makes: several slots would share memory); got shape ",
                        t->sizes(), " and strides ", t->strides(), ". Pass a cache with its own memory "
                        "(e.g. .contiguous())");
    }
  }
  call.append = s_new > 0 || rotary;
  if (call.append) {
    cpu::KvAppendParams& a = call.a;
    if (s_new > 0) {
      a.k_new = k->data_ptr();
      a.v_new = v->data_ptr();
      a.kn_batch_stride = k->stride(0);
      a.kn_row_stride = k->stride(1);
      a.kn_head_stride = k->stride(2);
      a.vn_batch_stride = v->stride(0);
      a.vn_row_stride = v->stride(1);
      a.vn_head_stride = v->stride(2);
    }
    a.s_new = int32_t(s_new);
    a.cache_seqlens = meta_ptr + at_sl;
    if (rotary) {
      // The kernels read both tables with unit column stride and one row
      // stride. Other layouts (a column slice, a transposed view, tables of
      // different strides) are copied: the tables are small, and the
      // reference path takes any layout.
      const bool as_is = rotary_cos->stride(1) == 1 && rotary_sin->stride(1) == 1 &&
                         rotary_cos->stride(0) == rotary_sin->stride(0);
      call.rotary_cos = as_is ? *rotary_cos : rotary_cos->clone(at::MemoryFormat::Contiguous);
      call.rotary_sin = as_is ? *rotary_sin : rotary_sin->clone(at::MemoryFormat::Contiguous);
      a.rotary_cos = call.rotary_cos.data_ptr();
      a.rotary_sin = call.rotary_sin.data_ptr();
      a.rotary_row_stride = call.rotary_cos.stride(0);
      a.rotary_dim = int32_t(rd);
      a.rotary_fp32 = rotary_fp32;
      a.rotary_interleaved = rotary_interleaved;
      a.q = q.data_ptr();
      a.q_rot = q_in.data_ptr();
      a.q_batch_stride = q.stride(0);
      a.q_row_stride = q.stride(1);
      a.q_head_stride = q.stride(2);
      a.qr_batch_stride = q_in.stride(0);
      a.qr_row_stride = q_in.stride(1);
      a.qr_head_stride = q_in.stride(2);
      a.q_per_row = q_per_row;
    }
  }
  return call;
}

namespace {

std::tuple<at::Tensor, at::Tensor> attention_kvcache_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved, double scale, double softcap,
    int64_t window_left, int64_t window_right, int64_t num_splits, const std::optional<at::Tensor>& alibi_slopes) {
  KvCacheCall c = prepare_kvcache_call(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                                       block_table, rotary_cos, rotary_sin, rotary_interleaved, scale, softcap,
                                       window_left, window_right, num_splits, alibi_slopes);
  if (c.append) cpu::kvcache_append(c.p, c.a);
  if (cpu::kvcache_suits_tiled_kernel(c.p))
    cpu::attention_fwd(c.p);  // reads the cache in place: block table, batch index, left padding
  else
    cpu::attention_kvcache_fwd(c.p);
  return {c.out, c.lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyfastattn, m) {
  m.def(
      "attention_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? cache_batch_idx, Tensor? cache_leftpad, Tensor? block_table, "
      "Tensor? rotary_cos, Tensor? rotary_sin, bool rotary_interleaved, float scale, float softcap, "
      "int window_left, int window_right, int num_splits, Tensor? alibi_slopes=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyfastattn, CPU, m) { m.impl("attention_kvcache_fwd", &attention_kvcache_fwd_cpu); }

}  // namespace pyfastattn
