// CPU attention backward, one-pass form (attention_bwd.h): where fused_chunks
// allows, per (sequence, kv head, chunk of key blocks), S, dP, P and dS of each
// tile are computed once and feed all three products (dV, dK and the chunk's
// dQ partial). Three task kinds, run in this order by fused_bwd:
//   prep   (bwd_prep_block):   per query block, D and the packed Q / dO operands;
//   fused  (bwd_fused_block):  per key-block chunk, dK, dV and dQ partials;
//   reduce (bwd_reduce_block): per query block, dQ = the partials summed in
//                              chunk order.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "attention_bwd.h"
#include "attention_schedule.h"
#include "attention_tile.h"

namespace pyfastattn {
namespace cpu {
namespace {

// One-pass backward: a query block's Q^T, dO^T (B operands of S^T and dP^T)
// and Q, dO rows (B operands of dK and dV) inside its Ctx::qo_pack block.
struct QoPack {
  float* qt;
  float* dot;
  float* qb;
  float* dob;
};

template <typename T, typename CT>
PFA_INLINE int64_t pack_floats(const Ctx& c) {
  using TL = Tiles<T, CT>;
  const int64_t bq = c.blk.q, rows = TL::kPairs ? bq / 2 : bq;  // VNNI: pairs of rows
  return (TL::kdim(c.d) + TL::kdim(c.dv)) * bq + rows * (c.d + c.dv);
}

template <typename T, typename CT>
PFA_INLINE QoPack pack_parts(const Ctx& c, const SeqInfo& si, int h, int i0) {
  using TL = Tiles<T, CT>;
  const int64_t first = c.pack_first[si.bi], blocks = c.pack_first[si.bi + 1] - first;
  const int64_t at = first * c.p->num_heads + h * blocks + i0 / c.blk.q;
  const int64_t bq = c.blk.q, rows = TL::kPairs ? bq / 2 : bq;
  QoPack k;
  k.qt = c.qo_pack + at * c.pack_floats;
  k.dot = k.qt + TL::kdim(c.d) * bq;
  k.qb = k.dot + TL::kdim(c.dv) * bq;
  k.dob = k.qb + rows * c.d;
  return k;
}

// Rows per sub-block of a diagonal tile in the one-pass backward (a multiple
// of 2 * kLanes, so that bf16 row pairs and vectors of lanes stay whole).
constexpr int kDiagRows = 32;

// The scratch of a query block seen from its row r0 on (r0 a multiple of
// kDiagRows): every per-row pointer moves by r0 lanes; fp32 words hold one
// lane, bf16 rows of P^T / dS^T (pout, dsout) two, VNNI Q / dO rows a pair
// of rows. Key-indexed buffers (ka, va, kb, acc1, acc2) stay.
template <bool kPairs>
PFA_INLINE BwdScratch sub_rows(const BwdScratch& w, int r0, int d, int dv) {
  BwdScratch v = w;
  if (r0 == 0) return v;
  v.qt += r0;
  v.dot += r0;
  v.qb += int64_t(kPairs ? r0 / 2 : r0) * d;
  v.dob += int64_t(kPairs ? r0 / 2 : r0) * dv;
  v.s += r0;
  v.dp += r0;
  v.pout += r0 / 2;
  v.dsout += r0 / 2;
  if (v.dspair) v.dspair += r0;
  if (v.bias) v.bias += r0;
  if (v.dtanh) v.dtanh += r0;
  v.lse2 += r0;
  v.dsum += r0;
  v.lo += r0;
  v.hi += r0;
  if (v.keep) v.keep += r0;
  return v;
}

// One-pass backward (chosen by fused_chunks): one task per (sequence, kv
// head, chunk of key blocks) computes S, dP, P and dS of each tile once and
// all three products from them, 5 tile products instead of 7. dK and dV are
// owned by the task; dQ is summed per chunk into dq_part (fp32) and the
// chunks are added in chunk order by bwd_reduce_block. Chunks, blocks and
// the order inside a task depend on the shape only, so the result is still
// bit-identical for any thread count. Query blocks are aligned to blk.q (rows
// before the first one reaching the key block get P = 0 from the window), so
// that every chunk writes whole blocks of dq_part: the first write of a block
// overwrites (no clearing pass) and marks its rows in dq_touched.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_fused_block(const Ctx& c, const BwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int hk = t.h, chunk = t.i0;
  const int all_owned = owned_keys(p, si);
  const int nkb = (all_owned + c.blk.k - 1) / c.blk.k;
  const int per = (nkb + c.chunks - 1) / c.chunks;
  const int kb_end = std::min(nkb, (chunk + 1) * per);
  const int64_t ldq = c.blk.q;
  float* part = c.dq_part + int64_t(chunk) * c.part_rows * c.d;
  uint8_t* touched = c.dq_touched + int64_t(chunk) * c.part_rows;

