// CPU attention over a KV cache: append / rotary prologue, then a split-KV
// forward that reads the cache where it lies (contiguous rows, a batch index,
// left padding, or paged blocks through a block table; no gather copy).
//
// Work is cut into tasks of (sequence, group of kv heads, key chunk). A task
// owns every query row of its kv heads (sq x hq / hk rows each), so each key
// row is read from memory once and reused from registers / L1 by all of them
// (GQA decode reads the cache once, not hq / hk times). For decode a task
// takes all kv heads (up to kMaxTaskRows rows), so it reads whole cache rows
// and walks the cache in address order. When the tasks cannot fill the cores
// (the usual decode case), the keys of a sequence are split into chunks; each
// chunk leaves its unnormalised output, running max and sum, and one merge
// step combines the chunks by their LSE.
//
// A tile of kTileKeys keys is three passes: scores (a dot product read
// straight from the key row: fp32 FMAs, or bf16 dot products for bf16 on
// AVX512-BF16; per kv head, q in registers for 16 keys and the 16 sums formed
// by one transpose-and-add tree), the online softmax, and O += p V (per kv
// head, accumulators in registers over the tile). The scores pass prefetches
// every line of the tile's V rows, the P V pass every line of the next tile's
// K rows, both in address order (whole rows, key after key), which is what
// the memory system sees; the demand order inside the tile is then free. The
// scores pass also prefetches the first line of each K and V row of the next
// tile, so that the address translations of a paged cache's next blocks are
// walked a tile ahead (a random block order otherwise costs a page walk in
// the middle of the stream at every block: v8 in PERF_NOTES.md). Key
// rows are reached through per-tile arrays of row pointers, so a tile may
// cross block boundaries of a paged cache at no cost beyond the pointer walk.
// A task's last tile treats the first tile of the task its thread has
// already claimed as its next one (v20), so no task starts cold.
// The load and mask helpers come from the decode path (attention_decode.h).
// Without AVX-512 (or for head dims > 256) the portable steps run the same
// passes in address order, without prefetches.
// PERF_NOTES.md has the versions and their numbers.
#include "attention_kvcache.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "attention_decode.h"
#include "attention_schedule.h"

namespace pyfastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// Prologue: append and rotary.
// ---------------------------------------------------------------------------

// out[0, d) = x rotated over its first rd dims (fp32 arithmetic, one rounding
// to T), copied above them. Interleaved pairs are (2i, 2i+1), half-split
// pairs (i, i + rd / 2); pair i turns by the angle whose cos / sin are cs[i].
template <typename T, typename C>
void rotate_row(const T* x, T* out, int d, const C* cos, const C* sin, int rd, bool interleaved) {
  const int half = rd / 2;
  for (int i = 0; i < half; ++i) {
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = to_f32(x[a]), x1 = to_f32(x[b]);
    const float c = to_f32(cos[i]), s = to_f32(sin[i]);
    out[a] = from_f32<T>(x0 * c - x1 * s);
    out[b] = from_f32<T>(x0 * s + x1 * c);
  }
  for (int i = rd; i < d; ++i) out[i] = x[i];
}

template <typename T, typename C>
void append_impl(const AttentionFwdParams& p, const KvAppendParams& a) {
  const int hk = p.num_heads_k, hq = p.num_heads, d = p.head_dim, dv = p.head_dim_v;
  const int rd = a.rotary_dim;
  const C* cosb = static_cast<const C*>(a.rotary_cos);
  const C* sinb = static_cast<const C*>(a.rotary_sin);
  if (a.k_new && a.s_new > 0) {
    const int64_t rows = int64_t(p.batch) * a.s_new;
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int b = int(r / a.s_new), s = int(r % a.s_new);
        const int64_t pos = int64_t(a.cache_seqlens[b]) + s;  // absolute cache position
        const int32_t j = int32_t(pos - (p.cache_leftpad ? p.cache_leftpad[b] : 0));
        // The cache is the op's mutable argument; params hold it as const.
        T* kc = const_cast<T*>(static_cast<const T*>(p.k)) +
                kv_row_offset(p, b, j, p.k_batch_stride, p.k_row_stride);
        T* vc = const_cast<T*>(static_cast<const T*>(p.v)) +
                kv_row_offset(p, b, j, p.v_batch_stride, p.v_row_stride);
        const T* kn = static_cast<const T*>(a.k_new) + b * a.kn_batch_stride + s * a.kn_row_stride;
        const T* vn = static_cast<const T*>(a.v_new) + b * a.vn_batch_stride + s * a.vn_row_stride;
        for (int h = 0; h < hk; ++h) {
          const T* src = kn + h * a.kn_head_stride;
          T* dst = kc + h * p.k_head_stride;
          if (rd > 0) {
            rotate_row(src, dst, d, cosb + pos * a.rotary_row_stride, sinb + pos * a.rotary_row_stride, rd,
                       a.rotary_interleaved);
          } else {
            std::copy(src, src + d, dst);
          }
          const T* vs = vn + h * a.vn_head_stride;
          std::copy(vs, vs + dv, vc + h * p.v_head_stride);
        }
      }
    });
  }
  if (a.q_rot && rd > 0) {
    const int64_t rows = int64_t(p.batch) * p.seqlen_q;
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int b = int(r / p.seqlen_q), i = int(r % p.seqlen_q);
        const int64_t pos = int64_t(a.cache_seqlens[b]) + (a.q_per_row ? i : 0);
        const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride + i * a.q_row_stride;
        T* qr = static_cast<T*>(a.q_rot) + b * a.qr_batch_stride + i * a.qr_row_stride;
        for (int h = 0; h < hq; ++h)
          rotate_row(q + h * a.q_head_stride, qr + h * a.qr_head_stride, d, cosb + pos * a.rotary_row_stride,
                     sinb + pos * a.rotary_row_stride, rd, a.rotary_interleaved);
      }
    });
  }
}

template <typename T>
void append_dispatch_cos(const AttentionFwdParams& p, const KvAppendParams& a) {
  if (a.rotary_fp32) {
    append_impl<T, float>(p, a);
  } else {
    append_impl<T, T>(p, a);
  }
}

// ---------------------------------------------------------------------------
// The split-KV forward.
// ---------------------------------------------------------------------------

