// CPU attention forward: FlashAttention-2 tiling with an online softmax,
// accumulating in fp32; scores are kept in log2 units (scale * log2(e) folded
// in) so that every exponential is an exp2.
//
// One task per (sequence, query head, query block): it walks the key tiles its
// rows can see (tiles outside the window of the whole block are never
// touched; a causal diagonal is one tile whose products skip what lies past
// it, GemmArgs::diag; a window's left edge, or a diagonal under a mask or
// softcap, 32-key tiles over only the rows that see them, next_key_tile),
// keeps a running max and sum per row, and holds one key tile of scores at a
// time (S^T, see attention_tile.h). A block of one row takes the decode path
// on AVX-512 (attention_decode.h).
//
// K and V reach the products in their operand layouts (Tiles): packed once
// per call by a pass before the query blocks (kv_pack_at) when the blocks
// read each key kMinReads (6) times or more (and K and V are tensors, not a KV
// cache's rows), else copied per key tile. Either way
// each tile's V rows and the next tile's K rows are prefetched while the
// products before them run (PrefetchRows).
//
// On one Zen 5 core (B1 H8 S1024 D64, GFLOP/s from CPU time): 212 fp32 / 375
// bf16 against 93 / 90 for PyTorch's flash SDPA.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "../env_switch.h"
#include "attention_cpu.h"
#include "attention_decode.h"
#include "attention_dropout.h"
#include "attention_schedule.h"
#include "attention_tile.h"

