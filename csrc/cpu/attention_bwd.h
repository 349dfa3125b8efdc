// CPU attention backward: the steps both of its forms share.
//
// Two-pass (attention_bwd.cpp): pass 1, per (sequence, query head, query
// block): D = rowsum(dO O) and dQ; pass 2, per (sequence, kv head, key
// block): dK and dV, looping over the query heads of the GQA group and the
// query rows whose window reaches the block. Every output element has one
// owner task, and block sizes depend on the shape only, so results are
// bit-identical for any thread count. The price is 7 tile products per (query
// block, key tile) instead of FlashAttention's 5 (S and dP are computed in
// both passes), with no atomics and no O(seqlen^2) or per-thread dQ buffers.
//
// One-pass (attention_bwd_fused.cpp), where the shape allows (fused_chunks):
// per (sequence, kv head, chunk of key blocks), 5 products per tile, dQ summed
// per chunk in fp32 and the chunks added in a fixed order: still
// deterministic.
//
// On one Zen 5 core (B1 H8 S1024 D64, GFLOP/s from CPU time): 144 fp32 / 266
// bf16 against 89 / 151 for PyTorch's flash SDPA.
#pragma once

#include <cstring>
#include <vector>

#include "attention_dropout.h"
#include "attention_tile.h"

namespace pyfastattn {
namespace cpu {

// Offset of row i of (sequence, head) in a [b, hq, sq] / [hq, total_q] float
// array with row stride 1; used for the backward D buffer.
PFA_INLINE int64_t dsum_index(const Ctx& c, const SeqInfo& si, int h, int i) {
  const AttentionFwdParams& p = *c.p;
  const int64_t total_q = si.varlen ? p.cu_seqlens_q[p.batch] : 0;
  return si.varlen ? int64_t(h) * total_q + si.q_start + i
                   : (int64_t(si.bi) * p.num_heads + h) * p.seqlen_q + i;
}

struct BwdScratch {
  float* qt;     // B operand Q^T  [kdim(d)][blk.q]
  float* dot;    // B operand dO^T [kdim(dv)][blk.q]
  float* qb;     // B operand Q rows  (pass 2): [blk.q][d] or VNNI [blk.q / 2][d]
  float* dob;    // B operand dO rows (pass 2): [blk.q][dv] or VNNI
  float* s;      // S^T -> P^T [blk.k][blk.q]
  float* dp;     // dP^T -> dS^T [blk.k][blk.q]
  float* pout;   // bf16: P^T rows (pass 2)
  float* dsout;  // bf16: dS pairs along keys (pass 1) or dS^T rows (pass 2)
  float* dspair; // bf16, one-pass backward: dS pairs along keys [blk.k / 2][blk.q]
  float* ka;     // A operand key rows   [blk.k][kdim(d)]
  float* va;     // A operand value rows [blk.k][kdim(dv)]
  float* kb;     // B operand key rows, VNNI (pass 1, bf16)
  float* bias;   // attn_mask tile [blk.k][blk.q]
  float* dtanh;  // softcap: 1 - tanh^2 [blk.k][blk.q]
  float* acc1;   // dQ acc [blk.q][d] (pass 1) or dK acc [blk.k][d] (pass 2)
  float* acc2;   // dV acc [blk.k][dv] (pass 2)
  float* lse2;   // lse in log2 units, +inf for empty rows [blk.q]
  float* dsum;   // D [blk.q]
  int* lo;
  int* hi;
  uint32_t* keep;  // dropout keep masks [blk.k][blk.q] (attention_dropout.h)
};

PFA_INLINE BwdScratch carve_bwd(Carver& cv, const Ctx& c) {
  const int64_t bq = c.blk.q, bk = c.blk.k;
  const int64_t d = c.d, dv = c.dv;
  BwdScratch w;
  const bool packed = c.qo_pack != nullptr;  // one-pass: Q / dO operands in qo_pack
  w.qt = cv.take(packed ? 0 : d * bq);
  w.dot = cv.take(packed ? 0 : dv * bq);
  w.qb = cv.take(packed ? 0 : bq * d);
  w.dob = cv.take(packed ? 0 : bq * dv);
  w.s = cv.take(bk * bq);
  w.dp = cv.take(bk * bq);
  w.pout = cv.take(bk * bq / 2);
  w.dsout = cv.take(bk * bq / 2 + bq);
  w.dspair = cv.take(c.chunks > 0 ? bk * bq / 2 + bq : 0);
  w.ka = cv.take(bk * d);
  w.va = cv.take(bk * dv);
  w.kb = cv.take(bk * d);
  w.bias = cv.take(c.p->mask_kind != MaskKind::kNone ? bk * bq : 0);
  w.dtanh = cv.take(c.softcap ? bk * bq : 0);
  w.acc1 = cv.take(std::max(bq, bk) * d);
  w.acc2 = cv.take(bk * dv);
  w.lse2 = cv.take(bq);
  w.dsum = cv.take(bq);
  w.lo = reinterpret_cast<int*>(cv.take(bq));
  w.hi = reinterpret_cast<int*>(cv.take(bq));
  w.keep = reinterpret_cast<uint32_t*>(cv.take(c.dropout ? bk * bq : 0));
  return w;
}

// Where P and dS of a backward tile go.
enum class BwdOut {
  kInPlace,   // fp32: P^T into S^T, dS^T into dP^T
  kDsPairs,   // bf16 pass 1: dS as pairs along keys, [j / 2][i]
  kRowsBf16,  // bf16 pass 2: P^T and dS^T as bf16 rows, [j][i]
  kAllBf16,   // bf16 one pass: kRowsBf16's rows and kDsPairs's pairs (dspair)
};

// P = exp2(S - lse2) and dS = P (dP - D) [* (1 - tanh^2)] over a tile, lanes
// outside like exp_tile. lse2 is +inf for empty rows, so P = 0 there. The
// softmax scale is applied to dQ and dK at the end.
// Dropout, with keep (the tile's masks, keep[j * ld + i]) and Z = keep /
// (1 - p): dS = P (Z dP - D), and the P rows that feed dV are zero where
// dropped (dV's 1 / (1 - p) is applied in store_dkdv). Applied here, on the
// values in registers, rather than in passes of their own over the stored
// tiles (PERF_NOTES.md, dropout v3).
// kDrop is a template flag, not a test of keep per vector: the per-vector
// test cost the bf16 no-dropout backward 3-4% (PERF_NOTES.md, dropout v4).
template <class Vec, BwdOut kOut, bool kSoftcap, bool kDrop>
PFA_INLINE void grad_tile(float* s, float* dp, const float* dtanh, int64_t ld, int n, int mp,
                          const float* lse2, const float* dsum, uint16_t* pout, uint32_t* dsout,
                          uint32_t* dspair, const uint32_t* keep, float rescale) {
  using V = typename Vec::V;
  const V rs = Vec::set1(rescale);
  // Z dP, and the P for dV, at tile offset `at`.
  auto dpz = [&](int64_t at) {
    const V x = Vec::load(dp + at);
    if constexpr (kDrop) return Vec::keep(Vec::mul(x, rs), keep + at);
    return x;
  };
  auto kept = [&](V e, int64_t at) {
    if constexpr (kDrop) return Vec::keep(e, keep + at);
    return e;
  };
  // P = exp2(S - lse2): degree 3 where P and dS are rounded to bf16 next
  // (every output but kInPlace's fp32 P^T and dS^T); PERF_NOTES "bf16
  // backward, session 5".
  auto expd = [&](V x) {
    if constexpr (kOut == BwdOut::kInPlace) {
      return Vec::exp2(x);
    } else {
      return Vec::exp2_bf16(x);
    }
  };
  if constexpr (kOut == BwdOut::kAllBf16) {
    // Row pairs outer, lanes inner: the tile in address order, so that each
    // line of the bf16 rows (pout, dsout) is written whole while in L1 (lanes
    // outer wrote half a line per pass down 2 x n rows, ~56 KiB at 256 keys,
    // more than L1: every line was fetched twice). PERF_NOTES "bf16 backward,
    // session 5".
    uint16_t* dsrows = reinterpret_cast<uint16_t*>(dsout);
    for (int j = 0; j < n; j += 2) {
      const bool two = j + 1 < n;
      for (int c0 = 0; c0 < mp; c0 += kLanes) {
        const V l = Vec::load(lse2 + c0);
        const V dd = Vec::load(dsum + c0);
        const int64_t at0 = j * ld + c0;
        const V e0 = expd(Vec::sub(Vec::load(s + at0), l));
        V g0 = Vec::mul(e0, Vec::sub(dpz(at0), dd));
        if constexpr (kSoftcap) g0 = Vec::mul(g0, Vec::load(dtanh + at0));
        Vec::store_bf16(pout + at0, kept(e0, at0));
        Vec::store_bf16(dsrows + at0, g0);
        V g1 = Vec::zero();
        if (two) {
          const int64_t at = at0 + ld;
          const V e1 = expd(Vec::sub(Vec::load(s + at), l));
          g1 = Vec::mul(e1, Vec::sub(dpz(at), dd));
          if constexpr (kSoftcap) g1 = Vec::mul(g1, Vec::load(dtanh + at));
          Vec::store_bf16(pout + at, kept(e1, at));
          Vec::store_bf16(dsrows + at, g1);
        }
        Vec::store_pairs(dspair + (j / 2) * ld + c0, g0, g1);
      }
    }
    return;
  }
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    const V l = Vec::load(lse2 + c0);
    const V dd = Vec::load(dsum + c0);
    if constexpr (kOut == BwdOut::kDsPairs) {
      for (int j = 0; j < n; j += 2) {
        const int64_t at0 = j * ld + c0;
        V e = expd(Vec::sub(Vec::load(s + at0), l));
        V g0 = Vec::mul(e, Vec::sub(dpz(at0), dd));
        if constexpr (kSoftcap) g0 = Vec::mul(g0, Vec::load(dtanh + at0));
        V g1 = Vec::zero();
        if (j + 1 < n) {
          const int64_t at = (j + 1) * ld + c0;
          e = expd(Vec::sub(Vec::load(s + at), l));
          g1 = Vec::mul(e, Vec::sub(dpz(at), dd));
          if constexpr (kSoftcap) g1 = Vec::mul(g1, Vec::load(dtanh + at));
        }
        Vec::store_pairs(dsout + (j / 2) * ld + c0, g0, g1);
      }
    } else {
      for (int j = 0; j < n; ++j) {
        const int64_t at = j * ld + c0;
        const V e = expd(Vec::sub(Vec::load(s + at), l));
        V g = Vec::mul(e, Vec::sub(dpz(at), dd));
        if constexpr (kSoftcap) g = Vec::mul(g, Vec::load(dtanh + at));
        if constexpr (kOut == BwdOut::kInPlace) {
          Vec::store(s + at, kept(e, at));
          Vec::store(dp + at, g);
        } else {
          Vec::store_bf16(pout + at, kept(e, at));
          Vec::store_bf16(reinterpret_cast<uint16_t*>(dsout) + at, g);
        }
      }
    }
  }
}

template <class Vec, BwdOut kOut>
PFA_INLINE void grad_tile(const Ctx& c, const BwdScratch& w, int n, int mp) {
  const int64_t ld = c.blk.q;
  uint16_t* pout = reinterpret_cast<uint16_t*>(w.pout);
  uint32_t* dsout = reinterpret_cast<uint32_t*>(w.dsout);
  uint32_t* dspair = reinterpret_cast<uint32_t*>(w.dspair);
  const float r = c.dropout_rescale;
  if (c.softcap && c.dropout) {
    grad_tile<Vec, kOut, true, true>(w.s, w.dp, w.dtanh, ld, n, mp, w.lse2, w.dsum, pout, dsout, dspair, w.keep, r);
  } else if (c.softcap) {
    grad_tile<Vec, kOut, true, false>(w.s, w.dp, w.dtanh, ld, n, mp, w.lse2, w.dsum, pout, dsout, dspair, nullptr, r);
  } else if (c.dropout) {
    grad_tile<Vec, kOut, false, true>(w.s, w.dp, nullptr, ld, n, mp, w.lse2, w.dsum, pout, dsout, dspair, w.keep, r);
  } else {
    grad_tile<Vec, kOut, false, false>(w.s, w.dp, nullptr, ld, n, mp, w.lse2, w.dsum, pout, dsout, dspair, nullptr, r);
  }
}

// S^T and dP^T of a tile: S^T = K Q^T (scaled in the product's epilogue when
// nothing else applies, else by score_tile), dP^T = V dO^T.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_scores(const Ctx& c, const BwdScratch& w, const RowRanges& rr, int bi, int h, int i0,
                           int j0, int n, int mp) {
  using TL = Tiles<T, CT>;
  const AttentionFwdParams& p = *c.p;
  const int64_t ldq = c.blk.q;
  const int kd = TL::kdim(c.d), kdv = TL::kdim(c.dv);
  const bool masked = p.mask_kind != MaskKind::kNone || c.alibi;
  const bool fused = !masked && !c.softcap && tile_inside(rr, j0, n);
  GemmArgs qk{n, rr.m, kd, w.ka, kd, false, w.qt, ldq, w.s, ldq, false};
  if (fused) qk.alpha = c.score_scale;
  gemm<Isa, CT>(qk);
  gemm<Isa, CT>(GemmArgs{n, rr.m, kdv, w.va, kdv, false, w.dot, ldq, w.dp, ldq, false});
  if (!fused) {
    const MaskTile mask = load_mask_tile<typename Isa::Vec, T>(p, bi, h, i0, rr.m, j0, n, w.bias, ldq);
    score_tile(c, rr, j0, n, mp, w.s, ldq, mask, w.dtanh, nullptr);
  }
  // Dropout: the tile's keep masks, which grad_tile applies to dP and to the
  // P^T that feeds dV.
  if (c.dropout) fill_keep_tile<Isa::kAvx512>(c, bi, h, i0, rr, mp, j0, n, w.keep, ldq);
}