// Keys per tile: the scores of every row of a task for one tile live in
// sc[rows][kTileKeys]; the tile's K rows, then its V rows (64 keys x 8 kv
// heads x D 128 bf16 = 128 KB each) stream through L2 in address order.
constexpr int kTileKeys = 64;
// Split-KV: enough (sequence, kv-head group, chunk) tasks for 64 threads,
// chunks of at least kMinChunk keys (a chunk's merge costs rows x dv, nothing
// next to reading its keys), and no split when a task already has more than
// kMaxSplitRows query rows (prefill-like calls have work enough per task).
constexpr int64_t kTargetTasks = 64;
constexpr int64_t kMinChunk = 512;
constexpr int64_t kMaxSplitRows = 64;
// Rows (query rows x query heads) a task holds at most when it takes more
// than one kv head: its scores and outputs then stay in L1 (32 rows: sc 8 KB,
// acc 16 KB at dv = 128).
constexpr int kMaxTaskRows = 32;

// Kv heads per task: the largest divisor of hk whose rows fit kMaxTaskRows
// (at least 1). With all of them (decode: 8 kv heads x 4 query heads = 32
// rows) a task reads whole cache rows, so its loads walk the cache in address
// order; one kv head per task read 256 bytes of every 2 KB row (PERF_NOTES.md,
// v5 and v6).
// When each kv head's rows are contiguous instead (a (B, H, S, D) buffer seen
// as (B, S, H, D), as Hugging Face's StaticCache hands it over), a task
// takes one kv head, whose rows are then one address-order stream: walking
// every head of a key there touches one page per head per key (PERF_NOTES.md,
// "Session 6: MHA decode read from memory").
int heads_per_task(const AttentionFwdParams& p) {
  if (p.num_heads_k > 1 && p.k_head_stride >= p.k_row_stride && p.block_table == nullptr) return 1;
  const int64_t qrows = int64_t(p.seqlen_q) * (p.num_heads / p.num_heads_k);
  int best = 1;
  for (int h = 1; h <= p.num_heads_k; ++h)
    if (p.num_heads_k % h == 0 && h * qrows <= kMaxTaskRows) best = h;
  return best;
}

struct KvCtx {
  const AttentionFwdParams* p;
  int group, d, dv;
  int heads;  // kv heads per task (divides hk)
  int qrows;  // rows per kv head: sq x group
  int rows;   // rows per task: heads x qrows; row r = (hl x sq + i) x group + x
              // is query row i of query head (hk0 + hl) x group + x
  float score_scale;  // raw dot -> log2 units, or -> tanh argument with softcap
  float cap_log2;     // softcap * log2(e)
  bool softcap;
  bool alibi;         // p.alibi_slopes != nullptr
  int64_t chunk;      // keys per chunk
  int max_chunks;
  // Partials of split sequences, [b][hk / heads][max_chunks][rows] (x dv for acc).
  float* part_acc;
  float* part_m;
  float* part_l;
};

struct KvTask {
  int b, hg, chunk;  // sequence, kv-head group (kv heads hg x heads ..), key chunk
};

// Per-worker scratch.
struct KvScratch {
  float* sc;         // [rows][kTileKeys] scores, then probabilities
  float* qf;         // [rows][d] fp32 queries (the fp32 dot-product steps)
  float* alpha;      // [rows] rescale of each row's running sum and output
  float* m;          // [rows] running max (log2 units)
  float* l;          // [rows] running sum
  float* acc;        // [rows][dv] unnormalised output
  const void** qp;   // [rows] query row pointers
  const void** kp;   // [2][kTileKeys] key row pointers (at the task's first kv
  const void** vp;   // head) of this tile and the next; value rows likewise
};

PFA_INLINE int row_head(const KvCtx& c, int hg, int r) {
  return (hg * c.heads + r / c.qrows) * c.group + r % c.group;
}
PFA_INLINE int row_query(const KvCtx& c, int r) { return (r % c.qrows) / c.group; }

// ---- per-instruction-set tile steps -----------------------------------------
//
// scores: sc[r][j] = score_scale * dot(q row r, K row j of r's kv head), j < n,
//         each key row read once for all rows of its kv head; prefetches the
//         tile's V rows (read next, by pv).
// softmax: the online-softmax update of every row over the tile's n scores
//         (running max m, sum l; alpha = the rescale of the old state).
// pv:     acc[r] = alpha[r] acc[r] + sum_j p[r][j] V row j of r's kv head;
//         prefetches the next tile's K rows (kn, nn of them).

template <typename T>
struct StepsPortable {
  static constexpr bool kNeedQf = true;
  static void scores(const KvCtx& c, const KvScratch& w, const T* const* kp, const T* const*, int n,
                     const T* const*, const T* const*, int) {
    const AttentionFwdParams& p = *c.p;
    for (int j = 0; j < n; ++j)
      for (int hl = 0; hl < c.heads; ++hl) {
        const T* k = kp[j] + int64_t(hl) * p.k_head_stride;
        for (int rr = 0; rr < c.qrows; ++rr) {
          const int r = hl * c.qrows + rr;
          const float* q = w.qf + int64_t(r) * c.d;
          float s = 0.0f;
          for (int x = 0; x < c.d; ++x) s += to_f32(k[x]) * q[x];
          w.sc[int64_t(r) * kTileKeys + j] = s * c.score_scale;
        }
      }
  }
  static void softmax(int rows, int n, float* sc, float* m, float* l, float* alpha) {
    for (int r = 0; r < rows; ++r) {
      float* s = sc + int64_t(r) * kTileKeys;
      float mx = -kInf;
      for (int j = 0; j < n; ++j) mx = std::max(mx, s[j]);
      const float mnew = std::max(m[r], mx);
      const float use = mnew == -kInf ? 0.0f : mnew;  // empty stays 0, not NaN
      alpha[r] = exp2_approx(m[r] - use);
      m[r] = mnew;
      float sum = 0.0f;
      for (int j = 0; j < n; ++j) {
        s[j] = exp2_approx(s[j] - use);
        sum += s[j];
      }
      l[r] = l[r] * alpha[r] + sum;
    }
  }
  static void pv(const KvCtx& c, const KvScratch& w, const T* const* vp, int n, const T* const*, int) {
    const AttentionFwdParams& p = *c.p;
    for (int r = 0; r < c.rows; ++r)
      for (int x = 0; x < c.dv; ++x) w.acc[int64_t(r) * c.dv + x] *= w.alpha[r];
    for (int j = 0; j < n; ++j)
      for (int hl = 0; hl < c.heads; ++hl) {
        const T* v = vp[j] + int64_t(hl) * p.v_head_stride;
        for (int rr = 0; rr < c.qrows; ++rr) {
          const int r = hl * c.qrows + rr;
          const float pj = w.sc[int64_t(r) * kTileKeys + j];
          float* a = w.acc + int64_t(r) * c.dv;
          for (int x = 0; x < c.dv; ++x) a[x] += pj * to_f32(v[x]);
        }
      }
  }
};