namespace pyfastattn {
namespace cpu {
namespace {

struct FwdScratch {
  float* qt;     // B operand Q^T: [kdim(d)][blk.q]
  float* s;      // S^T / P^T: [blk.k][blk.q] fp32
  float* ppair;  // P as bf16 pairs along keys: [blk.k / 2][blk.q]
  float* ka;     // key rows: [blk.k][kdim(d)]
  float* vb;     // value rows (B operand): [blk.k][dv] or VNNI [blk.k / 2][dv]
  float* bias;   // attn_mask tile: [blk.k][blk.q]
  float* oacc;   // [blk.q][dv]
  float* mrun;   // running max (log2 units), [blk.q]
  float* lrun;   // running sum, [blk.q]
  float* tmax;   // tile column max, then the max subtracted in exp2, [blk.q]
  float* tsum;   // tile column sum, [blk.q]
  float* alpha;  // rescale of the running sum and output, [blk.q]
  int* lo;
  int* hi;
  uint32_t* keep;  // dropout keep masks [blk.k][blk.q] (attention_dropout.h)
};

PFA_INLINE FwdScratch carve_fwd(Carver& cv, const Ctx& c) {
  const int64_t bq = c.blk.q, bk = c.blk.k;
  FwdScratch w;
  w.qt = cv.take(int64_t(c.d) * bq);
  w.s = cv.take(bk * bq);
  w.ppair = cv.take(bk / 2 * bq + bq);
  w.ka = cv.take(bk * c.d);
  w.vb = cv.take(bk * c.dv);
  w.bias = cv.take(c.p->mask_kind != MaskKind::kNone ? bk * bq : 0);
  w.oacc = cv.take(bq * c.dv);
  w.mrun = cv.take(bq);
  w.lrun = cv.take(bq);
  w.tmax = cv.take(bq);
  w.tsum = cv.take(bq);
  w.alpha = cv.take(bq);
  w.lo = reinterpret_cast<int*>(cv.take(bq));
  w.hi = reinterpret_cast<int*>(cv.take(bq));
  w.keep = reinterpret_cast<uint32_t*>(cv.take(c.dropout ? bk * bq : 0));
  return w;
}

// P = exp2(S - use) over a tile, lanes outside (16 queries at a time, all
// keys inside) so that the column sums stay in a register. P goes back into
// S (fp32 product) or, with kPairs, to bf16 pairs along keys, pairs[j/2][i].
// Dropout: with keep (the tile's masks, keep[j * ld + i], attention_dropout.h)
// the stored P is zero where dropped, after the sums took it (the row sum and
// lse are taken before dropout); applied here rather than in a pass of its
// own over the stored tile (PERF_NOTES.md, dropout v3).
// kDrop: a template flag like grad_tile's (no per-vector test without dropout).
// With a causal diagonal across the tile (diag != kNoDiag, GemmArgs::diag:
// lane c sees keys j < c + diag), a group of 16 lanes stops at its last
// lane's limit plus kDiagRowsPastGroup keys: past it every lane of the group
// is -inf (P 0), and P V (with the same diag) reads no further, even for a
// block of its rows that runs into the next group (6-row blocks of the AVX2
// and portable products; up to 8 rows).
constexpr int kDiagRowsPastGroup = 7;
#if PFA_X86
static_assert(MicroF32Avx512::kMr - 1 <= kDiagRowsPastGroup && MicroBf16Avx512::kMr - 1 <= kDiagRowsPastGroup &&
                  MicroF32Avx2::kMr - 1 <= kDiagRowsPastGroup,
              "a P V row block may run this far into the next lane group");
#endif

template <class Vec, bool kPairs, bool kDrop>
PFA_INLINE void exp_tile(float* s, int64_t ld, int n_tile, int mp, const float* use, uint32_t* pairs,
                         float* tsum, const uint32_t* keep, int64_t diag = kNoDiag) {
  using V = typename Vec::V;
  auto kept = [&](V e, int64_t at) {
    if constexpr (kDrop) return Vec::keep(e, keep + at);
    return e;
  };
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    const V u = Vec::load(use + c0);
    V sum = Vec::zero();
    const int n = diag == kNoDiag ? n_tile
                                  : int(std::max<int64_t>(
                                        0, std::min<int64_t>(n_tile, c0 + kLanes - 1 + kDiagRowsPastGroup + diag)));
    if constexpr (kPairs) {
      int j = 0;
      for (; j + 1 < n; j += 2) {
        const V e0 = Vec::exp2(Vec::sub(Vec::load(s + j * ld + c0), u));
        const V e1 = Vec::exp2(Vec::sub(Vec::load(s + (j + 1) * ld + c0), u));
        sum = Vec::add(sum, Vec::add(e0, e1));
        Vec::store_pairs(pairs + (j / 2) * ld + c0, kept(e0, j * ld + c0), kept(e1, (j + 1) * ld + c0));
      }
      if (j < n) {
        const V e0 = Vec::exp2(Vec::sub(Vec::load(s + j * ld + c0), u));
        sum = Vec::add(sum, e0);
        Vec::store_pairs(pairs + (j / 2) * ld + c0, kept(e0, j * ld + c0), Vec::zero());
      }
    } else {
      for (int j = 0; j < n; ++j) {
        float* sr = s + j * ld + c0;
        const V e = Vec::exp2(Vec::sub(Vec::load(sr), u));
        sum = Vec::add(sum, e);
        Vec::store(sr, kept(e, j * ld + c0));
      }
    }
    Vec::store(tsum + c0, sum);
  }
}

// The call's K/V pack (Ctx::kv_pack): per (sequence b, kv head hk), in kv
// head order within a sequence, the keys of b (padded to a whole pair) as
// Tiles::a_rows writes K ([keys][kdim(d)]), then as Tiles::b_rows writes V
// ([keys][dv] fp32, or [keys / 2][dv] VNNI pairs). Packed once per call, so
// that the query blocks read contiguous operands instead of copying them
// per key tile: the copies waited on L3 and were re-done by every query
// block of a head (PERF_NOTES "issue 21, session 4").
struct KvPackAt {
  const float* k;
  const float* v;
};

template <typename T, typename CT>
PFA_INLINE KvPackAt kv_pack_at(const Ctx& c, int b, int hk) {
  using TL = Tiles<T, CT>;
  const int64_t pairs = c.kv_first[b + 1] - c.kv_first[b];
  const int64_t kp = 2 * int64_t(TL::kdim(c.d)), vp = TL::kPairs ? c.dv : 2 * int64_t(c.dv);  // floats per pair
  const float* blk = c.kv_pack + (c.kv_first[b] * c.p->num_heads_k + int64_t(hk) * pairs) * (kp + vp);
  return KvPackAt{blk, blk + pairs * kp};
}

// Keys per task of the packing pass.
constexpr int kPackKeys = 512;

template <typename T, typename CT>
PFA_INLINE void kv_pack_chunk(const Ctx& c, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, t.b);
  const int j0 = t.i0, n = std::min(kPackKeys, si.len_k - j0);
  const KvPackAt at = kv_pack_at<T, CT>(c, t.b, t.h);
  const T* k = static_cast<const T*>(p.k) + si.k_row(j0, p.k_batch_stride, p.k_row_stride) +
               int64_t(t.h) * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + si.k_row(j0, p.v_batch_stride, p.v_row_stride) +
               int64_t(t.h) * p.v_head_stride;
  TL::a_rows(k, p.k_row_stride, n, c.d, const_cast<float*>(at.k) + int64_t(j0) * TL::kdim(c.d));
  TL::b_rows(v, p.v_row_stride, n, c.dv, const_cast<float*>(at.v) + int64_t(TL::kPairs ? j0 / 2 : j0) * c.dv);
}

// Row pointers of keys j0 .. j0 + n - 1 of sequence b in a paged KV cache
// (base: the cache with the kv head's offset): one block-table lookup per
// block the tile crosses. Every entry was checked on the host.
template <typename T>
PFA_INLINE void paged_rows(const AttentionFwdParams& p, int b, int j0, int n, const T* base, int64_t block_stride,
                           int64_t row_stride, const T** rows) {
  const int64_t t0 = int64_t(j0) + (p.cache_leftpad ? p.cache_leftpad[b] : 0);
  const int32_t* bt = p.block_table + int64_t(b) * p.block_table_batch_stride;
  int64_t blk = t0 / p.page_block_size, r = t0 % p.page_block_size;
  for (int j = 0; j < n;) {
    const T* page = base + int64_t(bt[blk]) * block_stride;
    for (; j < n && r < p.page_block_size; ++j, ++r) rows[j] = page + r * row_stride;
    ++blk;
    r = 0;
  }
}

template <class Isa, typename T, typename CT>
PFA_INLINE void fwd_block(const Ctx& c, const FwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, t.b);
  const int h = t.h, hk = h / c.group, i0 = t.i0;
  const int m = std::min(c.blk.q, si.len_q - i0);
  const int mp = int(round_up(m, kLanes));
  const int64_t ldq = c.blk.q;
  const int kd = TL::kdim(c.d);
  // ALiBi, like a mask, sends every tile through score_tile.
  const bool masked = p.mask_kind != MaskKind::kNone || c.alibi;

