// CPU attention backward, two-pass form, and the backward's entry point
// (attention_bwd.h describes both forms).
//   pass 1 (bwd_dq_block):   per (sequence, query head, query block): D and
//                            dQ = scale * sum over key tiles of dS K;
//   pass 2 (bwd_dkdv_block): per (sequence, kv head, key block): dK and dV,
//                            summed over the GQA group's query heads and the
//                            query rows that see the block.
#include <algorithm>
#include <vector>

#include "attention_bwd.h"
#include "attention_cpu.h"
#include "attention_schedule.h"
#include "attention_tile.h"

namespace pyfastattn {
namespace cpu {
namespace {

// Pass 1: D for the block's rows, then dQ = scale * sum_j dS K.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_dq_block(const Ctx& c, const BwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int h = t.h, hk = h / c.group, i0 = t.i0;
  const int m = std::min(c.blk.q, si.len_q - i0);
  const int mp = int(round_up(m, kLanes));
  const int64_t ldq = c.blk.q;

  const T* q = static_cast<const T*>(p.q) + si.q_row(i0, p.q_batch_stride, p.q_row_stride) +
               int64_t(h) * p.q_head_stride;
  const T* o = static_cast<const T*>(p.o) + si.q_row(i0, p.o_batch_stride, p.o_row_stride) +
               int64_t(h) * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + si.q_row(i0, p.do_batch_stride, p.do_row_stride) +
                  int64_t(h) * p.do_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + si.k_row(0, p.k_batch_stride, p.k_row_stride) +
                   int64_t(hk) * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + si.k_row(0, p.v_batch_stride, p.v_row_stride) +
                   int64_t(hk) * p.v_head_stride;

  if constexpr (TL::kPairs) {
    fill_dsum_lanes<typename Isa::Vec>(c, si, h, i0, m, o, dout);
  } else {
    fill_dsum<T>(c, si, h, i0, m, o, dout);
  }

  RowRanges rr{w.lo, w.hi, m};
  fill_ranges(p, si, i0, rr);
  const bool any = load_row_stats(c, w, si, h, i0, m, mp);
  std::fill(w.acc1, w.acc1 + int64_t(m) * c.d, 0.0f);
  const int key_begin = rr.first(), key_end = any ? rr.last() : rr.first();
  if (key_begin < key_end) {
    pack_t<typename Isa::Vec, T, CT>(q, p.q_row_stride, m, c.d, w.qt, ldq);
    pack_t<typename Isa::Vec, T, CT>(dout, p.do_row_stride, m, c.dv, w.dot, ldq);
  }
  for (int j0 = key_begin; j0 < key_end; j0 += c.blk.k) {
    const int n = std::min(c.blk.k, key_end - j0);
    const T* krows = kbase + int64_t(j0) * p.k_row_stride;
    TL::a_rows(krows, p.k_row_stride, n, c.d, w.ka);
    TL::a_rows(vbase + int64_t(j0) * p.v_row_stride, p.v_row_stride, n, c.dv, w.va);
    bwd_scores<Isa, T, CT>(c, w, rr, t.b, h, i0, j0, n, mp);
    // dQ += dS K (A = dS read by column from dS^T, or bf16 pairs along keys).
    if constexpr (TL::kPairs) {
      grad_tile<typename Isa::Vec, BwdOut::kDsPairs>(c, w, n, mp);
      TL::b_rows(krows, p.k_row_stride, n, c.d, w.kb);
      gemm<Isa, CT>(GemmArgs{m, c.d, (n + 1) / 2, w.dsout, ldq, true, w.kb, c.d, w.acc1, c.d, true});
    } else {
      grad_tile<typename Isa::Vec, BwdOut::kInPlace>(c, w, n, mp);
      gemm<Isa, CT>(GemmArgs{m, c.d, n, w.dp, ldq, true, w.ka, c.d, w.acc1, c.d, true});
    }
  }

  T* dq = static_cast<T*>(p.dq) + si.q_row(i0, p.dq_batch_stride, p.dq_row_stride) +
          int64_t(h) * p.dq_head_stride;
  const float scale = c.p->scale;
  for (int i = 0; i < m; ++i)
    store_scaled_row<typename Isa::Vec, T, TL::kPairs>(w.acc1 + int64_t(i) * c.d, scale, c.d,
                                                       dq + int64_t(i) * p.dq_row_stride);
}

// Pass 2: dK and dV of one key block, summed over the query heads of the
// kv head's group and all query rows that see the block.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_dkdv_block(const Ctx& c, const BwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int hk = t.h, j0 = t.i0;
  const int owned = std::min(c.blk.k, owned_keys(p, si) - j0);
  const int n = std::max(0, std::min(owned, si.len_k - j0));
  const int64_t ldq = c.blk.q;

