// CPU attention over a KV cache: append / rotary prologue, then a split-KV
// forward that reads the cache where it lies (contiguous rows, a batch index,
// left padding, or paged blocks through a block table; no gather copy).
//
// Work is cut into tasks of (sequence, kv head, key chunk). A task owns every
// query row of its kv head's group (sq x hq / hk rows), so each key tile is
// read from memory once and then reused from L1/L2 by the group's rows (GQA
// decode reads the cache once, not hq / hk times). When batch x kv heads
// cannot fill the cores (the usual decode case), the keys of a sequence are
// split into chunks; each chunk leaves its unnormalised output, running max
// and sum, and one merge step combines the chunks by their LSE.
//
// The arithmetic follows the decode path (attention_decode.h, whose load and
// mask helpers it uses): a score is a dot product read straight from the key
// row (fp32 FMAs, or bf16 dot products for bf16 on AVX512-BF16), each K row
// loaded once for all the group's heads and the sums of 16 keys formed by one
// transpose-and-add tree; the online softmax runs over up to kTileKeys keys at
// a time, and O += p V reads each V row once for up to four heads. Key rows
// are reached through a per-tile array of row pointers, so a tile may cross
// block boundaries of a paged cache at no cost beyond the pointer walk, and
// they are prefetched kPrefetchKeys ahead (see prefetch_row). Without AVX-512
// (or for head dims > 256) the portable row steps run, one head at a time.
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

// Keys per tile: the scores of one row for a tile live in sc[kTileKeys]; 256
// as the tile path (attention_schedule.cpp), so a tile's K and V (128 KB at
// D = 128 bf16) stay in L2 while the group's rows reuse them.
constexpr int kTileKeys = 256;
// Keys ahead that the scores loop prefetches (see prefetch_row).
constexpr int kPrefetchKeys = 32;
// Split-KV: enough (sequence, kv head, chunk) tasks for 64 threads, chunks of
// at least kMinChunk keys (a chunk's merge costs rows x dv, nothing next to
// reading its keys), and no split when a task already has more than
// kMaxSplitRows query rows (prefill-like calls have work enough per task).
constexpr int64_t kTargetTasks = 64;
constexpr int64_t kMinChunk = 512;
constexpr int64_t kMaxSplitRows = 64;

struct KvCtx {
  const AttentionFwdParams* p;
  int group, d, dv, rows;  // rows per task: sq x group
  float score_scale;       // raw dot -> log2 units, or -> tanh argument with softcap
  float cap_log2;          // softcap * log2(e)
  bool softcap;
  bool alibi;              // p.alibi_slopes != nullptr
  int64_t chunk;           // keys per chunk
  int max_chunks;
  // Partials of split sequences, [b][hk][max_chunks][rows] (x dv for acc).
  float* part_acc;
  float* part_m;
  float* part_l;
};

struct KvTask {
  int b, hk, chunk;
};

// Per-worker scratch.
struct KvScratch {
  float* sc;       // [group][kTileKeys] scores, then probabilities
  float* qf;       // [group][d] fp32 queries
  float* alpha;    // [group] rescale of each row's running sum and output
  float* m;        // [rows] running max (log2 units)
  float* l;        // [rows] running sum
  float* acc;      // [rows][dv] unnormalised output
  const void** kp; // [kTileKeys + kPrefetchKeys] key row pointers of the tile (+ the next's first)
  const void** vp; // [kTileKeys + kPrefetchKeys] value row pointers
};

// ---- per-instruction-set row steps ----------------------------------------

// sc[j] = score_scale * dot(q, K row kp[j]) for j < n; then the online
// softmax over them and acc = alpha acc + sum_j p_j V row vp[j].
template <typename T>
struct OpsPortable {
  static constexpr bool kGroup = false;
  static PFA_INLINE void scores(const KvCtx& c, const KvScratch& w, const T* q, const T* const* kp, int n,
                                float* sc) {
    for (int x = 0; x < c.d; ++x) w.qf[x] = to_f32(q[x]);
    for (int j = 0; j < n; ++j) {
      const T* k = kp[j];
      float s = 0.0f;
      for (int x = 0; x < c.d; ++x) s += to_f32(k[x]) * w.qf[x];
      sc[j] = s * c.score_scale;
    }
  }
  static PFA_INLINE void softmax_pv(const KvCtx& c, const T* const* vp, int n, float* sc, float* acc, float& mrun,
                                    float& lrun) {
    float mx = -kInf;
    for (int j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
    const float mnew = std::max(mrun, mx);
    const float use = mnew == -kInf ? 0.0f : mnew;  // empty stays 0, not NaN
    const float alpha = exp2_approx(mrun - use);
    mrun = mnew;
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      sc[j] = exp2_approx(sc[j] - use);
      sum += sc[j];
    }
    lrun = lrun * alpha + sum;
    for (int x = 0; x < c.dv; ++x) acc[x] *= alpha;
    for (int j = 0; j < n; ++j) {
      const T* v = vp[j];
      const float pj = sc[j];
      for (int x = 0; x < c.dv; ++x) acc[x] += pj * to_f32(v[x]);
    }
  }
};