  RowRanges rr{w.lo, w.hi, m};
  fill_ranges(p, si, i0, rr);
  for (int i = 0; i < mp; ++i) {
    w.mrun[i] = -kInf;
    w.lrun[i] = 0.0f;
  }
  std::fill(w.oacc, w.oacc + int64_t(m) * c.dv, 0.0f);

  const T* q = static_cast<const T*>(p.q) + si.q_row(i0, p.q_batch_stride, p.q_row_stride) +
               int64_t(h) * p.q_head_stride;
  // K / V rows: a dense or varlen tensor, or a KV cache (attention_with_kvcache's
  // many-row calls, routed here by csrc/attention/kvcache_api.cpp): its rows in
  // order from the sequence's first cache position (batch index, left padding),
  // or a paged cache's blocks, gathered a tile at a time (paged_rows).
  const bool paged = p.block_table != nullptr;
  const bool cache_rows = p.cache_batch_idx != nullptr || p.cache_leftpad != nullptr;
  const T* kbase = static_cast<const T*>(p.k) + int64_t(hk) * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + int64_t(hk) * p.v_head_stride;
  if (!paged) {
    kbase += cache_rows ? kv_row_offset(p, t.b, 0, p.k_batch_stride, p.k_row_stride)
                        : si.k_row(0, p.k_batch_stride, p.k_row_stride);
    vbase += cache_rows ? kv_row_offset(p, t.b, 0, p.v_batch_stride, p.v_row_stride)
                        : si.k_row(0, p.v_batch_stride, p.v_row_stride);
  }
  const T* rows[kMaxKeyTile];  // a paged tile's K, then V, row pointers

  const bool packed = c.kv_pack != nullptr;
  const KvPackAt kv = packed ? kv_pack_at<T, CT>(c, t.b, hk) : KvPackAt{nullptr, nullptr};
  const int64_t row_k = int64_t(kd) * sizeof(float);  // bytes of a key row in the A layout (fp32 or pairs)
  const int64_t row_v = int64_t(c.dv) * sizeof(float);  // of a B-layout row (a key, or a pair of keys)