  for (int kb = chunk * per; kb < kb_end; ++kb) {
    const int j0 = kb * c.blk.k;
    const int owned = std::min(c.blk.k, all_owned - j0);
    const int n = std::max(0, std::min(owned, si.len_k - j0));
    std::fill(w.acc1, w.acc1 + int64_t(n) * c.d, 0.0f);
    std::fill(w.acc2, w.acc2 + int64_t(n) * c.dv, 0.0f);
    if (n > 0) {
      const T* krows = static_cast<const T*>(p.k) + si.k_row(j0, p.k_batch_stride, p.k_row_stride) +
                       int64_t(hk) * p.k_head_stride;
      const T* vrows = static_cast<const T*>(p.v) + si.k_row(j0, p.v_batch_stride, p.v_row_stride) +
                       int64_t(hk) * p.v_head_stride;
      TL::a_rows(krows, p.k_row_stride, n, c.d, w.ka);
      TL::a_rows(vrows, p.v_row_stride, n, c.dv, w.va);
      if constexpr (TL::kPairs) TL::b_rows(krows, p.k_row_stride, n, c.d, w.kb);
      const int row_begin = first_row_reaching(p, si, j0) / c.blk.q * c.blk.q;
      const int row_end = end_row_starting_by(p, si, j0 + n - 1);
      for (int h = hk * c.group; h < (hk + 1) * c.group; ++h) {
        const T* qh = static_cast<const T*>(p.q) + si.q_row(0, p.q_batch_stride, p.q_row_stride) +
                      int64_t(h) * p.q_head_stride;
        const T* doh = static_cast<const T*>(p.dout) + si.q_row(0, p.do_batch_stride, p.do_row_stride) +
                       int64_t(h) * p.do_head_stride;
        for (int i0 = row_begin; i0 < row_end; i0 += c.blk.q) {
          const int m = std::min(c.blk.q, si.len_q - i0);
          const int mp = int(round_up(m, kLanes));
          if (!load_row_stats(c, w, si, h, i0, m, mp)) continue;
          RowRanges rr{w.lo, w.hi, m};
          fill_ranges(p, si, i0, rr);
          // Keys no row of the block sees (past the causal diagonal) are cut
          // from the tile, kept even so that a bf16 pair never pairs a
          // visible key with an unloaded one: the block on the diagonal of
          // a 256-key block computed 256 keys where its rows see 128
          // (PERF_NOTES "issue 21 v4"). dK and dV of the cut keys get
          // nothing from this block, as before (P = dS = 0 there).
          const int nt = std::min(n, int(round_up(std::max(rr.last() - j0, 1), 2)));
          BwdScratch wq = w;
          if (TL::kPairs && c.qo_pack) {  // only the bf16 dot-product path packs
            const QoPack k = pack_parts<T, CT>(c, si, h, i0);
            wq.qt = k.qt;
            wq.dot = k.dot;
            wq.qb = k.qb;
            wq.dob = k.dob;
          } else {
            const T* q = qh + int64_t(i0) * p.q_row_stride;
            const T* dout = doh + int64_t(i0) * p.do_row_stride;
            pack_t<typename Isa::Vec, T, CT>(q, p.q_row_stride, m, c.d, w.qt, ldq);
            pack_t<typename Isa::Vec, T, CT>(dout, p.do_row_stride, m, c.dv, w.dot, ldq);
            TL::b_rows(dout, p.do_row_stride, m, c.dv, w.dob);
            TL::b_rows(q, p.q_row_stride, m, c.d, w.qb);
          }
          // A tile on the diagonal (some row does not see all its keys) runs
          // in sub-blocks of kDiagRows rows, each over only the keys up to
          // the last one its rows see: at S512 (128-key blocks) the diagonal
          // tile computed 128 x 128 scores for 8256 visible (PERF_NOTES
          // "issue 21 v6"). Sub-block boundaries follow the shape only.
          const int64_t row0 = dsum_index(c, si, h, i0);
          const int step = tile_inside(rr, j0, nt) ? m : kDiagRows;
          for (int r0 = 0; r0 < m; r0 += step) {
            const int mr = std::min(step, m - r0);
            const int mrp = int(std::min<int64_t>(round_up(mr, kLanes), mp - r0));
            RowRanges rs{w.lo + r0, w.hi + r0, mr};
            const int ns = std::min(nt, int(round_up(std::max(rs.last() - j0, 1), 2)));
            BwdScratch ws = sub_rows<TL::kPairs>(wq, r0, c.d, c.dv);
            bwd_scores<Isa, T, CT>(c, ws, rs, t.b, h, i0 + r0, j0, ns, mrp);
            const bool first = touched[row0 + r0] == 0;
            float* dq = part + (row0 + r0) * c.d;
            // dV, dK as in the two-pass backward; dQ partial += dS K (A = dS
            // pairs along keys, or read by column from dS^T).
            if constexpr (TL::kPairs) {
              grad_tile<typename Isa::Vec, BwdOut::kAllBf16>(c, ws, ns, mrp);
              add_dkdv<Isa, T, CT>(c, ws, ws.qb, ws.dob, ns, mr);
              gemm<Isa, CT>(GemmArgs{mr, c.d, (ns + 1) / 2, ws.dspair, ldq, true, w.kb, c.d, dq, c.d, !first});
            } else {
              grad_tile<typename Isa::Vec, BwdOut::kInPlace>(c, ws, ns, mrp);
              add_dkdv<Isa, T, CT>(c, ws, ws.qb, ws.dob, ns, mr);
              gemm<Isa, CT>(GemmArgs{mr, c.d, ns, ws.dp, ldq, true, w.ka, c.d, dq, c.d, !first});
            }
            if (first) std::fill(touched + row0 + r0, touched + row0 + r0 + mr, uint8_t(1));
          }
        }
      }
    }
    store_dkdv<Isa, T, CT>(c, w, si, hk, j0, owned, n);
  }
}

// One-pass backward, before it: D for one query block, and its Q / dO
// operands packed (bf16 pairs, when qo_pack is set).
template <class Vec, typename T, typename CT>
PFA_INLINE void bwd_prep_block(const Ctx& c, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int m = std::min(c.blk.q, si.len_q - t.i0);
  const T* o = static_cast<const T*>(p.o) + si.q_row(t.i0, p.o_batch_stride, p.o_row_stride) +
               int64_t(t.h) * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + si.q_row(t.i0, p.do_batch_stride, p.do_row_stride) +
                  int64_t(t.h) * p.do_head_stride;
  if constexpr (!TL::kPairs) {
    fill_dsum<T>(c, si, t.h, t.i0, m, o, dout);
  } else {
    fill_dsum_lanes<Vec>(c, si, t.h, t.i0, m, o, dout);
    if (!c.qo_pack) return;
    const T* q = static_cast<const T*>(p.q) + si.q_row(t.i0, p.q_batch_stride, p.q_row_stride) +
                 int64_t(t.h) * p.q_head_stride;
    const QoPack k = pack_parts<T, CT>(c, si, t.h, t.i0);
    pack_t<Vec, T, uint32_t>(q, p.q_row_stride, m, c.d, k.qt, c.blk.q);
    pack_t<Vec, T, uint32_t>(dout, p.do_row_stride, m, c.dv, k.dot, c.blk.q);
    TL::b_rows(q, p.q_row_stride, m, c.d, k.qb);
    TL::b_rows(dout, p.do_row_stride, m, c.dv, k.dob);
  }
}

// One-pass backward, after it: dQ = scale * (sum of the chunks' partials in
// chunk order) for one query block.
template <class Vec, typename T, bool kVec>
PFA_INLINE void bwd_reduce_block(const Ctx& c, float* acc_row, const Task& t) {
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int m = std::min(c.blk.q, si.len_q - t.i0);
  T* dq = static_cast<T*>(p.dq) + si.q_row(t.i0, p.dq_batch_stride, p.dq_row_stride) +
          int64_t(t.h) * p.dq_head_stride;
  const float scale = c.p->scale;
  float* PFA_RESTRICT acc = acc_row;  // [d]
  for (int i = 0; i < m; ++i) {
    const int64_t row = dsum_index(c, si, t.h, t.i0 + i);
    std::fill(acc, acc + c.d, 0.0f);
    for (int ch = 0; ch < c.chunks; ++ch) {
      const int64_t at = int64_t(ch) * c.part_rows + row;
      if (!c.dq_touched[at]) continue;
      const float* PFA_RESTRICT src = c.dq_part + at * c.d;
      for (int x = 0; x < c.d; ++x) acc[x] += src[x];
    }
    store_scaled_row<Vec, T, kVec>(acc, scale, c.d, dq + int64_t(i) * p.dq_row_stride);
  }
}

struct FusedBody {
  template <class Isa, typename T, typename CT>
  static PFA_INLINE void run(Kind kind, const Ctx& c, float* scratch, const Task& t) {
    if (kind == Kind::kBwdPrep) {
      bwd_prep_block<typename Isa::Vec, T, CT>(c, t);
    } else if (kind == Kind::kBwdFused) {
      Carver cv(scratch);
      bwd_fused_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
    } else {
      bwd_reduce_block<typename Isa::Vec, T, Tiles<T, CT>::kPairs>(c, scratch, t);
    }
  }
};

struct BwdBuffer;  // kept_buffer tag: dq_part and qo_pack of the one-pass backward

}  // namespace

// Key-block chunks per (sequence, kv head) for the one-pass backward, or 0
// for the two-pass one. Enough chunks that there are kMinTasks tasks (as
// choose_blocks), at most one per key block; two-pass when that would take
// more than kMaxChunks partial dQ copies (few kv heads and many key blocks)
// or more than kMaxPartBytes of them.
int fused_chunks(const AttentionFwdParams& p, const Blocks& blk) {
  const int64_t kMinTasks = min_tasks_bwd(p);
  constexpr int64_t kMaxChunks = 8, kMaxPartBytes = int64_t(512) << 20;
  const bool varlen = p.cu_seqlens_q != nullptr;
  int64_t max_keys = p.seqlen_k;
  if (varlen) {
    max_keys = 0;
    for (int b = 0; b < p.batch; ++b)
      max_keys = std::max<int64_t>(max_keys, p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]);
  }
  const int64_t nkb = std::max<int64_t>(1, (max_keys + blk.k - 1) / blk.k);
  const int64_t kv_heads = int64_t(p.batch) * p.num_heads_k;
  const int64_t chunks = std::min(nkb, (kMinTasks + kv_heads - 1) / kv_heads);
  const int64_t rows =
      (varlen ? int64_t(p.cu_seqlens_q[p.batch]) : int64_t(p.batch) * p.seqlen_q) * p.num_heads;
  if (chunks > kMaxChunks || chunks * rows * p.head_dim * int64_t(sizeof(float)) > kMaxPartBytes) return 0;
  return int(chunks);
}