// Per-row inputs of a query block: lse in log2 units (+inf when the row is
// empty, so P = exp2(-inf or finite - inf) = 0) and D. Returns whether any
// row has a visible key.
PFA_INLINE bool load_row_stats(const Ctx& c, const BwdScratch& w, const SeqInfo& si, int h, int i0, int m,
                               int mp) {
  const AttentionFwdParams& p = *c.p;
  bool any = false;
  for (int i = 0; i < mp; ++i) {
    if (i < m) {
      const float l = p.lse[si.lse_index(p, h, i0 + i)];
      const bool empty = l == -kInf;
      any = any || !empty;
      w.lse2[i] = empty ? kInf : l * kLog2e;
      w.dsum[i] = c.dsum[dsum_index(c, si, h, i0 + i)];
    } else {
      w.lse2[i] = kInf;
      w.dsum[i] = 0.0f;
    }
  }
  return any;
}

// D = rowsum(dO * O) for rows i0 .. i0 + m - 1 of (sequence, head h). With
// fp32 products each row is summed in order x = 0, 1, ..., the K order of the
// dP product, so that dP - D is exactly 0 where P is one-hot.
template <typename T>
PFA_INLINE void fill_dsum(const Ctx& c, const SeqInfo& si, int h, int i0, int m, const T* o, const T* dout) {
  const AttentionBwdParams& p = *c.pb;
  for (int i = 0; i < m; ++i) {
    const T* PFA_RESTRICT orow = o + int64_t(i) * p.o_row_stride;
    const T* PFA_RESTRICT grow = dout + int64_t(i) * p.do_row_stride;
    float acc = 0.0f;
    for (int x = 0; x < c.dv; ++x) acc += to_f32(orow[x]) * to_f32(grow[x]);
    c.dsum[dsum_index(c, si, h, i0 + i)] = acc;
  }
}

