// Does the KV-cache kernel's compute overlap its memory stream? (issue 18;
// PERF_NOTES.md, "The memory structure, measured outside the kernel".) The
// kernel's real pattern (csrc/cpu/attention_kvcache.cpp, v9) in a standalone loop:
// 32 query rows (8 kv heads x 4), bf16 K and V caches [keys][8][128]
// (2 KB rows, K and V separate arrays), 64-key tiles; per tile a scores pass
// (per kv head: 4 rows x 16 keys of bf16 dot products, one transpose-add tree
// per 16 keys), a softmax (exp2 polynomial), a P V pass (per kv head: fp32
// FMAs, accumulators in registers over the tile). Only the memory structure
// changes between variants; the arithmetic is the same.
//
//   g++ -O3 -march=native -fopenmp -o /tmp/kvmicro benchmarks/kvcache_overlap_micro.cpp
//   /tmp/kvmicro [threads] [rounds] [variant,variant,...]   (default 1 7, all)
// Columns: wall and CPU ms per step (CPU: per thread, what a shared box still
// measures), "comp": the same variant over an L2-resident 128-key window (the
// compute, prefetch instructions included), "of prb": the probe's time over
// the step's, "sum?": (step - comp) / probe, 1 when compute and memory add up,
// 0 when the memory is hidden. Compare variants of one run only.
#include <immintrin.h>
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

constexpr int HK = 8, D = 128, G = 4, ROWS = HK * G, TK = 64;
constexpr int ROW_ELEMS = HK * D;              // bf16 per cache row
constexpr int ROW_BYTES = ROW_ELEMS * 2;       // 2 KB
constexpr int TILE_LINES = TK * ROW_BYTES / 64;  // 2048 lines per K (or V) tile
using bf = uint16_t;