  const int key_begin = rr.first(), key_end = rr.last();
  bool decoded = false;
#if PFA_X86
  if constexpr (Isa::kAvx512) {
    // One row sees exactly [key_begin, key_end): no window edge in any tile.
    if (m == 1 && !masked && !c.softcap && !c.dropout && !paged && c.d <= 256) {
      if (key_begin < key_end)
        decode_row<T, TL::kPairs>(c, q, kbase, vbase, key_begin, key_end, w.s, w.oacc, w.mrun[0], w.lrun[0]);
      decoded = true;
    }
  }
#endif
  if (!decoded && key_begin < key_end)
    pack_t<typename Isa::Vec, T, CT>(q, p.q_row_stride, m, c.d, w.qt, ldq);

  // Key tiles (next_key_tile): blk.k keys while every row sees them whole,
  // then kEdgeKeys-key tiles along the diagonal, each over only the rows
  // [r0, r1) that see some of its keys (rows_seeing): the rows above see none
  // of them, so their running max, sum and output stay as they are.
  for (int j0 = decoded ? key_end : key_begin, n = 0; j0 < key_end; j0 += n) {
    n = next_key_tile(rr, c.blk.k, j0, key_end);
    // But at a causal diagonal (no mask, softcap or window's left edge): one
    // tile of up to blk.k keys whose products skip what lies past the
    // diagonal (GemmArgs::diag), instead of kEdgeKeys-key tiles each with a
    // score pass and its own per-tile work: fewer products (P V stops at
    // each 8-row block's last key) and one tile's fixed work
    // (PERF_NOTES "Session 9: the causal diagonal as one tile").
    int64_t diag = kNoDiag;
    if (!masked && !c.softcap && !tile_inside(rr, j0, n)) {
      const int nd = std::min(c.blk.k, key_end - j0);
      diag = causal_tile_diag(rr, j0, nd, rows_seeing(rr, j0, nd, mp));
      if (diag != kNoDiag) n = nd;
    }
    const LaneSpan span = rows_seeing(rr, j0, n, mp);
    const int r0 = span.begin, r1 = span.end, rm = std::min(r1, m) - r0;
    if (rm <= 0) continue;
    const bool fused = !masked && !c.softcap && (diag != kNoDiag || tile_inside(rr, j0, n));
    for (int i = r0; i < r1; ++i) w.tmax[i] = -kInf;
    // S^T = K Q^T; then scores and their column max. K and V: from the
    // call's pack, or copied per tile (from a tensor's rows or a paged
    // cache's). The pack's VNNI pairs start at even keys and hold two keys
    // of the tile, but for the sequence's last key.
    const float* ka = packed ? kv.k + int64_t(j0) * kd : w.ka;
    if (!packed) {
      if (paged) {
        paged_rows(p, t.b, j0, n, kbase, p.k_batch_stride, p.k_row_stride, rows);
        TL::a_rows(rows, n, c.d, w.ka);
      } else {
        TL::a_rows(kbase + int64_t(j0) * p.k_row_stride, p.k_row_stride, n, c.d, w.ka);
      }
    }
    const bool v_packed = packed && (!TL::kPairs || (j0 % 2 == 0 && (n % 2 == 0 || j0 + n == si.len_k)));
    const float* vb = v_packed ? kv.v + int64_t(TL::kPairs ? j0 / 2 : j0) * c.dv : w.vb;
    GemmArgs qk{n, rm, kd, ka, kd, false, w.qt + r0, ldq, w.s + r0, ldq, false};
    // While S^T is computed, this tile's V rows come in; while P V is, the
    // next tile's K rows (PrefetchRows; without it the copies of the rows
    // waited on L3: PERF_NOTES "issue 21, session 4"). Not yet for a paged
    // cache's rows, gathered after the product.
    PrefetchRows pf_v;
    if (v_packed) {
      pf_v = PrefetchRows(vb, row_v, TL::kPairs ? (n + 1) / 2 : n, row_v);
    } else if (!paged) {
      pf_v = PrefetchRows(vbase + int64_t(j0) * p.v_row_stride, p.v_row_stride * int64_t(sizeof(T)), n,
                          int64_t(c.dv) * sizeof(T));
    }
    qk.prefetch = &pf_v;
    if (fused) {
      qk.alpha = c.score_scale;
      qk.col_max = w.tmax + r0;
      qk.diag = diag;
    }
    gemm<Isa, CT>(qk);
    if (!fused) {
      const MaskTile mask = load_mask_tile<typename Isa::Vec, T>(p, t.b, h, i0, m, j0, n, w.bias, ldq);
      score_tile(c, rr, j0, n, r1, w.s, ldq, mask, nullptr, w.tmax, r0);
    }
    // New running max; `use` (kept in tmax) is 0 for rows still empty, so
    // that exp2(-inf - use) = 0 instead of NaN.
    {
      float* PFA_RESTRICT mrun = w.mrun;
      float* PFA_RESTRICT tmax = w.tmax;
      float* PFA_RESTRICT alpha = w.alpha;
      for (int i = r0; i < r1; ++i) {
        const float mnew = std::max(mrun[i], tmax[i]);
        const float use = mnew == -kInf ? 0.0f : mnew;
        alpha[i] = exp2_approx(mrun[i] - use);
        mrun[i] = mnew;
        tmax[i] = use;
      }
    }
    // Dropout: the tile's keep masks, applied by exp_tile after the row sums
    // (they, and lse, are taken before it).
    uint32_t* pairs = reinterpret_cast<uint32_t*>(w.ppair);
    if (c.dropout) {
      fill_keep_tile<Isa::kAvx512>(c, t.b, h, i0, rr, mp, j0, n, w.keep, ldq);
      exp_tile<typename Isa::Vec, TL::kPairs, true>(w.s + r0, ldq, n, r1 - r0, w.tmax + r0, pairs + r0,
                                                    w.tsum + r0, w.keep + r0, diag);
    } else {
      exp_tile<typename Isa::Vec, TL::kPairs, false>(w.s + r0, ldq, n, r1 - r0, w.tmax + r0, pairs + r0,
                                                     w.tsum + r0, nullptr, diag);
    }
    for (int i = r0; i < r0 + rm; ++i) w.lrun[i] = w.lrun[i] * w.alpha[i] + w.tsum[i];
    // O = alpha O + P V
    if (!v_packed) {
      if (paged) {
        paged_rows(p, t.b, j0, n, vbase, p.v_batch_stride, p.v_row_stride, rows);
        TL::b_rows(rows, n, c.dv, w.vb);
      } else {
        TL::b_rows(vbase + int64_t(j0) * p.v_row_stride, p.v_row_stride, n, c.dv, w.vb);
      }
    }
    const int64_t pk = TL::kPairs ? (n + 1) / 2 : n;  // K axis: keys, or key pairs
    const float* pa = TL::kPairs ? w.ppair : w.s;
    GemmArgs pv{rm, c.dv, pk, pa + r0, ldq, true, vb, c.dv, w.oacc + int64_t(r0) * c.dv, c.dv, true};
    pv.row_scale = w.alpha + r0;
    pv.diag = diag;
    pv.diag_pairs = TL::kPairs;
    PrefetchRows pf_k;
    if (j0 + n < key_end && (packed || !paged)) {
      const int nn = next_key_tile(rr, c.blk.k, j0 + n, key_end);
      pf_k = packed ? PrefetchRows(kv.k + int64_t(j0 + n) * kd, row_k, nn, row_k)
                    : PrefetchRows(kbase + int64_t(j0 + n) * p.k_row_stride, p.k_row_stride * int64_t(sizeof(T)),
                                   nn, int64_t(c.d) * sizeof(T));
      pv.prefetch = &pf_k;
    }
    gemm<Isa, CT>(pv);
  }