#if PFA_X86
// Online-softmax update of G rows from their scores sc[x * kTileKeys + j]:
// per row max, alpha and exp2 as decode_softmax_pv (attention_decode.h);
// alpha per row out.
PFA_AVX512 inline void softmax_rows_avx512(int G, int n, float* sc, float* m, float* l, float* alpha) {
  for (int x = 0; x < G; ++x) {
    float* s = sc + int64_t(x) * kTileKeys;
    __m512 mx = _mm512_set1_ps(-kInf);
    for (int j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, mask16(n - j), s + j));
    const float mnew = std::max(m[x], _mm512_reduce_max_ps(mx));
    const float use = mnew == -kInf ? 0.0f : mnew;
    alpha[x] = exp2_approx(m[x] - use);
    m[x] = mnew;
    const __m512 u = _mm512_set1_ps(use);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
      const __mmask16 k = mask16(n - j);
      const __m512 e = _mm512_maskz_mov_ps(k, VecAvx512::exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), u)));
      sum = _mm512_add_ps(sum, e);
      _mm512_mask_storeu_ps(s + j, k, e);
    }
    l[x] = l[x] * alpha[x] + _mm512_reduce_add_ps(sum);
  }
}

// The 16 horizontal sums of v[0..15] as one vector (lane j = sum of v[j]):
// a transpose-and-add tree, 45 instructions for 16 sums where
// _mm512_reduce_add_ps takes ~8 each.
PFA_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 r[8], s[4], u[2];
  for (int k = 0; k < 8; ++k)
    r[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)
    s[k] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * k], r[2 * k + 1], 0x44), _mm512_shuffle_ps(r[2 * k], r[2 * k + 1], 0xEE));
  for (int k = 0; k < 2; ++k)
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
}

// ---- AVX-512 steps: one kv head at a time inside the tile -------------------
//
// Every line of a tile is software-prefetched in address order (whole cache
// rows, one key after another: the walk the memory system sees), so the
// demand order inside the tile is free: the steps run one kv head at a time
// with q in registers for 16 keys and the output accumulators in registers
// over the whole tile, while a cursor spreads the prefetches of the next
// pass's rows over the loop. The hardware prefetchers do not keep up with
// this kernel on their own, even on a contiguous cache walked in address
// order (PERF_NOTES.md, v5: without the software prefetches a step took 2.5x
// the CPU time; every other line or one per 256 bytes, 2.2-2.5x; on Zen 5
// the T1 and NTA hints no different from T0). Where the lines go, L1 or L2,
// is chosen by CPU generation (cpu_stream_prefetch_to_l2: on Zen 4, L2 halves
// the step).

// The row slices (one key's kv heads after another) a pass prefetches, a
// share at a time; and, spread over the same steps, the first line of each
// K and V row of the tile after this one (far). On a paged cache every block
// starts on pages whose address translation is not in the TLB; a prefetch
// that meets such a page walks the page table then, a tile before the row's
// lines are asked for, instead of in the middle of the stream (PERF_NOTES.md,
// v8: paged 16 from 1.27x to ~1.1x contiguous; a demand load in its place
// was slower).
// Each address is formed from the row pointer in a register (one pointer
// load per row), not read from a list of slice pointers: a load per
// prefetch, queued behind prefetches that wait for miss buffers, held the
// prefetches back (v10: -20 % per step at the target case).
// Where the row prefetches put their lines: L1 (prefetcht0) or L2
// (prefetcht2), by cpu_stream_prefetch_to_l2 (simd.h). A tile's V rows are
// 128 KB at the target case (64 keys x 8 kv heads x 256 bytes), prefetched
// over the scores pass, far more than L1 holds. Measured per generation
// (PERF_NOTES.md, v18, one thread, B1 Hq32 Hk8 D128 32k bf16): on Zen 4 (32 KB
// L1D) T0 took 17.5-22 ms per step and T2 9.2-10.4 ms, every layout; on Zen 5
// (48 KB L1D) the T1 / T2 hints were 5-9 % slower than T0 in the
// microbenchmark, and every later version was tuned with T0.
constexpr int kPfToL1 = 3;  // __builtin_prefetch locality 3: prefetcht0
constexpr int kPfToL2 = 1;  // locality 1: prefetcht2

// kRowLocality: where the row slices go, as __builtin_prefetch's locality:
// kPfToL1 (prefetcht0) or kPfToL2 (prefetcht2; on Zen 4 and later the T1 / T2
// hints fill L2, not L1). The far primes stay T0 (v18: T1 / T2 / NTA there
// gained nothing).
template <typename T, int kRowLocality>
struct PfCursor {
  const T* const* rows;  // row pointers (at the task's first kv head)
  int nrows, heads;
  int64_t head_stride;   // elements between kv heads of a row
  int lines;             // 64-byte lines per slice
  int count, next;       // slices (nrows x heads), slices issued
  int j, h;              // the next slice: row j, kv head h
  const T* row;          // rows[j]
  const T* const* fark;  // far: first lines of rows fark[i] and farv[i], i < far_rows,
  const T* const* farv;  //      K then V; far_count = 2 far_rows
  int far_count, far_next;
  // One slice, no far list (the P V pass's cursor has none): the state a
  // caller keeps in registers over its key loop (v13).
  PFA_INLINE void step_one_row_slice() {
    if (next == count) return;
    const char* s = reinterpret_cast<const char*>(row + h * head_stride);
    for (int l = 0; l < lines; ++l) __builtin_prefetch(s + 64 * l, 0, kRowLocality);
    ++next;
    if (++h == heads) {
      h = 0;
      if (++j < nrows) row = rows[j];
    }
  }
  PFA_INLINE void step(int k) {
    const int e = std::min(count, next + k);
    for (; next < e; ++next) {
      const char* s = reinterpret_cast<const char*>(row + h * head_stride);
      for (int l = 0; l < lines; ++l) __builtin_prefetch(s + 64 * l, 0, kRowLocality);
      if (++h == heads) {
        h = 0;
        if (++j < nrows) row = rows[j];
      }
    }
    if (far_next == far_count) return;
    const int fe = count > 0 ? int(int64_t(far_count) * next / count) : far_count;
    for (; far_next < fe; ++far_next) {
      const T* r = (far_next & 1) ? farv[far_next >> 1] : fark[far_next >> 1];
      _mm_prefetch(reinterpret_cast<const char*>(r), _MM_HINT_T0);
    }
  }
};

// The slices of keys [0, n) of rows rp (kv heads of the task).
template <int kL, typename T>
PFA_INLINE PfCursor<T, kL> pf_cursor(const T* const* rp, int n, int heads, int64_t head_stride, int elems) {
  return PfCursor<T, kL>{rp,      n,       heads, head_stride, int((elems * sizeof(T) + 63) / 64), n * heads, 0, 0, 0,
                     n > 0 ? rp[0] : nullptr, nullptr, nullptr, 0, 0};
}