// The same for bf16 rows on the dot-product path (vdpbf16ps adds pairs in its
// own order anyway): kLanes partial sums, lane l of x = l, l + 16, ..., added
// by halves at the end. Written with Vec: the compiler's vectorisation of the
// scalar form came and went with the code around it, and as scalar code (a
// lane array on the stack) it was a third of the task code outside the
// products of the bf16 S256 backward (PERF_NOTES "bf16 backward, session 5").
template <class Vec>
PFA_INLINE void fill_dsum_lanes(const Ctx& c, const SeqInfo& si, int h, int i0, int m, const c10::BFloat16* o,
                                const c10::BFloat16* dout) {
  using V = typename Vec::V;
  const AttentionBwdParams& p = *c.pb;
  const int dv = c.dv, full = dv / kLanes * kLanes;
  alignas(64) uint16_t tail_o[kLanes] = {}, tail_g[kLanes] = {};
  for (int i = 0; i < m; ++i) {
    const uint16_t* orow = reinterpret_cast<const uint16_t*>(o + int64_t(i) * p.o_row_stride);
    const uint16_t* grow = reinterpret_cast<const uint16_t*>(dout + int64_t(i) * p.do_row_stride);
    V acc = Vec::zero();
    for (int x = 0; x < full; x += kLanes)
      acc = Vec::add(acc, Vec::mul(Vec::load_bf16(orow + x), Vec::load_bf16(grow + x)));
    if (full < dv) {
      std::memcpy(tail_o, orow + full, size_t(dv - full) * sizeof(uint16_t));
      std::memcpy(tail_g, grow + full, size_t(dv - full) * sizeof(uint16_t));
      acc = Vec::add(acc, Vec::mul(Vec::load_bf16(tail_o), Vec::load_bf16(tail_g)));
    }
    c.dsum[dsum_index(c, si, h, i0 + i)] = Vec::sum_halves(acc);
  }
}