#if PFA_X86
// ---- the same for the G query heads of one kv head at once -----------------
// Each key row is loaded (and converted) once for the whole group instead of
// once per head: the per-row steps above spent ~220 instructions per key and
// kv head at G = 4, D = 128 bf16, mostly converting the same K and V rows
// again for every head; these spend ~115.

// Key rows of one kv head lie hk x d elements apart (2 KB at Hk = 8, D = 128
// bf16), so every other row starts a new 4 KB page, where the hardware
// prefetchers stop: without help the row loads wait on memory latency (the
// first cut read 2.6 GB/s per core against 30 GB/s for a plain sum of the same
// bytes, in CPU time). The scores loop therefore prefetches the K and V rows
// kPrefetchKeys keys ahead (V is read after the tile's scores, so its lines
// have long arrived).
template <typename T>
PFA_INLINE void prefetch_row(const T* row, int elems) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int b = 0; b < int(elems * sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// Online-softmax update of G rows from their scores sc[x * kTileKeys + j]:
// per row max, alpha and exp2 as decode_softmax_pv (attention_decode.h);
// returns alpha per row.
PFA_AVX512 inline void softmax_group_avx512(int G, int n, float* sc, float* m, float* l, float* alpha) {
  for (int x = 0; x < G; ++x) {
    float* s = sc + x * kTileKeys;
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
      _mm512_storeu_ps(s + j, e);
    }
    l[x] = l[x] * alpha[x] + _mm512_reduce_add_ps(sum);
  }
}

// acc[x] = alpha[x] acc[x] + sum_j p[x][j] V_j for GS <= 4 rows, 64 columns
// at a time: each V row converted once, GS x 4 accumulators in registers.
template <typename T, int GS>
PFA_AVX512 inline void pv_quad_avx512(int dv, const T* const* vp, int n, const float* sc, float* acc,
                                      const float* alpha) {
  for (int x0 = 0; x0 < dv; x0 += 64) {
    __mmask16 km[4];
    for (int v = 0; v < 4; ++v) km[v] = x0 + 16 * v < dv ? mask16(dv - x0 - 16 * v) : __mmask16(0);
    __m512 o[GS][4];
    for (int t = 0; t < GS; ++t) {
      const __m512 a = _mm512_set1_ps(alpha[t]);
      for (int v = 0; v < 4; ++v) o[t][v] = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(km[v], acc + t * dv + x0 + 16 * v));
    }
    for (int j = 0; j < n; ++j) {
      const T* vr = vp[j] + x0;
      __m512 vv[4];
      for (int v = 0; v < 4; ++v) vv[v] = load16_f32(vr + 16 * v, km[v]);
      for (int t = 0; t < GS; ++t) {
        const __m512 pj = _mm512_set1_ps(sc[t * kTileKeys + j]);
        for (int v = 0; v < 4; ++v) o[t][v] = _mm512_fmadd_ps(pj, vv[v], o[t][v]);
      }
    }
    for (int t = 0; t < GS; ++t)
      for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(acc + t * dv + x0 + 16 * v, km[v], o[t][v]);
  }
}