  // O = acc / l and lse = ln(2) (max + log2 l); empty rows: O = 0, lse = -inf.
  T* o = static_cast<T*>(p.o) + si.q_row(i0, p.o_batch_stride, p.o_row_stride) + int64_t(h) * p.o_head_stride;
  for (int i = 0; i < m; ++i) {
    // A NaN sum (NaN or inf in the inputs) is not empty: it propagates.
    const bool empty = w.mrun[i] == -kInf || w.lrun[i] == 0.0f;
    const float inv = empty ? 0.0f : c.dropout_rescale / w.lrun[i];
    const float* PFA_RESTRICT acc = w.oacc + int64_t(i) * c.dv;
    T* PFA_RESTRICT orow = o + int64_t(i) * p.o_row_stride;
    for (int x = 0; x < c.dv; ++x) orow[x] = from_f32<T>(acc[x] * inv);
    p.lse[si.lse_index(p, h, i0 + i)] = empty ? -kInf : (w.mrun[i] + std::log2(w.lrun[i])) * kLn2;
  }
}

struct FwdBody {
  template <class Isa, typename T, typename CT>
  static PFA_INLINE void run(Kind kind, const Ctx& c, float* scratch, const Task& t) {
    if (kind == Kind::kFwdPack) {
      kv_pack_chunk<T, CT>(c, t);
      return;
    }
    Carver cv(scratch);
    fwd_block<Isa, T, CT>(c, carve_fwd(cv, c), t);
  }
};