// Adds the far list to pf: the first line of K row j and V row j of the next
// tile's keys, j < nn, in that order.
template <typename T, int kL>
PFA_INLINE void pf_far(PfCursor<T, kL>& pf, const T* const* kn, const T* const* vn, int nn) {
  pf.fark = kn;
  pf.farv = vn;
  pf.far_count = 2 * nn;
}

// 32 bf16 values x[32 v, 32 v + 32): a whole vector when NV > 0 (d = 32 x NV),
// else masked by km[v] (the lanes past d are zero).
template <int NV>
PFA_AVX512_BF16 PFA_INLINE __m512i load_bf16x32(const c10::BFloat16* x, int v, const __mmask32* km) {
  if constexpr (NV > 0) {
    return _mm512_loadu_si512(x + 32 * v);
  } else {
    return _mm512_maskz_loadu_epi16(km[v], x + 32 * v);
  }
}

// Scores of G rows (q rows qp[x]) against keys kp[j] + koff, j < n, into
// sc[x * kTileKeys + j]: bf16 dot products, q in registers per 16 keys, 16
// sums formed by one transpose-and-add tree (at d 64 / 128: two rows x 8
// keys per tree, so each K vector is loaded once for two rows; v19). NV > 0: d is
// exactly 32 x NV (64, 128, 256), so the loads are whole vectors and the
// loops unroll with q and the 16 sums in registers; NV = 0: any d <= 256,
// masked loads (a run-time loop the compiler keeps out of registers:
// PERF_NOTES.md, v9).
template <int NV, class Pf>
PFA_AVX512_BF16 inline void scores_head_bf16(const KvCtx& c, const c10::BFloat16* const* qp, int G,
                                             const c10::BFloat16* const* kp, int64_t koff, int n, float* sc,
                                             Pf& pf) {
  using T = c10::BFloat16;
  const int d = c.d, nv = NV > 0 ? NV : (d + 31) / 32;
  __mmask32 km[8];
  for (int v = 0; v < nv; ++v) {
    const int left = d - 32 * v;
    km[v] = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
  }
  const __m512 scale = _mm512_set1_ps(c.score_scale);
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    pf.step(16);
    int x = 0;
    if constexpr (NV > 0 && NV <= 4) {
      // Two rows at a time, 8 keys per tree: each K vector loaded once for
      // both rows (half the K loads of one row at a time; the 16 sums of a
      // tree are then 8 keys x 2 rows). Same products, same accumulation
      // order and tree per sum: the scores are bit-identical.
      for (; x + 2 <= G; x += 2) {
        const T* qa = qp[x];
        const T* qb = qp[x + 1];
        __m512i qva[NV], qvb[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) qva[v] = load_bf16x32<NV>(qa, v, km), qvb[v] = load_bf16x32<NV>(qb, v, km);
#pragma GCC unroll 2
        for (int half = 0; half < 16; half += 8) {
          __m512 acc[16];
#pragma GCC unroll 8
          for (int jj = 0; jj < 8; ++jj) {
            const T* k = kp[j + half + jj] + koff;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              const __m512bh kv = (__m512bh)load_bf16x32<NV>(k, v, km);
              a0 = _mm512_dpbf16_ps(a0, kv, (__m512bh)qva[v]);
              a1 = _mm512_dpbf16_ps(a1, kv, (__m512bh)qvb[v]);
            }
            acc[jj] = a0;
            acc[8 + jj] = a1;
          }
          const __m512 r = _mm512_mul_ps(hsum16(acc), scale);
          _mm256_storeu_ps(sc + int64_t(x) * kTileKeys + j + half, _mm512_castps512_ps256(r));
          _mm256_storeu_ps(sc + int64_t(x + 1) * kTileKeys + j + half, _mm512_extractf32x8_ps(r, 1));
        }
      }
    }
    for (; x < G; ++x) {
      const T* q = qp[x];
      __m512i qv[NV > 0 ? NV : 8];
#pragma GCC unroll 8
      for (int v = 0; v < nv; ++v) qv[v] = load_bf16x32<NV>(q, v, km);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj) {
        const T* k = kp[j + jj] + koff;
        __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int v = 0; v < nv; ++v) a = _mm512_dpbf16_ps(a, (__m512bh)load_bf16x32<NV>(k, v, km), (__m512bh)qv[v]);
        acc[jj] = a;
      }
      _mm512_storeu_ps(sc + int64_t(x) * kTileKeys + j, _mm512_mul_ps(hsum16(acc), scale));
    }
  }
  for (; j < n; ++j) {
    pf.step(1);
    const T* k = kp[j] + koff;
    __m512i kv[NV > 0 ? NV : 8];
    for (int v = 0; v < nv; ++v) kv[v] = load_bf16x32<NV>(k, v, km);
    for (int x = 0; x < G; ++x) {
      const T* q = qp[x];
      __m512 a = _mm512_setzero_ps();
      for (int v = 0; v < nv; ++v) a = _mm512_dpbf16_ps(a, (__m512bh)kv[v], (__m512bh)load_bf16x32<NV>(q, v, km));
      sc[int64_t(x) * kTileKeys + j] = _mm512_reduce_add_ps(a) * c.score_scale;
    }
  }
}