template <typename T>
PFA_AVX512 inline void pv_group_avx512(int G, int dv, const T* const* vp, int n, const float* sc, float* acc,
                                       const float* alpha) {
  for (int x = 0; x < G; x += 4) {
    const float* s = sc + x * kTileKeys;
    float* a = acc + int64_t(x) * dv;
    switch (std::min(4, G - x)) {
      case 1: pv_quad_avx512<T, 1>(dv, vp, n, s, a, alpha + x); break;
      case 2: pv_quad_avx512<T, 2>(dv, vp, n, s, a, alpha + x); break;
      case 3: pv_quad_avx512<T, 3>(dv, vp, n, s, a, alpha + x); break;
      default: pv_quad_avx512<T, 4>(dv, vp, n, s, a, alpha + x); break;
    }
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

// Scores of G heads (q rows q0 + x * q_head_stride) against each key row,
// loaded once: fp32 FMAs with q converted once per call into qf [G][d].
template <typename T>
PFA_AVX512 inline void scores_group_avx512(const KvCtx& c, float* qf, const T* q0, int64_t qhs, int G,
                                           const T* const* kp, const T* const* vp, int n, float* sc) {
  const int d = c.d, nv = (d + 15) / 16;
  for (int x = 0; x < G; ++x)
    for (int y = 0; y < d; ++y) qf[x * d + y] = to_f32(q0[x * qhs + y]);
  for (int j = 0; j < n; ++j) {
    if (j + kPrefetchKeys < n) {
      prefetch_row(kp[j + kPrefetchKeys], d);
      prefetch_row(vp[j + kPrefetchKeys], c.dv);
    }
    __m512 kv[16];
    for (int v = 0; v < nv; ++v) kv[v] = load16_f32(kp[j] + 16 * v, mask16(d - 16 * v));
    for (int x = 0; x < G; ++x) {
      const float* q = qf + x * d;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int v = 0;
      for (; v + 1 < nv; v += 2) {
        // masked: lanes past d of q would meet K's zero lanes, and 0 * inf is NaN
        a0 = _mm512_fmadd_ps(kv[v], _mm512_maskz_loadu_ps(mask16(d - 16 * v), q + 16 * v), a0);
        a1 = _mm512_fmadd_ps(kv[v + 1], _mm512_maskz_loadu_ps(mask16(d - 16 * v - 16), q + 16 * v + 16), a1);
      }
      if (v < nv) a0 = _mm512_fmadd_ps(kv[v], _mm512_maskz_loadu_ps(mask16(d - 16 * v), q + 16 * v), a0);
      sc[x * kTileKeys + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * c.score_scale;
    }
  }
}

// bf16 dot products, q read in place (a bf16 row already is pairs).
PFA_AVX512_BF16 inline void scores_group_bf16(const KvCtx& c, const c10::BFloat16* q0, int64_t qhs, int G,
                                              const c10::BFloat16* const* kp, const c10::BFloat16* const* vp, int n,
                                              float* sc) {
  const int d = c.d, nv = (d + 31) / 32;
  __mmask32 km[8];
  for (int v = 0; v < nv; ++v) {
    const int left = d - 32 * v;
    km[v] = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
  }
  const __m512 scale = _mm512_set1_ps(c.score_scale);
  int j = 0;
  // 16 keys at a time: one accumulator per key, summed by hsum16.
  for (; j + 16 <= n; j += 16) {
    for (int jj = 0; jj < 16; ++jj) {
      if (j + jj + kPrefetchKeys < n) {
        prefetch_row(kp[j + jj + kPrefetchKeys], d);
        prefetch_row(vp[j + jj + kPrefetchKeys], c.dv);
      }
    }
    for (int x = 0; x < G; ++x) {
      const c10::BFloat16* q = q0 + x * qhs;
      __m512i qv[8];
      for (int v = 0; v < nv; ++v) qv[v] = _mm512_maskz_loadu_epi16(km[v], q + 32 * v);
      __m512 acc[16];
      for (int jj = 0; jj < 16; ++jj) {
        const c10::BFloat16* k = kp[j + jj];
        __m512 a = _mm512_setzero_ps();
        for (int v = 0; v < nv; ++v)
          a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(km[v], k + 32 * v), (__m512bh)qv[v]);
        acc[jj] = a;
      }
      _mm512_storeu_ps(sc + x * kTileKeys + j, _mm512_mul_ps(hsum16(acc), scale));
    }
  }
  for (; j < n; ++j) {
    if (j + kPrefetchKeys < n) {
      prefetch_row(kp[j + kPrefetchKeys], d);
      prefetch_row(vp[j + kPrefetchKeys], c.dv);
    }
    __m512i kv[8];
    for (int v = 0; v < nv; ++v) kv[v] = _mm512_maskz_loadu_epi16(km[v], kp[j] + 32 * v);
    for (int x = 0; x < G; ++x) {
      const c10::BFloat16* q = q0 + x * qhs;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int v = 0;
      for (; v + 1 < nv; v += 2) {
        // masked: never read past the q row (the tensor may end there)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)kv[v], (__m512bh)_mm512_maskz_loadu_epi16(km[v], q + 32 * v));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)kv[v + 1], (__m512bh)_mm512_maskz_loadu_epi16(km[v + 1], q + 32 * v + 32));
      }
      if (v < nv) a0 = _mm512_dpbf16_ps(a0, (__m512bh)kv[v], (__m512bh)_mm512_maskz_loadu_epi16(km[v], q + 32 * v));
      sc[x * kTileKeys + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * c.score_scale;
    }
  }
}
// fp32 FMAs for every dtype (d <= 256).
template <typename T>
struct OpsAvx512 {
  static constexpr bool kGroup = true;
  static PFA_AVX512 inline void scores_group(const KvCtx& c, const KvScratch& w, const T* q0, int64_t qhs, int G,
                                             const T* const* kp, const T* const* vp, int n, float* sc) {
    scores_group_avx512<T>(c, w.qf, q0, qhs, G, kp, vp, n, sc);
  }
};

// bf16 dot products for the scores (d <= 256).
struct OpsAvx512Bf16 {
  using T = c10::BFloat16;
  static constexpr bool kGroup = true;
  static PFA_AVX512_BF16 inline void scores_group(const KvCtx& c, const KvScratch&, const T* q0, int64_t qhs, int G,
                                                  const T* const* kp, const T* const* vp, int n, float* sc) {
    scores_group_bf16(c, q0, qhs, G, kp, vp, n, sc);
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

// Row pointers of keys [j0, j0 + n) of sequence b, kv head hk, into kp / vp.
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

template <class Ops, typename T>
PFA_INLINE void kv_task(const KvCtx& c, const KvScratch& w, const KvTask& t) {
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, t.b);
  const int g = c.group, rows = c.rows;
  const int c0 = int(int64_t(t.chunk) * c.chunk);
  const int c1 = int(std::min<int64_t>(si.len_k, int64_t(c0) + c.chunk));
  // Row r is query row i = r / g of head hk * g + r % g: rows of one query
  // row share a key range.
  int ulo = c1, uhi = c0;
  for (int i = 0; i < p.seqlen_q; ++i) {
    const int lo = std::max(si.key_lo(p, i), c0), hi = std::min(si.key_hi(p, i), c1);
    if (lo < hi) {
      ulo = std::min(ulo, lo);
      uhi = std::max(uhi, hi);
    }
  }
  for (int r = 0; r < rows; ++r) {
    w.m[r] = -kInf;
    w.l[r] = 0.0f;
  }
  std::fill(w.acc, w.acc + int64_t(rows) * c.dv, 0.0f);
  const T** kp = reinterpret_cast<const T**>(w.kp);
  const T** vp = reinterpret_cast<const T**>(w.vp);
  for (int j0 = ulo; j0 < uhi; j0 += kTileKeys) {
    const int n = std::min(kTileKeys, uhi - j0);
    tile_pointers<T>(p, t.b, t.hk, j0, n, kp, vp);
#if PFA_X86
    // The first rows of the next tile, which the scores loop's prefetch
    // (kPrefetchKeys ahead, inside a tile) does not reach.
    if (j0 + n < uhi) {
      const int pn = std::min(kPrefetchKeys, uhi - j0 - n);
      const T** kq = kp + kTileKeys;
      const T** vq = vp + kTileKeys;
      tile_pointers<T>(p, t.b, t.hk, j0 + n, pn, kq, vq);
      for (int j = 0; j < pn; ++j) {
        prefetch_row(kq[j], c.d);
        prefetch_row(vq[j], c.dv);
      }
    }
#endif
    for (int i = 0; i < p.seqlen_q; ++i) {
      const int lo = std::max({si.key_lo(p, i), c0, j0}), hi = std::min({si.key_hi(p, i), c1, j0 + n});
      if (lo >= hi) continue;
      const T* q0 = static_cast<const T*>(p.q) + int64_t(t.b) * p.q_batch_stride + int64_t(i) * p.q_row_stride +
                    int64_t(t.hk * g) * p.q_head_stride;
      const int nk = hi - lo, r0 = i * g;
      if constexpr (Ops::kGroup) {
#if PFA_X86
        Ops::scores_group(c, w, q0, p.q_head_stride, g, kp + (lo - j0), vp + (lo - j0), nk, w.sc);
        if (c.softcap)
          for (int x = 0; x < g; ++x)
            for (int j = 0; j < nk; ++j) w.sc[x * kTileKeys + j] = c.cap_log2 * tanh_approx(w.sc[x * kTileKeys + j]);
        if (c.alibi)
          for (int x = 0; x < g; ++x)
            add_alibi(w.sc + x * kTileKeys, nk, alibi_slope2(p, t.b, t.hk * g + x), int64_t(i) + si.offset - lo);
        softmax_group_avx512(g, nk, w.sc, w.m + r0, w.l + r0, w.alpha);
        pv_group_avx512<T>(g, c.dv, vp + (lo - j0), nk, w.sc, w.acc + int64_t(r0) * c.dv, w.alpha);
#endif
      } else {
        for (int x = 0; x < g; ++x) {
          const int r = r0 + x;
          Ops::scores(c, w, q0 + int64_t(x) * p.q_head_stride, kp + (lo - j0), nk, w.sc);
          if (c.softcap)
            for (int j = 0; j < nk; ++j) w.sc[j] = c.cap_log2 * tanh_approx(w.sc[j]);
          if (c.alibi) add_alibi(w.sc, nk, alibi_slope2(p, t.b, t.hk * g + x), int64_t(i) + si.offset - lo);
          Ops::softmax_pv(c, vp + (lo - j0), nk, w.sc, w.acc + int64_t(r) * c.dv, w.m[r], w.l[r]);
        }
      }
    }
  }
  if (chunks_of(c, si.len_k) == 1) {
    // The whole sequence in one task: normalise and write out / lse.
    for (int r = 0; r < rows; ++r) {
      const int i = r / g, h = t.hk * g + r % g;
      const bool empty = w.m[r] == -kInf || w.l[r] == 0.0f;  // NaN sums propagate
      const float inv = empty ? 0.0f : 1.0f / w.l[r];
      T* o = static_cast<T*>(p.o) + int64_t(t.b) * p.o_batch_stride + int64_t(i) * p.o_row_stride +
             int64_t(h) * p.o_head_stride;
      const float* a = w.acc + int64_t(r) * c.dv;
      for (int x = 0; x < c.dv; ++x) o[x] = from_f32<T>(a[x] * inv);
      p.lse[si.lse_index(p, h, i)] = empty ? -kInf : (w.m[r] + std::log2(w.l[r])) * kLn2;
    }
  } else {
    const int64_t base = ((int64_t(t.b) * p.num_heads_k + t.hk) * c.max_chunks + t.chunk) * rows;
    std::copy(w.m, w.m + rows, c.part_m + base);
    std::copy(w.l, w.l + rows, c.part_l + base);
    std::copy(w.acc, w.acc + int64_t(rows) * c.dv, c.part_acc + base * c.dv);
  }
}

// Combines the chunks of one (sequence, kv head): O = sum_c 2^(m_c - M) acc_c
// / L, L = sum_c 2^(m_c - M) l_c, lse = ln2 (M + log2 L).
template <typename T>
void merge_unit(const KvCtx& c, int b, int hk, int nch) {
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, b);
  const int g = c.group;
  std::vector<float> out(c.dv);
  for (int r = 0; r < c.rows; ++r) {
    const int i = r / g, h = hk * g + r % g;
    const int64_t base = (int64_t(b) * p.num_heads_k + hk) * c.max_chunks * c.rows + r;
    float mmax = -kInf;
    for (int ch = 0; ch < nch; ++ch) mmax = std::max(mmax, c.part_m[base + int64_t(ch) * c.rows]);
    float lsum = 0.0f;
    std::fill(out.begin(), out.end(), 0.0f);
    if (mmax != -kInf) {
      for (int ch = 0; ch < nch; ++ch) {
        const int64_t at = base + int64_t(ch) * c.rows;
        const float wgt = exp2_approx(c.part_m[at] - mmax);
        if (c.part_m[at] == -kInf) continue;
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
}

// ---- entry points per instruction set --------------------------------------

using KvTaskFn = void (*)(const KvCtx&, const KvScratch&, const KvTask&);

template <typename T>
void task_portable(const KvCtx& c, const KvScratch& w, const KvTask& t) {
  kv_task<OpsPortable<T>, T>(c, w, t);
}
#if PFA_X86
template <typename T>
PFA_AVX512 __attribute__((flatten)) void task_avx512(const KvCtx& c, const KvScratch& w, const KvTask& t) {
  kv_task<OpsAvx512<T>, T>(c, w, t);
}
PFA_AVX512_BF16 __attribute__((flatten)) void task_avx512_bf16(const KvCtx& c, const KvScratch& w,
                                                               const KvTask& t) {
  kv_task<OpsAvx512Bf16, c10::BFloat16>(c, w, t);
}
#endif

template <typename T>
KvTaskFn task_fn_for(const KvCtx& c) {
  const CpuPath path = cpu_path(c.p->dtype);
#if PFA_X86
  // The AVX-512 row steps hold q in registers: head dims up to 256. AVX2
  // machines take the portable steps (the compiler vectorises their loops).
  if (c.d <= 256) {
    if constexpr (std::is_same<T, c10::BFloat16>::value) {
      if (path == CpuPath::kAvx512Bf16) return &task_avx512_bf16;
    }
    if (path >= CpuPath::kAvx512) return &task_avx512<T>;
  }
#endif
  (void)path;
  return &task_portable<T>;
}

template <typename T>
void run_kvcache(KvCtx& c) {
  const AttentionFwdParams& p = *c.p;
  std::vector<KvTask> tasks;
  std::vector<int64_t> cost;
  std::vector<int> nchunks(size_t(p.batch));
  bool any_split = false;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    nchunks[b] = chunks_of(c, si.len_k);
    any_split |= nchunks[b] > 1;
    for (int hk = 0; hk < p.num_heads_k; ++hk)
      for (int ch = 0; ch < nchunks[b]; ++ch) {
        tasks.push_back(KvTask{b, hk, ch});
        cost.push_back(std::min<int64_t>(c.chunk, si.len_k - int64_t(ch) * c.chunk));
      }
  }
  std::vector<float> parts;
  if (any_split) {
    const int64_t slots = int64_t(p.batch) * p.num_heads_k * c.max_chunks * c.rows;
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
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf(size_t(int64_t(c.group) * (kTileKeys + c.d + 1) + 2 * c.rows + int64_t(c.rows) * c.dv));
    std::vector<const void*> ptrs(2 * (kTileKeys + kPrefetchKeys));
    KvScratch w;
    w.sc = buf.data();
    w.qf = w.sc + int64_t(c.group) * kTileKeys;
    w.alpha = w.qf + int64_t(c.group) * c.d;
    w.m = w.alpha + c.group;
    w.l = w.m + c.rows;
    w.acc = w.l + c.rows;
    w.kp = ptrs.data();
    w.vp = ptrs.data() + kTileKeys + kPrefetchKeys;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(c, w, tasks[size_t(order[size_t(i)])]);
  });
  if (any_split) {
    const int64_t units = int64_t(p.batch) * p.num_heads_k;
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int b = int(u / p.num_heads_k), hk = int(u % p.num_heads_k);
        if (nchunks[b] > 1) merge_unit<T>(c, b, hk, nchunks[b]);
      }
    });
  }
}

}  // namespace