  std::fill(w.acc1, w.acc1 + int64_t(n) * c.d, 0.0f);
  std::fill(w.acc2, w.acc2 + int64_t(n) * c.dv, 0.0f);
  const T* krows = static_cast<const T*>(p.k) + si.k_row(j0, p.k_batch_stride, p.k_row_stride) +
                   int64_t(hk) * p.k_head_stride;
  const T* vrows = static_cast<const T*>(p.v) + si.k_row(j0, p.v_batch_stride, p.v_row_stride) +
                   int64_t(hk) * p.v_head_stride;
  if (n > 0) {
    TL::a_rows(krows, p.k_row_stride, n, c.d, w.ka);
    TL::a_rows(vrows, p.v_row_stride, n, c.dv, w.va);
    const int row_begin = first_row_reaching(p, si, j0);
    const int row_end = end_row_starting_by(p, si, j0 + n - 1);
    for (int h = hk * c.group; h < (hk + 1) * c.group; ++h) {
      const T* qh = static_cast<const T*>(p.q) + si.q_row(0, p.q_batch_stride, p.q_row_stride) +
                    int64_t(h) * p.q_head_stride;
      const T* doh = static_cast<const T*>(p.dout) + si.q_row(0, p.do_batch_stride, p.do_row_stride) +
                     int64_t(h) * p.do_head_stride;
      for (int i0 = row_begin; i0 < row_end; i0 += c.blk.q) {
        const int m = std::min(c.blk.q, row_end - i0);
        const int mp = int(round_up(m, kLanes));
        if (!load_row_stats(c, w, si, h, i0, m, mp)) continue;
        RowRanges rr{w.lo, w.hi, m};
        fill_ranges(p, si, i0, rr);
        const T* q = qh + int64_t(i0) * p.q_row_stride;
        const T* dout = doh + int64_t(i0) * p.do_row_stride;
        pack_t<typename Isa::Vec, T, CT>(q, p.q_row_stride, m, c.d, w.qt, ldq);
        pack_t<typename Isa::Vec, T, CT>(dout, p.do_row_stride, m, c.dv, w.dot, ldq);
        bwd_scores<Isa, T, CT>(c, w, rr, t.b, h, i0, j0, n, mp);
        // dV += P^T dO, dK += dS^T Q (K axis = query rows).
        TL::b_rows(dout, p.do_row_stride, m, c.dv, w.dob);
        TL::b_rows(q, p.q_row_stride, m, c.d, w.qb);
        if constexpr (TL::kPairs) {
          grad_tile<typename Isa::Vec, BwdOut::kRowsBf16>(c, w, n, mp);
        } else {
          grad_tile<typename Isa::Vec, BwdOut::kInPlace>(c, w, n, mp);
        }
        add_dkdv<Isa, T, CT>(c, w, w.qb, w.dob, n, m);
      }
    }
  }

  store_dkdv<Isa, T, CT>(c, w, si, hk, j0, owned, n);
}

struct TwoPassBody {
  template <class Isa, typename T, typename CT>
  static PFA_INLINE void run(Kind kind, const Ctx& c, float* scratch, const Task& t) {
    Carver cv(scratch);
    if (kind == Kind::kBwdDq) {
      bwd_dq_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
    } else {
      bwd_dkdv_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
    }
  }
};

}  // namespace

void attention_bwd(const AttentionBwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0) return;
  Ctx c = make_ctx(p, true);
  c.pb = &p;
  c.chunks = fused_chunks(p, c.blk);
  // D = rowsum(dO * O) per (sequence, head, row), filled by pass 1.
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows =
      varlen ? int64_t(p.cu_seqlens_q[p.batch]) * p.num_heads : int64_t(p.batch) * p.num_heads * p.seqlen_q;
  std::vector<float> dsum(size_t(std::max<int64_t>(rows, 1)));
  c.dsum = dsum.data();

  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  query_tasks(c, tasks, cost);
  if (c.chunks > 0) {
    fused_bwd(c, rows, tasks, cost);
    return;
  }
  const BlockFn fn = block_fn<TwoPassBody>(p.dtype);
  Carver size(nullptr);
  carve_bwd(size, c);
  run_tasks(c, fn, Kind::kBwdDq, size.used(), tasks, cost);

  // Pass 2: key blocks of every (sequence, kv head), including key rows past
  // len_k, which are zero-filled.
  tasks.clear();
  cost.clear();
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    const int owned = owned_keys(p, si);
    for (int j0 = 0; j0 < owned; j0 += c.blk.k) {
      const int n = std::max(0, std::min(std::min(c.blk.k, owned - j0), si.len_k - j0));
      const int64_t work = 1 + key_block_work(c, si, j0, n);
      for (int hk = 0; hk < p.num_heads_k; ++hk) {
        tasks.push_back(Task{b, hk, j0});
        cost.push_back(work);
      }
    }
  }
  run_tasks(c, fn, Kind::kBwdDkDv, size.used(), tasks, cost);
}

}  // namespace cpu
}  // namespace pyfastattn