static double tnow(clockid_t c) {
  timespec ts;
  clock_gettime(c, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static inline __m512 hsum16(const __m512* v) {
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

static inline __m512 exp2v(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 cvt16(const bf* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// A list of lines walked in order a few at a time (prefetch or touch).
enum Kind { kNone, kT0, kT1, kT2, kNTA, kLoad };
struct Cursor {
  const char* base[2] = {nullptr, nullptr};  // two streams, interleaved line by line
  int64_t next = 0, count = 0;               // lines per stream
  Kind kind = kNone;
  int64_t stride = 1;  // lines between the lines walked
  bool head_major = false;  // walk a tile's lines head slice by head slice (the demand order), not in address order
  inline int64_t off(int64_t i) const {
    if (!head_major) return 64 * stride * i;
    const int64_t lines_per_slice = D * 2 / 64, head = i / (TK * lines_per_slice), rem = i % (TK * lines_per_slice);
    return (rem / lines_per_slice) * ROW_BYTES + head * D * 2 + 64 * (rem % lines_per_slice);
  }
  inline void one(const char* p) {
    switch (kind) {
      case kT0: _mm_prefetch(p, _MM_HINT_T0); break;
      case kT1: _mm_prefetch(p, _MM_HINT_T1); break;
      case kT2: _mm_prefetch(p, _MM_HINT_T2); break;
      case kNTA: _mm_prefetch(p, _MM_HINT_NTA); break;
      case kLoad: asm volatile("movzbl (%0), %%eax" ::"r"(p) : "eax", "memory"); break;
      default: break;
    }
  }
  inline void step(int64_t k) {  // k lines of each stream
    const int64_t e = std::min(count, next + k);
    for (; next < e; ++next) {
      if (base[0]) one(base[0] + off(next));
      if (base[1]) one(base[1] + off(next));
    }
  }
};

struct Variant {
  std::string id, name;
  bool keymajor = false;  // demand in address order (key after key, every head) instead of head-major
  Kind rowpf = kNone;     // the kernel's row prefetches: V of this tile in scores, K of next tile in P V
  Kind touch = kNone;     // sequential walk of tile t + dist (K and V) spread over tile t's passes
  int dist = 1;
  Kind l1pf = kNone;      // head-major prefetch of the next kv head's slices of this tile (L2 -> L1)
  bool burst = false;     // touch the whole tile t + dist before tile t (not spread)
  int stride = 1;         // touch every stride-th line only (train the L2 streamer, let it fetch the rest)
  int far = 0;            // v8's primes: the first line of every far-th K and V row of the next tile, over the scores pass
  bool masked = false;    // P V loads V through a mask (as the kernel's pv_quad_regs)
  int rowstride = 1;      // the row prefetches ask for every rowstride-th line only
  bool rowhm = false;     // the row prefetches walk the tile head slice by head slice (as the demand)
  bool pairs = false;     // P V in bf16 dot products on key pairs (P rounded to bf16; accumulators in unpack order)
};

struct Work {
  alignas(64) bf q[ROWS][D];
  alignas(64) float sc[ROWS][TK];
  alignas(64) uint32_t pp[ROWS][TK / 2];  // P as bf16 pairs (keys 2i, 2i + 1)
  alignas(64) float acc[ROWS][D];
  alignas(64) float m[ROWS], l[ROWS], alpha[ROWS];
  alignas(64) float part[ROWS][16][16];  // key-major partial sums
};

// One head's scores over 64 keys (kernel order: 16-key blocks, 4 rows each).
static inline void scores_head(Work& w, const bf* K, int hl, Cursor& cur, int per_block, const Variant& v,
                               int64_t j0) {
  for (int j = 0; j < TK; j += 16) {
    cur.step(per_block);
    if (v.l1pf != kNone && hl + 1 < HK)
      for (int jj = 0; jj < 16; ++jj)
        for (int l = 0; l < 4; ++l)
          _mm_prefetch((const char*)(K + (j0 + j + jj) * ROW_ELEMS + (hl + 1) * D) + 64 * l, _MM_HINT_T0);
    for (int x = 0; x < G; ++x) {
      const bf* q = w.q[hl * G + x];
      __m512i qv[4];
      for (int u = 0; u < 4; ++u) qv[u] = _mm512_load_si512(q + 32 * u);
      __m512 a[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj) {
        const bf* k = K + (j0 + j + jj) * ROW_ELEMS + hl * D;
        __m512 s = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(k + 32 * u), (__m512bh)qv[u]);
        a[jj] = s;
      }
      _mm512_storeu_ps(&w.sc[hl * G + x][j], _mm512_mul_ps(hsum16(a), _mm512_set1_ps(0.1275f)));
    }
  }
}

// Key-major scores: key after key, all heads (address order), partials to L1.
static inline void scores_keymajor(Work& w, const bf* K, int64_t j0, Cursor& cur, int per_block) {
  for (int j = 0; j < TK; j += 16) {
    cur.step(per_block);
    for (int jj = 0; jj < 16; ++jj) {
      const bf* kr = K + (j0 + j + jj) * ROW_ELEMS;
      for (int hl = 0; hl < HK; ++hl) {
        __m512i kv[4];
        for (int u = 0; u < 4; ++u) kv[u] = _mm512_loadu_si512(kr + hl * D + 32 * u);
        for (int x = 0; x < G; ++x) {
          const bf* q = w.q[hl * G + x];
          __m512 s = _mm512_setzero_ps();
          for (int u = 0; u < 4; ++u) s = _mm512_dpbf16_ps(s, (__m512bh)kv[u], (__m512bh)_mm512_load_si512(q + 32 * u));
          _mm512_store_ps(w.part[hl * G + x][jj], s);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      __m512 a[16];
      for (int jj = 0; jj < 16; ++jj) a[jj] = _mm512_load_ps(w.part[r][jj]);
      _mm512_storeu_ps(&w.sc[r][j], _mm512_mul_ps(hsum16(a), _mm512_set1_ps(0.1275f)));
    }
  }
}

static inline void softmax(Work& w) {
  for (int r = 0; r < ROWS; ++r) {
    __m512 mx = _mm512_set1_ps(-1e30f);
    for (int j = 0; j < TK; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(&w.sc[r][j]));
    const float mnew = std::max(w.m[r], _mm512_reduce_max_ps(mx));
    w.alpha[r] = w.m[r] == -1e30f ? 0.f : 1.0f;  // cheap stand-in for exp2(m - mnew)
    w.m[r] = mnew;
    const __m512 u = _mm512_set1_ps(mnew);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < TK; j += 16) {
      const __m512 e = exp2v(_mm512_sub_ps(_mm512_loadu_ps(&w.sc[r][j]), u));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(&w.sc[r][j], e);
    }
    w.l[r] = w.l[r] * w.alpha[r] + _mm512_reduce_add_ps(sum);
  }
}

// One head's P V over 64 keys (kernel order: 64 columns at a time, 4 rows).
static inline void pv_head(Work& w, const bf* V, int hl, int64_t j0, Cursor& cur, int per_key, const Variant& v) {
  if (v.l1pf != kNone && hl + 1 < HK)
    for (int j = 0; j < TK; ++j)
      for (int l = 0; l < 4; ++l)
        _mm_prefetch((const char*)(V + (j0 + j) * ROW_ELEMS + (hl + 1) * D) + 64 * l, _MM_HINT_T0);
  __mmask16 km[4];
  for (int u = 0; u < 4; ++u) km[u] = __mmask16(0xFFFF >> (w.m[0] < -1e31f ? 1 : 0));  // all-ones, unknown to the compiler
  if (v.pairs) {  // two keys' V rows interleaved (unpacklo / unpackhi_epi16) as vdpbf16ps operands
    for (int t = 0; t < G; ++t) {
      const float* sr = w.sc[hl * G + t];
      for (int j = 0; j < TK; j += 32)
        _mm512_store_si512(&w.pp[hl * G + t][j / 2],
                           (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sr + j + 16), _mm512_loadu_ps(sr + j)));
    }
    for (int x0 = 0; x0 < D; x0 += 64) {
      __m512 o[G][4];
      for (int t = 0; t < G; ++t) {
        const __m512 a = _mm512_set1_ps(w.alpha[hl * G + t]);
        for (int u = 0; u < 4; ++u) o[t][u] = _mm512_mul_ps(a, _mm512_load_ps(&w.acc[hl * G + t][x0 + 16 * u]));
      }
      for (int j = 0; j < TK; j += 2) {
        if (x0 == 0) cur.step(2 * per_key);
        const bf* va = V + (j0 + j) * ROW_ELEMS + hl * D + x0;
        const bf* vb = va + ROW_ELEMS;
        __m512i vv[4];
        for (int h = 0; h < 2; ++h) {
          const __m512i a = _mm512_loadu_si512(va + 32 * h), b = _mm512_loadu_si512(vb + 32 * h);
          vv[2 * h] = _mm512_unpacklo_epi16(a, b);
          vv[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
        }
        for (int t = 0; t < G; ++t) {
          const __m512i pj = _mm512_set1_epi32((int)w.pp[hl * G + t][j / 2]);
          for (int u = 0; u < 4; ++u) o[t][u] = _mm512_dpbf16_ps(o[t][u], (__m512bh)vv[u], (__m512bh)pj);
        }
      }
      for (int t = 0; t < G; ++t)
        for (int u = 0; u < 4; ++u) _mm512_store_ps(&w.acc[hl * G + t][x0 + 16 * u], o[t][u]);
    }
    return;
  }
  for (int x0 = 0; x0 < D; x0 += 64) {
    __m512 o[G][4];
    for (int t = 0; t < G; ++t) {
      const __m512 a = _mm512_set1_ps(w.alpha[hl * G + t]);
      for (int u = 0; u < 4; ++u) o[t][u] = _mm512_mul_ps(a, _mm512_load_ps(&w.acc[hl * G + t][x0 + 16 * u]));
    }
    for (int j = 0; j < TK; ++j) {
      if (x0 == 0) cur.step(per_key);
      const bf* vr = V + (j0 + j) * ROW_ELEMS + hl * D + x0;
      __m512 vv[4];
      if (v.masked) {
        for (int u = 0; u < 4; ++u)
          vv[u] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(km[u], vr + 16 * u)), 16));
      } else {
        for (int u = 0; u < 4; ++u) vv[u] = cvt16(vr + 16 * u);
      }
      for (int t = 0; t < G; ++t) {
        const __m512 pj = _mm512_set1_ps(w.sc[hl * G + t][j]);
        for (int u = 0; u < 4; ++u) o[t][u] = _mm512_fmadd_ps(pj, vv[u], o[t][u]);
      }
    }
    for (int t = 0; t < G; ++t)
      for (int u = 0; u < 4; ++u) _mm512_store_ps(&w.acc[hl * G + t][x0 + 16 * u], o[t][u]);
  }
}

// Key-major P V: key after key, every head (address order).
static inline void pv_keymajor(Work& w, const bf* V, int64_t j0, Cursor& cur, int per_group) {
  for (int r = 0; r < ROWS; ++r)
    for (int x = 0; x < D; x += 16)
      _mm512_store_ps(&w.acc[r][x], _mm512_mul_ps(_mm512_set1_ps(w.alpha[r]), _mm512_load_ps(&w.acc[r][x])));
  for (int j = 0; j < TK; j += 4) {
    cur.step(per_group);
    for (int hl = 0; hl < HK; ++hl)
      for (int x0 = 0; x0 < D; x0 += 64) {
        __m512 o[G][4];
        for (int t = 0; t < G; ++t)
          for (int u = 0; u < 4; ++u) o[t][u] = _mm512_load_ps(&w.acc[hl * G + t][x0 + 16 * u]);
        for (int jj = 0; jj < 4; ++jj) {
          const bf* vr = V + (j0 + j + jj) * ROW_ELEMS + hl * D + x0;
          __m512 vv[4];
          for (int u = 0; u < 4; ++u) vv[u] = cvt16(vr + 16 * u);
          for (int t = 0; t < G; ++t) {
            const __m512 pj = _mm512_set1_ps(w.sc[hl * G + t][j + jj]);
            for (int u = 0; u < 4; ++u) o[t][u] = _mm512_fmadd_ps(pj, vv[u], o[t][u]);
          }
        }
        for (int t = 0; t < G; ++t)
          for (int u = 0; u < 4; ++u) _mm512_store_ps(&w.acc[hl * G + t][x0 + 16 * u], o[t][u]);
      }
  }
}

// Keys [k0, k1) of K / V (keys past `wrap` wrap around: compute-only runs).
static void run_range(Work& w, const bf* K, const bf* V, int64_t k0, int64_t k1, const Variant& v) {
  for (int r = 0; r < ROWS; ++r) {
    w.m[r] = -1e30f;
    w.l[r] = 0;
  }
  memset(w.acc, 0, sizeof(w.acc));
  for (int64_t j0 = k0; j0 < k1; j0 += TK) {
    const int64_t jn = j0 + TK;  // next tile
    const bool has_next = jn < k1;
    // Row prefetches of the kernel (v9): V of this tile during scores, K of next during P V.
    Cursor pv_rows, pk_rows;
    if (v.rowpf != kNone) {
      pv_rows.base[0] = (const char*)(V + j0 * ROW_ELEMS);
      pv_rows.count = TILE_LINES / v.rowstride;
      pv_rows.stride = v.rowstride;
      pv_rows.head_major = v.rowhm;
      pv_rows.kind = v.rowpf;
      if (has_next) {
        pk_rows.base[0] = (const char*)(K + jn * ROW_ELEMS);
        pk_rows.count = TILE_LINES / v.rowstride;
        pk_rows.stride = v.rowstride;
        pk_rows.head_major = v.rowhm;
        pk_rows.kind = v.rowpf;
      }
    }
    // The touch of tile t + dist, K and V line by line, spread over both passes.
    Cursor touch;
    const int64_t jt = j0 + int64_t(v.dist) * TK;
    if (v.touch != kNone && jt < k1) {
      touch.base[0] = (const char*)(K + jt * ROW_ELEMS);
      touch.base[1] = (const char*)(V + jt * ROW_ELEMS);
      touch.count = TILE_LINES / v.stride;
      touch.stride = v.stride;
      touch.kind = v.touch;
      if (v.burst) touch.step(TILE_LINES);
    }
    Cursor farc;
    if (v.far && has_next) {
      farc.base[0] = (const char*)(K + jn * ROW_ELEMS);
      farc.base[1] = (const char*)(V + jn * ROW_ELEMS);
      farc.stride = 32 * v.far;  // 2 KB rows = 32 lines
      farc.count = TK / v.far;
      farc.kind = kT0;
    }
    if (v.keymajor) {
      // scores: 4 blocks, P V: 16 groups of 4 keys
      if (v.touch != kNone) {
        scores_keymajor(w, K, j0, touch, 256);  // 1024 lines per stream
        softmax(w);
        pv_keymajor(w, V, j0, touch, 64);  // 1024
      } else {
        scores_keymajor(w, K, j0, pv_rows, 512);  // 2048 V lines
        softmax(w);
        pv_keymajor(w, V, j0, pk_rows, 128);  // 2048 K lines of the next tile
      }
    } else {
      // scores: 8 heads x 4 blocks; P V: 8 heads x 64 keys.
      for (int hl = 0; hl < HK; ++hl) {
        if (v.touch != kNone) {
          scores_head(w, K, hl, touch, (32 + v.stride - 1) / v.stride, v, j0);  // 32 blocks x 32 = 1024 lines per stream
        } else {
          scores_head(w, K, hl, pv_rows, 64, v, j0);  // 32 x 64 = 2048 V lines
          if (v.far) farc.step(TK / v.far / HK);
        }
      }
      softmax(w);
      for (int hl = 0; hl < HK; ++hl) {
        if (v.touch != kNone) {
          pv_head(w, V, hl, j0, touch, v.stride == 1 ? 2 : 1, v);  // 512 keys x 2 = 1024 lines per stream
        } else {
          pv_head(w, V, hl, j0, pk_rows, 4, v);  // 512 x 4 = 2048 K lines
        }
      }
    }
    touch.step(TILE_LINES);
    farc.step(TK);
    pv_rows.step(TILE_LINES);
    pk_rows.step(TILE_LINES);
  }
}

// As a shared library (-shared -fPIC -DKV_MICRO_LIB), for
// benchmarks/kvcache_overlap_vs_kernel.py: one step of variant `id` over
// caller-owned K / V ([keys][8][128] bf16, contiguous), CPU ms of this thread.
extern "C" double kv_micro_step(const void* K, const void* V, long keys, const char* id) {
  static Work w;
  static bool init = false;
  if (!init) {
    for (int r = 0; r < ROWS; ++r)
      for (int x = 0; x < D; ++x) w.q[r][x] = 0x3c00 + (r * 3 + x) % 31;
    init = true;
  }
  Variant v;
  v.rowpf = kT0;
  v.far = 1;
  const std::string s = id;
  if (s == "a-mask" || s == "a-t2-mask") v.masked = true;
  if (s == "a-t2" || s == "a-t2-mask") v.rowpf = kT2;  // the row prefetches into L2 (v18, Zen 4)
  if (s == "b-head") v.rowpf = kNone, v.far = 0;
  if (s == "b-head-mask") v.rowpf = kNone, v.far = 0, v.masked = true;
  const double c0 = tnow(CLOCK_THREAD_CPUTIME_ID);
  for (long c = 0; c < keys; c += 512) run_range(w, (const bf*)K, (const bf*)V, c, std::min<long>(keys, c + 512), v);
  return 1e3 * (tnow(CLOCK_THREAD_CPUTIME_ID) - c0);
}

#ifndef KV_MICRO_LIB
int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 1;
  const int rounds = argc > 2 ? atoi(argv[2]) : 5;
  const int64_t keys = 32768;  // per step, all threads together: 128 MiB of K + V
  const size_t bytes = size_t(keys) * ROW_BYTES;
  bf* K = (bf*)aligned_alloc(4096, bytes);
  bf* V = (bf*)aligned_alloc(4096, bytes);
  for (size_t i = 0; i < bytes / 2; ++i) {
    K[i] = 0x3c00 + (i * 7 % 97);
    V[i] = 0x3c00 + (i * 13 % 89);
  }
  float* probe = (float*)aligned_alloc(4096, 2 * bytes);
  for (size_t i = 0; i < 2 * bytes / 4; ++i) probe[i] = 1.0f;
  std::vector<Work> works(threads);
  for (auto& w : works)
    for (int r = 0; r < ROWS; ++r)
      for (int x = 0; x < D; ++x) w.q[r][x] = 0x3c00 + (r * 3 + x) % 31;

  std::vector<Variant> vs;
  auto add = [&](const char* id, const char* name, bool keymajor, Kind rowpf, Kind touch = kNone, int dist = 1) {
    Variant v;
    v.id = id;
    v.name = name;
    v.keymajor = keymajor;
    v.rowpf = rowpf;
    v.touch = touch;
    v.dist = dist;
    vs.push_back(v);
    return &vs.back();
  };
  add("a", "head-major, T0 rows (kernel v9)", false, kT0)->far = 1;
  add("a-nofar", "  the same without the next tile's primes", false, kT0);
  add("a-mask", "  the same, V loads masked (as v9)", false, kT0)->far = 1;
  vs.back().masked = true;
  add("b", "key-major (address order), no prefetch", true, kNone);
  add("b-head", "head-major, no prefetch", false, kNone);
  add("b-head-mask", "head-major, no prefetch, V loads masked", false, kNone)->masked = true;
  add("b-pf", "key-major, T0 rows", true, kT0);
  add("c-load1", "head-major, load-touch of tile t+1", false, kNone, kLoad, 1);
  add("c-load2", "head-major, load-touch of tile t+2", false, kNone, kLoad, 2);
  add("c-t0", "head-major, T0-touch of tile t+1", false, kNone, kT0, 1);
  add("c-t1", "head-major, T1-touch of tile t+1", false, kNone, kT1, 1);
  add("c-t2", "head-major, T2-touch of tile t+2", false, kNone, kT2, 2);
  add("c-load1-l1", "c-load1 + T0 of the next head's slices", false, kNone, kLoad, 1)->l1pf = kT0;
  add("c-burst", "head-major, load-touch t+1 in one burst", false, kNone, kLoad, 1)->burst = true;
  add("c-key-load1", "key-major, load-touch of tile t+1", true, kNone, kLoad, 1);
  for (int st : {2, 4, 16, 64})
    for (Kind k : {kT0, kT1, kT2}) {
      char id[32], nm[64];
      snprintf(id, sizeof id, "e-t%d-%d", k == kT0 ? 0 : k == kT1 ? 1 : 2, st);
      snprintf(nm, sizeof nm, "head-major, T%d-touch t+1, every %d lines", k == kT0 ? 0 : k == kT1 ? 1 : 2, st);
      add(id, nm, false, kNone, k, 1)->stride = st;
    }
  // Address-order demand with sparse touches of tile t+1: one line per `st`
  // (32 = the first line of each 2 KB row, 64 = of each 4 KB page), so that
  // the hardware streamers fetch the rest of each page.
  for (int st : {8, 16, 32, 64})
    for (Kind k : {kT0, kT2}) {
      char id[32], nm[64];
      snprintf(id, sizeof id, "f-t%d-%d", k == kT0 ? 0 : 2, st);
      snprintf(nm, sizeof nm, "key-major, T%d-touch t+1, every %d lines", k == kT0 ? 0 : 2, st);
      add(id, nm, true, kNone, k, 1)->stride = st;
    }
  // a (T0) and, since session 10, a-t2 (the rows into L2: the structure the
  // kernel takes on Zen 4, v18) asking for every 2nd / 4th line only.
  for (Kind k : {kT0, kT2})
    for (int st : {2, 4}) {
      char id[32], nm[64];
      const char* base = k == kT0 ? "a" : "a-t2";
      snprintf(id, sizeof id, "%s-s%d", base, st);
      snprintf(nm, sizeof nm, "  %s, row prefetches of every %d-th line", base, st);
      add(id, nm, false, k)->far = 1;
      vs.back().rowstride = st;
    }
  for (Kind k : {kT1, kT2, kNTA}) {
    char id[32], nm[64];
    const char* h = k == kT1 ? "t1" : k == kT2 ? "t2" : "nta";
    snprintf(id, sizeof id, "a-%s", h);
    snprintf(nm, sizeof nm, "  a, row prefetches with hint %s", h);
    add(id, nm, false, k)->far = 1;
  }
  // Zen 4 (session 10): what else does or does not change with the rows in L2.
  add("a-t2-nofar", "  a-t2 without the next tile's primes", false, kT2);
  add("a-t2-mask", "  a-t2, V loads masked (as the kernel)", false, kT2)->far = 1;
  vs.back().masked = true;
  add("b-pf-t2", "key-major, T2 rows", true, kT2);
  add("a-hm", "  a, row prefetches in head-slice order", false, kT0)->far = 1;
  add("a-t2-hm", "  a-t2, row prefetches in head-slice order", false, kT2)->far = 1;
  vs.back().rowhm = true;
  add("a-t2-pairs", "  a-t2, P V in bf16 key pairs", false, kT2)->far = 1;
  vs.back().pairs = true;
  add("b-head-pairs", "  b-head, P V in bf16 key pairs", false, kNone)->pairs = true;
  vs.back().rowhm = true;
  add("a-hm-nofar", "  a-hm without the next tile's primes", false, kT0)->rowhm = true;
  std::vector<std::string> only;
  if (argc > 3)
    for (char* t = strtok(argv[3], ","); t; t = strtok(nullptr, ",")) only.push_back(t);
  auto wanted = [&](const Variant& v) { return only.empty() || std::find(only.begin(), only.end(), v.id) != only.end(); };

  // per variant: [round] -> (wall ms, cpu ms per thread, compute-only cpu ms)
  struct R { std::vector<double> wall, cpu, comp; };
  std::vector<R> res(vs.size());
  std::vector<double> probe_ms;
  const int64_t per = keys / threads;
  const int64_t small = 128;  // compute only: 128 keys (512 KB K+V), L2-resident, repeated
  for (int round = 0; round < rounds; ++round) {
    {  // probe: one pass summing the same bytes (fp32 view)
      double tot = 0, pcpu = 0;
#pragma omp parallel num_threads(threads) reduction(+ : tot, pcpu)
      {
        const int t = omp_get_thread_num();
        const double c0 = tnow(CLOCK_THREAD_CPUTIME_ID);
        const size_t n = 2 * bytes / 4 / threads;
        const float* p = probe + n * t;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t i = 0; i < n; i += 64) {
          a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
          a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
          a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
          a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
        }
        tot += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        pcpu += tnow(CLOCK_THREAD_CPUTIME_ID) - c0;
      }
      probe_ms.push_back(1e3 * pcpu / threads);  // CPU ms per thread, as the steps
      if (tot < 0) printf("x");
    }
    for (size_t vi = 0; vi < vs.size(); ++vi) {
      if (!wanted(vs[vi])) continue;
      const Variant& v = vs[vi];
      double cpu = 0;
      double t0 = tnow(CLOCK_MONOTONIC);
#pragma omp parallel num_threads(threads) reduction(+ : cpu)
      {
        const int t = omp_get_thread_num();
        const double c0 = tnow(CLOCK_THREAD_CPUTIME_ID);
        for (int64_t c = 0; c < per; c += 512) run_range(works[t], K, V, t * per + c, t * per + c + 512, v);
        cpu += tnow(CLOCK_THREAD_CPUTIME_ID) - c0;
      }
      res[vi].wall.push_back(1e3 * (tnow(CLOCK_MONOTONIC) - t0));
      res[vi].cpu.push_back(1e3 * cpu / threads);
      // compute only: the same number of tiles over an L2-resident 128-key window
      double cc = 0;
#pragma omp parallel num_threads(threads) reduction(+ : cc)
      {
        const int t = omp_get_thread_num();
        Variant vc = v;
        const double c0 = tnow(CLOCK_THREAD_CPUTIME_ID);
        for (int64_t c = 0; c < per; c += small) run_range(works[t], K, V, t * small * 0, small, vc);
        cc += tnow(CLOCK_THREAD_CPUTIME_ID) - c0;
      }
      res[vi].comp.push_back(1e3 * cc / threads);
    }
  }
  auto med = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    return x[x.size() / 2];
  };
  const double pm = med(probe_ms);
  printf("threads %d, %d rounds, 128 MiB K+V (32k keys x 8 heads x 128 bf16): probe %.2f CPU ms per thread = %.1f GB/s\n", threads,
         rounds, pm, 2 * bytes / pm / 1e6);
  printf("%-12s %-44s %8s %8s %8s %7s %7s\n", "id", "variant", "wall ms", "cpu ms", "comp ms", "of prb", "sum?");
  for (size_t vi = 0; vi < vs.size(); ++vi) {
    if (res[vi].wall.empty()) continue;
    const double w = med(res[vi].wall), c = med(res[vi].cpu), cp = med(res[vi].comp);
    // of prb: probe time / step CPU time; sum?: (step - compute) / probe (1: no overlap, 0: full overlap)
    printf("%-12s %-44s %8.2f %8.2f %8.2f %6.0f%% %7.2f\n", vs[vi].id.c_str(), vs[vi].name.c_str(), w, c, cp,
           100 * pm / c, (c - cp) / pm);
  }
}
#endif  // KV_MICRO_LIB