// The same with fp32 FMAs (q from qf, fp32 rows of d): each key row loaded and
// converted once for the G rows.
template <typename T, class Pf>
PFA_AVX512 inline void scores_head_f32(const KvCtx& c, const float* qf, int G, const T* const* kp, int64_t koff,
                                       int n, float* sc, Pf& pf) {
  const int d = c.d, nv = (d + 15) / 16;
  for (int j = 0; j < n; ++j) {
    pf.step(1);
    const T* k = kp[j] + koff;
    __m512 kv[16];
    for (int v = 0; v < nv; ++v) kv[v] = load16_f32(k + 16 * v, mask16(d - 16 * v));
    for (int x = 0; x < G; ++x) {
      const float* q = qf + int64_t(x) * d;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int v = 0;
      for (; v + 1 < nv; v += 2) {
        // masked: lanes past d of q would meet K's zero lanes, and 0 * inf is NaN
        a0 = _mm512_fmadd_ps(kv[v], _mm512_maskz_loadu_ps(mask16(d - 16 * v), q + 16 * v), a0);
        a1 = _mm512_fmadd_ps(kv[v + 1], _mm512_maskz_loadu_ps(mask16(d - 16 * v - 16), q + 16 * v + 16), a1);
      }
      if (v < nv) a0 = _mm512_fmadd_ps(kv[v], _mm512_maskz_loadu_ps(mask16(d - 16 * v), q + 16 * v), a0);
      sc[int64_t(x) * kTileKeys + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * c.score_scale;
    }
  }
}

// acc[x] = alpha[x] acc[x] + sum_j p[x][j] V_j (V_j = vp[j] + voff) for GS <=
// 4 rows, columns [x0, x0 + 64): each V row converted once, GS x 4
// accumulators in registers over the tile. kPf: one prefetch slice per key
// from a copy of pf held in locals over the key loop (v13: through a pointer
// the cursor lived in memory, and its registers pushed three accumulators
// onto the stack, a store-to-load chain per key).
template <typename T, int GS, bool kPf, class Pf>
PFA_AVX512 PFA_INLINE void pv_cols_regs(int dv, int x0, const T* const* vp, int64_t voff, int n, const float* sc,
                                        float* acc, const float* alpha, Pf& pf) {
  __mmask16 km[4];
  for (int v = 0; v < 4; ++v) km[v] = x0 + 16 * v < dv ? mask16(dv - x0 - 16 * v) : __mmask16(0);
  __m512 o[GS][4];
  for (int t = 0; t < GS; ++t) {
    const __m512 a = _mm512_set1_ps(alpha[t]);
    for (int v = 0; v < 4; ++v) o[t][v] = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(km[v], acc + t * dv + x0 + 16 * v));
  }
  Pf cur = pf;
  for (int j = 0; j < n; ++j) {
    if constexpr (kPf) cur.step_one_row_slice();
    const T* vr = vp[j] + voff + x0;
    __m512 vv[4];
    for (int v = 0; v < 4; ++v) vv[v] = load16_f32(vr + 16 * v, km[v]);
    for (int t = 0; t < GS; ++t) {
      const __m512 pj = _mm512_set1_ps(sc[t * kTileKeys + j]);
      for (int v = 0; v < 4; ++v) o[t][v] = _mm512_fmadd_ps(pj, vv[v], o[t][v]);
    }
  }
  if constexpr (kPf) pf = cur;
  for (int t = 0; t < GS; ++t)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(acc + t * dv + x0 + 16 * v, km[v], o[t][v]);
}

// All dv columns of GS rows; the first 64 columns step pf when kPf.
template <typename T, int GS, bool kPf, class Pf>
PFA_AVX512 inline void pv_quad_regs(int dv, const T* const* vp, int64_t voff, int n, const float* sc, float* acc,
                                    const float* alpha, Pf& pf) {
  pv_cols_regs<T, GS, kPf>(dv, 0, vp, voff, n, sc, acc, alpha, pf);
  for (int x0 = 64; x0 < dv; x0 += 64) pv_cols_regs<T, GS, false>(dv, x0, vp, voff, n, sc, acc, alpha, pf);
}

template <typename T, int kL>
PFA_AVX512 inline void pv_regs_avx512(const KvCtx& c, const KvScratch& w, const T* const* vp, int n,
                                      const T* const* kn, int nn) {
  const AttentionFwdParams& p = *c.p;
  auto pf = pf_cursor<kL>(kn, nn, c.heads, p.k_head_stride, c.d);
  for (int hl = 0; hl < c.heads; ++hl) {
    const int64_t voff = int64_t(hl) * p.v_head_stride;
    for (int x = 0; x < c.qrows; x += 4) {
      const int r = hl * c.qrows + x;
      const float* s = w.sc + int64_t(r) * kTileKeys;
      float* a = w.acc + int64_t(r) * c.dv;
      const int gs = std::min(4, c.qrows - x);
      if (x == 0) {
        switch (gs) {
          case 1: pv_quad_regs<T, 1, true>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
          case 2: pv_quad_regs<T, 2, true>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
          case 3: pv_quad_regs<T, 3, true>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
          default: pv_quad_regs<T, 4, true>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
        }
      } else {
        switch (gs) {
          case 1: pv_quad_regs<T, 1, false>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
          case 2: pv_quad_regs<T, 2, false>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
          case 3: pv_quad_regs<T, 3, false>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
          default: pv_quad_regs<T, 4, false>(c.dv, vp, voff, n, s, a, w.alpha + r, pf); break;
        }
      }
    }
  }
  pf.step(pf.count);
}

// fp32 FMAs for every dtype (d <= 256). kL: where the row prefetches go.
template <typename T, int kL>
struct StepsAvx512 {
  static constexpr bool kNeedQf = true;
  static PFA_AVX512 inline void scores(const KvCtx& c, const KvScratch& w, const T* const* kp, const T* const* vp,
                                       int n, const T* const* kn, const T* const* vn, int nn) {
    const AttentionFwdParams& p = *c.p;
    auto pf = pf_cursor<kL>(vp, n, c.heads, p.v_head_stride, c.dv);
    pf_far(pf, kn, vn, nn);
    for (int hl = 0; hl < c.heads; ++hl)
      scores_head_f32<T>(c, w.qf + int64_t(hl) * c.qrows * c.d, c.qrows, kp, int64_t(hl) * p.k_head_stride, n,
                         w.sc + int64_t(hl) * c.qrows * kTileKeys, pf);
    pf.step(pf.count);
  }
  static PFA_AVX512 inline void softmax(int rows, int n, float* sc, float* m, float* l, float* alpha) {
    softmax_rows_avx512(rows, n, sc, m, l, alpha);
  }
  static PFA_AVX512 inline void pv(const KvCtx& c, const KvScratch& w, const T* const* vp, int n, const T* const* kn,
                                   int nn) {
    pv_regs_avx512<T, kL>(c, w, vp, n, kn, nn);
  }
};

// bf16 dot products for the scores (d <= 256).
template <int kL>
struct StepsAvx512Bf16 {
  using T = c10::BFloat16;
  static constexpr bool kNeedQf = false;
  static PFA_AVX512_BF16 inline void scores(const KvCtx& c, const KvScratch& w, const T* const* kp,
                                            const T* const* vp, int n, const T* const* kn, const T* const* vn,
                                            int nn) {
    const AttentionFwdParams& p = *c.p;
    auto pf = pf_cursor<kL>(vp, n, c.heads, p.v_head_stride, c.dv);
    pf_far(pf, kn, vn, nn);
    const T* const* qp = reinterpret_cast<const T* const*>(w.qp);
    for (int hl = 0; hl < c.heads; ++hl) {
      const T* const* q = qp + hl * c.qrows;
      const int64_t koff = int64_t(hl) * p.k_head_stride;
      float* sc = w.sc + int64_t(hl) * c.qrows * kTileKeys;
      switch (c.d) {
        case 64: scores_head_bf16<2>(c, q, c.qrows, kp, koff, n, sc, pf); break;
        case 128: scores_head_bf16<4>(c, q, c.qrows, kp, koff, n, sc, pf); break;
        case 256: scores_head_bf16<8>(c, q, c.qrows, kp, koff, n, sc, pf); break;
        default: scores_head_bf16<0>(c, q, c.qrows, kp, koff, n, sc, pf); break;
      }
    }
    pf.step(pf.count);
  }
  static PFA_AVX512_BF16 inline void softmax(int rows, int n, float* sc, float* m, float* l, float* alpha) {
    softmax_rows_avx512(rows, n, sc, m, l, alpha);
  }
  static PFA_AVX512_BF16 inline void pv(const KvCtx& c, const KvScratch& w, const T* const* vp, int n,
                                        const T* const* kn, int nn) {
    pv_regs_avx512<T, kL>(c, w, vp, n, kn, nn);
  }
};
#endif