int64_t kvcache_chunk_keys(const AttentionFwdParams& p) {
  int64_t max_len = 0;
  for (int b = 0; b < p.batch; ++b) max_len = std::max<int64_t>(max_len, SeqInfo(p, b).len_k);
  max_len = std::max<int64_t>(max_len, 1);
  if (p.num_splits > 0) return std::max<int64_t>(16, round_up((max_len + p.num_splits - 1) / p.num_splits, 16));
  const int64_t units = int64_t(p.batch) * p.num_heads_k;
  const int64_t rows = int64_t(p.seqlen_q) * (p.num_heads / p.num_heads_k);
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
  c.rows = p.seqlen_q * c.group;
  c.softcap = p.softcap > 0.0f;
  c.score_scale = c.softcap ? p.scale / p.softcap : p.scale * kLog2e;
  c.cap_log2 = c.softcap ? p.softcap * kLog2e : 0.0f;
  c.alibi = p.alibi_slopes != nullptr;
  c.chunk = kvcache_chunk_keys(p);
  int64_t max_len = 1;
  for (int b = 0; b < p.batch; ++b) max_len = std::max<int64_t>(max_len, SeqInfo(p, b).len_k);
  c.max_chunks = int((max_len + c.chunk - 1) / c.chunk);
  switch (p.dtype) {
    case DType::kFloat16: run_kvcache<c10::Half>(c); break;
    case DType::kBFloat16: run_kvcache<c10::BFloat16>(c); break;
    case DType::kFloat32:
    default: run_kvcache<float>(c); break;
  }
}

}  // namespace cpu
}  // namespace pyfastattn