// First query row whose visible keys reach key j (hi > j), and one past the
// last row whose visible keys start at or before key j_last (lo <= j_last).
PFA_INLINE int first_row_reaching(const AttentionFwdParams& p, const SeqInfo& si, int j) {
  int lo = 0, hi = si.len_q;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (si.key_hi(p, mid) > j) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}
PFA_INLINE int end_row_starting_by(const AttentionFwdParams& p, const SeqInfo& si, int j_last) {
  int lo = 0, hi = si.len_q;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (si.key_lo(p, mid) <= j_last) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Number of key rows sequence `bi` owns in k/v (and dk/dv): all of them get
// written, the ones past len_k (seqused_k) with zeros.
PFA_INLINE int owned_keys(const AttentionFwdParams& p, const SeqInfo& si) {
  return si.varlen ? p.cu_seqlens_k[si.bi + 1] - p.cu_seqlens_k[si.bi] : p.seqlen_k;
}

// out[x] = src[x] * scale as T for x < cols. kVec (bf16 on the dot-product
// path): 16 at a time by Vec::store_bf16 (vcvtneps2bf16: round to nearest
// even, as from_f32, but denormals flushed to zero); the scalar from_f32 with
// its NaN select was ~14% of the task code outside the products of the bf16
// S256 backward (PERF_NOTES "bf16 backward, session 5").
template <class Vec, typename T, bool kVec>
PFA_INLINE void store_scaled_row(const float* PFA_RESTRICT src, float scale, int cols, T* PFA_RESTRICT out) {
  int x = 0;
  if constexpr (kVec) {
    const typename Vec::V s = Vec::set1(scale);
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    for (; x + kLanes <= cols; x += kLanes) Vec::store_bf16(o + x, Vec::mul(Vec::load(src + x), s));
  }
  for (; x < cols; ++x) out[x] = from_f32<T>(src[x] * scale);
}

// dK = scale * acc1 and dV = acc2 for key rows j0 .. j0 + owned - 1 of kv
// head hk; rows from n on (past len_k) get zeros.
template <class Isa, typename T, typename CT>
PFA_INLINE void store_dkdv(const Ctx& c, const BwdScratch& w, const SeqInfo& si, int hk, int j0, int owned,
                           int n) {
  constexpr bool kVec = Tiles<T, CT>::kPairs;
  using Vec = typename Isa::Vec;
  const AttentionBwdParams& p = *c.pb;
  T* dk = static_cast<T*>(p.dk) + si.k_row(j0, p.dk_batch_stride, p.dk_row_stride) +
          int64_t(hk) * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + si.k_row(j0, p.dv_batch_stride, p.dv_row_stride) +
          int64_t(hk) * p.dv_head_stride;
  const float scale = c.p->scale, vscale = c.dropout_rescale;
  for (int j = 0; j < owned; ++j) {
    T* PFA_RESTRICT krow = dk + int64_t(j) * p.dk_row_stride;
    T* PFA_RESTRICT vrow = dv + int64_t(j) * p.dv_row_stride;
    if (j < n) {
      store_scaled_row<Vec, T, kVec>(w.acc1 + int64_t(j) * c.d, scale, c.d, krow);
      store_scaled_row<Vec, T, kVec>(w.acc2 + int64_t(j) * c.dv, vscale, c.dv, vrow);
    } else {
      for (int x = 0; x < c.d; ++x) krow[x] = from_f32<T>(0.0f);
      for (int x = 0; x < c.dv; ++x) vrow[x] = from_f32<T>(0.0f);
    }
  }
}

// dV += P^T dO and dK += dS^T Q for one (query block, key tile), K axis =
// query rows, after grad_tile wrote P and dS: fp32 in place (S^T, dP^T) or,
// bf16, as rows of P^T / dS^T (pout, dsout), which are pairs along the query
// axis; lanes past m hold P = dS = 0, which pads an odd m. qb, dob: Q and dO
// rows as B operands.
template <class Isa, typename T, typename CT>
PFA_INLINE void add_dkdv(const Ctx& c, const BwdScratch& w, const float* qb, const float* dob, int n, int m) {
  const int64_t ldq = c.blk.q;
  if constexpr (Tiles<T, CT>::kPairs) {
    const int m2 = (m + 1) / 2;
    if (m & 1) {
      // The pad lane of the last pair must be 0, not a stale value.
      for (int j = 0; j < n; ++j) {
        reinterpret_cast<uint16_t*>(w.pout)[j * ldq + m] = 0;
        reinterpret_cast<uint16_t*>(w.dsout)[j * ldq + m] = 0;
      }
    }
    gemm<Isa, CT>(GemmArgs{n, c.dv, m2, w.pout, ldq / 2, false, dob, c.dv, w.acc2, c.dv, true});
    gemm<Isa, CT>(GemmArgs{n, c.d, m2, w.dsout, ldq / 2, false, qb, c.d, w.acc1, c.d, true});
  } else {
    gemm<Isa, CT>(GemmArgs{n, c.dv, m, w.s, ldq, false, dob, c.dv, w.acc2, c.dv, true});
    gemm<Isa, CT>(GemmArgs{n, c.d, m, w.dp, ldq, false, qb, c.d, w.acc1, c.d, true});
  }
}

// Estimated work of the key block [j0, j0 + n) of sequence si, for the task
// costs the scheduler sorts by: the query rows that see it, times its keys,
// for every query head of the group.
PFA_INLINE int64_t key_block_work(const Ctx& c, const SeqInfo& si, int j0, int n) {
  if (n <= 0) return 0;
  const int rows_seen =
      std::max(0, end_row_starting_by(*c.p, si, j0 + n - 1) - first_row_reaching(*c.p, si, j0));
  return int64_t(rows_seen) * n * c.group;
}

// The one-pass backward (attention_bwd_fused.cpp): the number of key-block
// chunks per (sequence, kv head), or 0 where the shape wants the two-pass one.
int fused_chunks(const AttentionFwdParams& p, const Blocks& blk);

// Runs the one-pass backward over c (c.chunks > 0, c.dsum set); qtasks and
// qcost are the query-block tasks of query_tasks; rows = every (head, query
// row) of the call.
void fused_bwd(Ctx& c, int64_t rows, const std::vector<Task>& qtasks, const std::vector<int64_t>& qcost);

}  // namespace cpu
}  // namespace pyfastattn