// ---- the task body ---------------------------------------------------------

// ALiBi (params.h): s[j] -= slope2 * |dist0 - j| for j < n, in log2 units
// (slope2 = slope * log2(e)), after softcap, where dist0 = i + len_k - len_q
// - (the first key of s). A plain loop the compiler vectorises.
PFA_INLINE void add_alibi(float* s, int n, float slope2, int64_t dist0) {
  const float base = float(dist0);
  for (int j = 0; j < n; ++j) s[j] -= slope2 * std::fabs(base - float(j));
}

// slope * log2(e) of (sequence b, query head h).
PFA_INLINE float alibi_slope2(const AttentionFwdParams& p, int b, int h) {
  return p.alibi_slopes[int64_t(b) * p.alibi_batch_stride + h] * kLog2e;
}

// Row pointers of keys [j0, j0 + n) of sequence b at kv head hk, into kp / vp.
// Paged: one division per tile, then a walk along the block.
template <typename T>
PFA_INLINE void tile_pointers(const AttentionFwdParams& p, int b, int hk, int j0, int n, const T** kp,
                              const T** vp) {
  const T* kb = static_cast<const T*>(p.k) + int64_t(hk) * p.k_head_stride;
  const T* vb = static_cast<const T*>(p.v) + int64_t(hk) * p.v_head_stride;
  if (p.block_table) {
    const int64_t t0 = int64_t(j0) + (p.cache_leftpad ? p.cache_leftpad[b] : 0);
    const int32_t* bt = p.block_table + int64_t(b) * p.block_table_batch_stride;
    int64_t blk = t0 / p.page_block_size;
    int64_t row = t0 % p.page_block_size;
    for (int j = 0; j < n; ++j) {
      const int64_t page = bt[blk];
      kp[j] = kb + page * p.k_batch_stride + row * p.k_row_stride;
      vp[j] = vb + page * p.v_batch_stride + row * p.v_row_stride;
      if (++row == p.page_block_size) {
        row = 0;
        ++blk;
      }
    }
  } else {
    const T* k0 = kb + kv_row_offset(p, b, j0, p.k_batch_stride, p.k_row_stride);
    const T* v0 = vb + kv_row_offset(p, b, j0, p.v_batch_stride, p.v_row_stride);
    for (int j = 0; j < n; ++j) {
      kp[j] = k0 + int64_t(j) * p.k_row_stride;
      vp[j] = v0 + int64_t(j) * p.v_row_stride;
    }
  }
}

int chunks_of(const KvCtx& c, int len_k) {
  return len_k <= 0 ? 1 : int((len_k + c.chunk - 1) / c.chunk);
}

template <class Steps, typename T>
PFA_INLINE void kv_task(const KvCtx& c, const KvScratch& w, const KvTask& t, const KvTask* next) {
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, t.b);
  const int g = c.group, sq = p.seqlen_q, rows = c.rows, hk0 = t.hg * c.heads;
  const int c0 = int(int64_t(t.chunk) * c.chunk);
  const int c1 = int(std::min<int64_t>(si.len_k, int64_t(c0) + c.chunk));
  // The keys some query row sees in this chunk.
  int ulo = c1, uhi = c0;
  for (int i = 0; i < sq; ++i) {
    const int lo = std::max(si.key_lo(p, i), c0), hi = std::min(si.key_hi(p, i), c1);
    if (lo < hi) {
      ulo = std::min(ulo, lo);
      uhi = std::max(uhi, hi);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const T* q = static_cast<const T*>(p.q) + int64_t(t.b) * p.q_batch_stride +
                 int64_t(row_query(c, r)) * p.q_row_stride + int64_t(row_head(c, t.hg, r)) * p.q_head_stride;
    w.qp[r] = q;
    if constexpr (Steps::kNeedQf)
      for (int y = 0; y < c.d; ++y) w.qf[int64_t(r) * c.d + y] = to_f32(q[y]);
    w.m[r] = -kInf;
    w.l[r] = 0.0f;
  }
  std::fill(w.acc, w.acc + int64_t(rows) * c.dv, 0.0f);
  const T** kp[2] = {reinterpret_cast<const T**>(w.kp), reinterpret_cast<const T**>(w.kp) + kTileKeys};
  const T** vp[2] = {reinterpret_cast<const T**>(w.vp), reinterpret_cast<const T**>(w.vp) + kTileKeys};
  int cur = 0;
  if (ulo < uhi) tile_pointers<T>(p, t.b, hk0, ulo, std::min(kTileKeys, uhi - ulo), kp[0], vp[0]);
  // The first tile of the task this thread runs next: the last tile
  // prefetches its keys as it would a tile of its own (v20: a task otherwise
  // starts on lines nobody asked for; addresses only, nothing computed).
  int next_n = 0, next_j0 = 0;
  if (next != nullptr) {
    next_j0 = int(int64_t(next->chunk) * c.chunk);
    next_n = int(std::max<int64_t>(0, std::min<int64_t>(kTileKeys, SeqInfo(p, next->b).len_k - next_j0)));
  }
  for (int j0 = ulo; j0 < uhi; j0 += kTileKeys) {
    const int n = std::min(kTileKeys, uhi - j0);
    const bool last = j0 + n >= uhi;
    const int nn = last ? next_n : std::min(kTileKeys, uhi - j0 - n);
    if (nn > 0) {
      if (last)
        tile_pointers<T>(p, next->b, next->hg * c.heads, next_j0, nn, kp[cur ^ 1], vp[cur ^ 1]);
      else
        tile_pointers<T>(p, t.b, hk0, j0 + n, nn, kp[cur ^ 1], vp[cur ^ 1]);
    }
    Steps::scores(c, w, kp[cur], vp[cur], n, kp[cur ^ 1], vp[cur ^ 1], nn);
    if (c.softcap)
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < n; ++j) {
          float& s = w.sc[int64_t(r) * kTileKeys + j];
          s = c.cap_log2 * tanh_approx(s);
        }
    if (c.alibi)
      for (int r = 0; r < rows; ++r)
        add_alibi(w.sc + int64_t(r) * kTileKeys, n, alibi_slope2(p, t.b, row_head(c, t.hg, r)),
                  int64_t(row_query(c, r)) + si.offset - j0);
    // Keys of the tile a query row does not see (causal / window edges).
    for (int i = 0; i < sq; ++i) {
      const int lo = std::max(si.key_lo(p, i), c0) - j0, hi = std::min(si.key_hi(p, i), c1) - j0;
      if (lo <= 0 && hi >= n) continue;
      for (int hl = 0; hl < c.heads; ++hl)
        for (int x = 0; x < g; ++x) {
          float* s = w.sc + int64_t(hl * c.qrows + i * g + x) * kTileKeys;
          for (int j = 0; j < n; ++j)
            if (j < lo || j >= hi) s[j] = -kInf;
        }
    }
    Steps::softmax(rows, n, w.sc, w.m, w.l, w.alpha);
    Steps::pv(c, w, vp[cur], n, kp[cur ^ 1], nn);
    cur ^= 1;
  }
  if (chunks_of(c, si.len_k) == 1) {
    // The whole sequence in one task: normalise and write out / lse.
    for (int r = 0; r < rows; ++r) {
      const int i = row_query(c, r), h = row_head(c, t.hg, r);
      const bool empty = w.m[r] == -kInf || w.l[r] == 0.0f;  // NaN sums propagate
      const float inv = empty ? 0.0f : 1.0f / w.l[r];
      T* o = static_cast<T*>(p.o) + int64_t(t.b) * p.o_batch_stride + int64_t(i) * p.o_row_stride +
             int64_t(h) * p.o_head_stride;
      const float* a = w.acc + int64_t(r) * c.dv;
      for (int x = 0; x < c.dv; ++x) o[x] = from_f32<T>(a[x] * inv);
      p.lse[si.lse_index(p, h, i)] = empty ? -kInf : (w.m[r] + std::log2(w.l[r])) * kLn2;
    }
  } else {
    const int groups = p.num_heads_k / c.heads;
    const int64_t base = ((int64_t(t.b) * groups + t.hg) * c.max_chunks + t.chunk) * rows;
    std::copy(w.m, w.m + rows, c.part_m + base);
    std::copy(w.l, w.l + rows, c.part_l + base);
    std::copy(w.acc, w.acc + int64_t(rows) * c.dv, c.part_acc + base * c.dv);
  }
}