struct KvPackBuffer;  // kept_buffer tag

// PYFASTATTN_CPU_KV_PACK (read once): "on" (the default) packs by the rule
// in attention_fwd; "off" copies K and V per key tile always, as before the
// pack; "always" packs whenever the layout allows, whatever the reads (tests
// of the pack on any shape, A/B runs of the rule's threshold).
enum class KvPackMode { kRule, kOff, kAlways };
KvPackMode kv_pack_mode() {
  static const KvPackMode m = KvPackMode(env_choice("PYFASTATTN_CPU_KV_PACK", {"on", "off", "always"}));
  return m;
}

}  // namespace

void attention_fwd(const AttentionFwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0) return;
  Ctx c = make_ctx(p, false);
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  query_tasks(c, tasks, cost);
  const BlockFn fn = block_fn<FwdBody>(p.dtype);

  // Pack K and V once (kv_pack_at) when the query blocks read each key at
  // least kMinReads times on average (the pass copies each key once, the
  // per-tile path once per read) and the pack fits kMaxPackBytes. Blocks of
  // one row (the decode path reads K and V in place) are not counted. 6, not
  // the first rule's 3: on two threads a block reads half its pack from what
  // the other core wrote, which this project's VMs serve at near memory speed
  // (PERF_NOTES.md "Session 12: the K/V pack from six reads per key"), and
  // shapes of 3.5-5 reads (causal S768-S1024, S512) ran 1-10 % faster
  // without the pack, on one thread within the noise of it; from 8 reads
  // (S1024, causal S2048) the pack wins or ties.
  constexpr int64_t kMinReads = 6, kMaxPackBytes = int64_t(256) << 20;
  // Not for a KV cache's rows (attention_with_kvcache's many-row calls: paged,
  // or rows from a batch index / left padding), which kv_pack_chunk does not
  // read: they are copied per tile.
  const bool cache = p.block_table != nullptr || p.cache_batch_idx != nullptr || p.cache_leftpad != nullptr;
  const bool pairs = cpu_path(p.dtype) == CpuPath::kAvx512Bf16;
  std::vector<int64_t> first(size_t(p.batch) + 1, 0);
  int64_t keys = 0, reads = 0;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    first[size_t(b) + 1] = first[size_t(b)] + (std::max(si.len_k, 0) + 1) / 2;
    keys += int64_t(std::max(si.len_k, 0)) * p.num_heads_k;
  }
  for (const Task& t : tasks) {
    const SeqInfo si(p, t.b);
    const int m = std::min(c.blk.q, si.len_q - t.i0);
    if (m > 1) reads += std::max(0, si.key_hi(p, t.i0 + m - 1) - si.key_lo(p, t.i0));
  }
  const int64_t kp = 2 * int64_t(pairs ? (c.d + 1) / 2 : c.d), vp = pairs ? c.dv : 2 * int64_t(c.dv);
  const int64_t pack_floats = first[size_t(p.batch)] * p.num_heads_k * (kp + vp);
  std::unique_ptr<float[]> temp;
  const KvPackMode mode = kv_pack_mode();
  if (mode != KvPackMode::kOff && !cache && (mode == KvPackMode::kAlways || reads >= kMinReads * keys) &&
      pack_floats > 0 &&
      pack_floats * int64_t(sizeof(float)) <= kMaxPackBytes) {
    c.kv_pack = kept_buffer<KvPackBuffer>(pack_floats, temp);
    c.kv_first = first.data();
    std::vector<Task> pack_tasks;
    std::vector<int64_t> pack_cost;
    for (int b = 0; b < p.batch; ++b) {
      const SeqInfo si(p, b);
      for (int hk = 0; hk < p.num_heads_k; ++hk) {
        for (int j0 = 0; j0 < si.len_k; j0 += kPackKeys) {
          pack_tasks.push_back(Task{b, hk, j0});
          pack_cost.push_back(std::min(kPackKeys, si.len_k - j0));
        }
      }
    }
    run_tasks(c, fn, Kind::kFwdPack, 0, pack_tasks, pack_cost);
  }
  Carver size(nullptr);
  carve_fwd(size, c);
  run_tasks(c, fn, Kind::kFwd, size.used(), tasks, cost);
}

}  // namespace cpu
}  // namespace pyfastattn