// The one-pass backward: D (query-block tasks), the fused tasks, then the
// dQ reduction (query-block tasks again).
void fused_bwd(Ctx& c, int64_t rows, const std::vector<Task>& qtasks, const std::vector<int64_t>& qcost) {
  const AttentionBwdParams& p = *c.pb;
  c.part_rows = rows;
  const int64_t part_floats = int64_t(c.chunks) * rows * p.head_dim;
  std::vector<uint8_t> touched(size_t(c.chunks) * size_t(rows), 0);
  c.dq_touched = touched.data();
  // Q / dO operands packed once per query block (see Ctx::qo_pack), for the
  // bf16 dot-product path only: fp32 operands are twice the size and their
  // conversions cheap, and reading them from the pack instead of rebuilding
  // them in the L1-resident scratch was slower (fp32 causal S512, 2 threads:
  // 2.52-2.72 -> 2.95-3.2 ms; PERF_NOTES.md).
  constexpr int64_t kMaxPackBytes = int64_t(512) << 20;
  std::vector<int64_t> first(size_t(p.batch) + 1, 0);
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    first[size_t(b) + 1] = first[size_t(b)] + (si.len_q + c.blk.q - 1) / c.blk.q;
  }
  const bool pairs = cpu_path(p.dtype) == CpuPath::kAvx512Bf16;
  c.pack_floats = pairs ? pack_floats<c10::BFloat16, uint32_t>(c) : 0;
  int64_t pack_total = first[size_t(p.batch)] * p.num_heads * c.pack_floats;
  if (pack_total * int64_t(sizeof(float)) > kMaxPackBytes) pack_total = 0;
  std::unique_ptr<float[]> temp;
  c.dq_part = kept_buffer<BwdBuffer>(part_floats + pack_total, temp);
  c.qo_pack = pack_total > 0 ? c.dq_part + part_floats : nullptr;
  c.pack_first = first.data();
  const BlockFn fn = block_fn<FusedBody>(p.dtype);
  run_tasks(c, fn, Kind::kBwdPrep, 0, qtasks, qcost);
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    const int owned = owned_keys(p, si);
    const int nkb = (owned + c.blk.k - 1) / c.blk.k;
    const int per = (nkb + c.chunks - 1) / c.chunks;
    for (int ch = 0; ch * per < nkb; ++ch) {
      int64_t work = 1;
      for (int kb = ch * per; kb < std::min(nkb, (ch + 1) * per); ++kb) {
        const int j0 = kb * c.blk.k;
        const int n = std::max(0, std::min(std::min(c.blk.k, owned - j0), si.len_k - j0));
        work += key_block_work(c, si, j0, n);
      }
      for (int hk = 0; hk < p.num_heads_k; ++hk) {
        tasks.push_back(Task{b, hk, ch});
        cost.push_back(work);
      }
    }
  }
  Carver size(nullptr);
  carve_bwd(size, c);
  run_tasks(c, fn, Kind::kBwdFused, size.used(), tasks, cost);
  run_tasks(c, fn, Kind::kBwdReduce, c.d, qtasks, qcost);  // c.d: bwd_reduce_block's row accumulator
}

}  // namespace cpu
}  // namespace pyfastattn