// Combines the chunks of row r of one (sequence, kv-head group): O = sum_c
// 2^(m_c - M) acc_c / L, L = sum_c 2^(m_c - M) l_c, lse = ln2 (M + log2 L).
template <typename T>
void merge_row(const KvCtx& c, int b, int hg, int r, int nch, float* out) {
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, b);
  const int i = row_query(c, r), h = row_head(c, hg, r);
  const int groups = p.num_heads_k / c.heads;
  const int64_t base = (int64_t(b) * groups + hg) * c.max_chunks * c.rows + r;
  float mmax = -kInf;
  for (int ch = 0; ch < nch; ++ch) mmax = std::max(mmax, c.part_m[base + int64_t(ch) * c.rows]);
  float lsum = 0.0f;
  std::fill(out, out + c.dv, 0.0f);
  if (mmax != -kInf) {
    for (int ch = 0; ch < nch; ++ch) {
      const int64_t at = base + int64_t(ch) * c.rows;
      if (c.part_m[at] == -kInf) continue;
      const float wgt = exp2_approx(c.part_m[at] - mmax);
      lsum += wgt * c.part_l[at];
      const float* a = c.part_acc + at * c.dv;
      for (int x = 0; x < c.dv; ++x) out[x] += wgt * a[x];
    }
  }
  const bool empty = mmax == -kInf || lsum == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / lsum;
  T* o = static_cast<T*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(i) * p.o_row_stride +
         int64_t(h) * p.o_head_stride;
  for (int x = 0; x < c.dv; ++x) o[x] = from_f32<T>(out[x] * inv);
  p.lse[si.lse_index(p, h, i)] = empty ? -kInf : (mmax + std::log2(lsum)) * kLn2;
}

// ---- entry points per instruction set --------------------------------------

// One task; `next` is the task the same thread runs after it (or nullptr).
using KvTaskFn = void (*)(const KvCtx&, const KvScratch&, const KvTask&, const KvTask*);

template <typename T>
void task_portable(const KvCtx& c, const KvScratch& w, const KvTask& t, const KvTask* next) {
  kv_task<StepsPortable<T>, T>(c, w, t, next);
}
#if PFA_X86
template <typename T, int kL>
PFA_AVX512 __attribute__((flatten)) void task_avx512(const KvCtx& c, const KvScratch& w, const KvTask& t,
                                                     const KvTask* next) {
  kv_task<StepsAvx512<T, kL>, T>(c, w, t, next);
}
template <int kL>
PFA_AVX512_BF16 __attribute__((flatten)) void task_avx512_bf16(const KvCtx& c, const KvScratch& w,
                                                               const KvTask& t, const KvTask* next) {
  kv_task<StepsAvx512Bf16<kL>, c10::BFloat16>(c, w, t, next);
}
#endif

template <typename T>
KvTaskFn task_fn_for(const KvCtx& c) {
  const CpuPath path = cpu_path(c.p->dtype);
#if PFA_X86
  // The AVX-512 scores hold a K row in registers: head dims up to 256. AVX2
  // machines take the portable steps (the compiler vectorises their loops).
  if (c.d <= 256) {
    const bool l2 = cpu_stream_prefetch_to_l2();
    if constexpr (std::is_same<T, c10::BFloat16>::value) {
      if (path == CpuPath::kAvx512Bf16) return l2 ? &task_avx512_bf16<kPfToL2> : &task_avx512_bf16<kPfToL1>;
    }
    if (path >= CpuPath::kAvx512) return l2 ? &task_avx512<T, kPfToL2> : &task_avx512<T, kPfToL1>;
  }
#endif
  (void)path;
  return &task_portable<T>;
}

// Kv heads per task for this call: heads_per_task's (whole cache rows, PERF_NOTES.md
// v5) unless that leaves fewer tasks than threads -- a short cache (one chunk of
// <= 512 keys is one task per sequence: MHA or GQA decode at B1 over a few
// hundred keys) or few sequences and chunks -- then the largest divisor of it
// that gives every thread a task (at least 1 head). Only the grouping of kv heads
// into tasks changes: every row's steps, the chunks (kvcache_chunk_keys, from the
// shape alone) and their merge order stay the same, so the results are the same
// bits for any thread count (tests/test_kvcache.py, deterministic across threads).
int heads_for_threads(const KvCtx& c, int threads) {
  const AttentionFwdParams& p = *c.p;
  int64_t chunks = 0;
  for (int b = 0; b < p.batch; ++b) chunks += chunks_of(c, SeqInfo(p, b).len_k);
  int h = c.heads;
  while (h > 1 && chunks * (p.num_heads_k / h) < threads) {
    int next = h - 1;
    while (c.heads % next != 0) --next;  // divisors of heads_per_task's count divide hk too
    h = next;
  }
  return h;
}

template <typename T>
void run_kvcache(KvCtx& c) {
  const AttentionFwdParams& p = *c.p;
  const int groups = p.num_heads_k / c.heads;
  std::vector<KvTask> tasks;
  std::vector<int64_t> cost;
  std::vector<int> nchunks(size_t(p.batch));
  bool any_split = false;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    nchunks[b] = chunks_of(c, si.len_k);
    any_split |= nchunks[b] > 1;
    for (int hg = 0; hg < groups; ++hg)
      for (int ch = 0; ch < nchunks[b]; ++ch) {
        tasks.push_back(KvTask{b, hg, ch});
        cost.push_back(std::min<int64_t>(c.chunk, si.len_k - int64_t(ch) * c.chunk));
      }
  }
  std::vector<float> parts;
  if (any_split) {
    const int64_t slots = int64_t(p.batch) * groups * c.max_chunks * c.rows;
    parts.resize(size_t(slots * (c.dv + 2)));
    c.part_acc = parts.data();
    c.part_m = c.part_acc + slots * c.dv;
    c.part_l = c.part_m + slots;
  }
  // Longest first from a shared counter, as run_tasks (attention_schedule.cpp).
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  const KvTaskFn fn = task_fn_for<T>(c);
  const int64_t n = int64_t(tasks.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t rows = c.rows;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf(size_t(rows * (kTileKeys + c.d + 3 + c.dv)));
    std::vector<const void*> ptrs(size_t(rows + 4 * kTileKeys));
    KvScratch w;
    w.sc = buf.data();
    w.qf = w.sc + rows * kTileKeys;
    w.alpha = w.qf + rows * c.d;
    w.m = w.alpha + rows;
    w.l = w.m + rows;
    w.acc = w.l + rows;
    w.qp = ptrs.data();
    w.kp = w.qp + rows;
    w.vp = w.kp + 2 * kTileKeys;
    // Each thread claims its next task before it runs the current one, so
    // that the current one's last tile can prefetch the next one's first
    // (v20); the claim order is the old one (threads take turns along the
    // cache), and which thread runs a task changes no bit.
    int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    while (i < n) {
      const int64_t j = next.fetch_add(1, std::memory_order_relaxed);
      fn(c, w, tasks[size_t(order[size_t(i)])], j < n ? &tasks[size_t(order[size_t(j)])] : nullptr);
      i = j;
    }
  });
  if (any_split) {
    const int64_t units = int64_t(p.batch) * groups * rows;
    at::parallel_for(0, units, 8, [&](int64_t u0, int64_t u1) {
      std::vector<float> out(size_t(c.dv));
      for (int64_t u = u0; u < u1; ++u) {
        const int b = int(u / (groups * rows)), hg = int(u / rows % groups), r = int(u % rows);
        if (nchunks[b] > 1) merge_row<T>(c, b, hg, r, nchunks[b], out.data());
      }
    });
  }
}

}  // namespace

// Query rows per kv head above which the tiled forward takes the call.
// Measured (B2 Hq32 Hk8 D128 bf16, 2048 keys, causal, one thread, CPU ms,
// PERF_NOTES.md "Many query rows over a paged ... cache"): this kernel's
// dot-product rows cost 11.8 / 55 / 230 ms at 64 / 256 / 1024 rows per kv head
// where the tiled kernel takes 5.9 / 14 / 46.
constexpr int64_t kTiledMinRows = 64;

bool kvcache_suits_tiled_kernel(const AttentionFwdParams& p) {
  return int64_t(p.seqlen_q) * (p.num_heads / p.num_heads_k) > kTiledMinRows;
}

int64_t kvcache_chunk_keys(const AttentionFwdParams& p) {
  int64_t max_len = 0;
  for (int b = 0; b < p.batch; ++b) max_len = std::max<int64_t>(max_len, SeqInfo(p, b).len_k);
  max_len = std::max<int64_t>(max_len, 1);
  if (p.num_splits > 0) return std::max<int64_t>(16, round_up((max_len + p.num_splits - 1) / p.num_splits, 16));
  const int heads = heads_per_task(p);
  const int64_t units = int64_t(p.batch) * (p.num_heads_k / heads);
  const int64_t rows = int64_t(p.seqlen_q) * (p.num_heads / p.num_heads_k) * heads;
  const int64_t want = (kTargetTasks + units - 1) / units;
  if (want <= 1 || rows > kMaxSplitRows) return max_len;
  return std::max<int64_t>(kMinChunk, round_up((max_len + want - 1) / want, kTileKeys));
}

void kvcache_append(const AttentionFwdParams& p, const KvAppendParams& a) {
  switch (p.dtype) {
    case DType::kFloat16: append_dispatch_cos<c10::Half>(p, a); break;
    case DType::kBFloat16: append_dispatch_cos<c10::BFloat16>(p, a); break;
    case DType::kFloat32:
    default: append_impl<float, float>(p, a); break;
  }
}

void attention_kvcache_fwd(const AttentionFwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.seqlen_q <= 0) return;
  KvCtx c{};
  c.p = &p;
  c.group = p.num_heads / p.num_heads_k;
  c.d = p.head_dim;
  c.dv = p.head_dim_v;
  c.heads = heads_per_task(p);
  c.qrows = p.seqlen_q * c.group;
  c.rows = c.heads * c.qrows;
  c.softcap = p.softcap > 0.0f;
  c.score_scale = c.softcap ? p.scale / p.softcap : p.scale * kLog2e;
  c.cap_log2 = c.softcap ? p.softcap * kLog2e : 0.0f;
  c.alibi = p.alibi_slopes != nullptr;
  c.chunk = kvcache_chunk_keys(p);
  int64_t max_len = 1;
  for (int b = 0; b < p.batch; ++b) max_len = std::max<int64_t>(max_len, SeqInfo(p, b).len_k);
  c.max_chunks = int((max_len + c.chunk - 1) / c.chunk);
  c.heads = heads_for_threads(c, at::get_num_threads());
  c.rows = c.heads * c.qrows;
  switch (p.dtype) {
    case DType::kFloat16: run_kvcache<c10::Half>(c); break;
    case DType::kBFloat16: run_kvcache<c10::BFloat16>(c); break;
    case DType::kFloat32:
    default: run_kvcache<float>(c); break;
  }
}

}  // namespace cpu
}  // namespace pyfastattn
