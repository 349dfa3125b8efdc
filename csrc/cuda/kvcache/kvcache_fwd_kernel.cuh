// CUDA kernels of attention over a KV cache (pyfastattn.attention_with_kvcache):
//
//   kvcache_append_kernel   new keys / values (rotated) into the cache in
//                           place, and the rotated copy of q;
//   kvcache_split_kernel    one CTA per (sequence x kv head, query-row tile,
//                           key split): reads the cache where it lies (paged
//                           through the block table, or a cache row chosen by
//                           cache_batch_idx, from cache_leftpad on), online
//                           softmax over 16/32-key tiles, and writes either
//                           the output (one split) or a normalised partial and
//                           its LSE (several splits);
//   kvcache_combine_kernel  merges the partials of the splits by their LSE.
//
// Decode is memory-bound: a GQA group's query rows share every key and value
// the CTA loads, so the cache is read once per kv head (per row tile), with
// 16-byte cp.async copies double-buffered against the math. The math is on
// the CUDA cores in fp32 (a decode tile has 1-8 query rows: a 16-row MMA
// would be mostly padding).
//
// Semantics are those of params.h (the KV cache block): key j of sequence b
// is at cache position j + cache_leftpad[b], j < seqused_k[b]; masks aligned
// bottom-right; softcap then ALiBi on the scores. Every index the fields
// imply was checked on the host (csrc/attention/kvcache_api.cpp).
//
// Only the wrappers of sm80_primitives.cuh touch shared memory and move bulk
// data, so the emulator (emu/kvcache_fwd_emu_test.cc) runs this file as is.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../../attention/params.h"
#include "../attention/sm80_primitives.cuh"
#include "kvcache_fwd.h"

namespace pyfastattn {
namespace cuda {
namespace kvcache {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One compiled variant: element type and the head dim it holds (a smaller
// head dim runs with its extra columns zero-filled).
//   kRows    query rows per CTA (GQA group x query rows, flattened), sized so
//            that the 128 threads own one (row, 8-column chunk) each of O;
//   kBlockN  keys per tile: 32, or 16 at d = 256 to keep the double-buffered
//            K/V tiles at 32 KB (no shared-memory opt-in at any head dim).
template <typename Element_, int kHeadDim_>
struct KvCacheTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNThreads = 128;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
  static constexpr int kRows = kNThreads / kChunks;
  static constexpr int kBlockN = kHeadDim == 256 ? 16 : 32;
  static constexpr int kParts = 8;  // threads per key in the score step
  static constexpr int kKeysPerPass = kNThreads / kParts;
  static constexpr int kPasses = kBlockN / kKeysPerPass;
  static constexpr int kChunksPerPart = kChunks / kParts;
  static constexpr int kRowsPerWarp = kRows / 4;
  static constexpr int kOwnRows = (kRows + kParts - 1) / kParts;  // rows a thread finalises scores of
  static constexpr int kStages = 2;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head dims 64, 128, 256");
  static_assert(kRows * kChunks == kNThreads && kRows % 4 == 0, "one O chunk per thread");
  static_assert(kPasses >= 1 && kBlockN <= 32, "a tile's keys fit one warp's lanes");

  // Shared memory (bytes): K and V tiles per stage, Q (fp32, split in halves
  // of each 8-column chunk so that 8 threads reading 8 chunks hit 32 banks),
  // scores / probabilities [kRows][kSRow] (a lane per key; lanes past kBlockN
  // write zeros), per-row alpha, m and l [kRows][32] (one copy per lane of
  // the row's warp), and a dump slot per thread. Every lane of a warp stores
  // to shared memory at every st.shared: the emulator gathers them warp-wide
  // (its bank-conflict count), where a GPU would only predicate; the copies
  // cost 1.5-6 KB and one store per row per tile.
  static constexpr int kTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kSK = 0;
  static constexpr int kSV = kSK + kStages * kTileBytes;
  static constexpr int kSQ = kSV + kStages * kTileBytes;
  static constexpr int kSS = kSQ + kRows * kHeadDim * 4;
  static constexpr int kSRow = 36;  // floats per score row: 8 rows x 4 keys of a warp's stores hit 32 banks
  static constexpr int kSAlpha = kSS + kRows * kSRow * 4;
  static constexpr int kSM = kSAlpha + kRows * 32 * 4;
  static constexpr int kSL = kSM + kRows * 32 * 4;
  static constexpr int kSDump = kSL + kRows * 32 * 4;
  static constexpr int kSmemBytes = kSDump + kNThreads * 4;
  static_assert(kSmemBytes <= 48 * 1024, "no opt-in needed");
};

// The launch shape of the split kernel: x = sequence x kv head, y = query-row
// tile, z = key split.
struct KvCacheGrid {
  int64_t x, y, z;
  bool fits() const { return x <= 2147483647 && y <= 65535 && z <= 65535; }
};

inline KvCacheGrid kvcache_grid(const AttentionFwdParams& p, int rows_per_cta, int num_splits) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.num_heads / p.num_heads_k);
  return {int64_t(p.batch) * p.num_heads_k, (rows + rows_per_cta - 1) / rows_per_cta, num_splits};
}

template <typename Element>
PFA_ATTN_DEVICE void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = sm80::bits_to_float<Element>(w[i] & 0xffffu);
    f[2 * i + 1] = sm80::bits_to_float<Element>(w[i] >> 16);
  }
}

template <typename Element>
PFA_ATTN_DEVICE uint4 pack8(const float (&f)[8]) {
  return uint4{sm80::pack2<Element>(f[0], f[1]), sm80::pack2<Element>(f[2], f[3]),
               sm80::pack2<Element>(f[4], f[5]), sm80::pack2<Element>(f[6], f[7])};
}

PFA_ATTN_DEVICE uint32_t float_bits(float f) {
#if defined(PFA_ATTN_HOST_EMULATION)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#else
  return __float_as_uint(f);
#endif
}

PFA_ATTN_DEVICE int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }

PFA_ATTN_DEVICE float warp_max(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) v = fmaxf(v, sm80::shfl_xor(v, m));
  return v;
}

PFA_ATTN_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) v += sm80::shfl_xor(v, m);
  return v;
}

// ---- what a split CTA works on (both split kernels) -------------------------

// One query row of a CTA's tile as the score step sees it: its visible keys
// [lo, hi), its ALiBi slope (log2 units) and diagonal i + offset. A row past
// the end sees no key.
struct RowMask {
  int32_t lo = 0, hi = 0, diag = 0;
  float slope = 0.f;
};

// Sequence b and kv head hk (blockIdx.x), the tile's query rows [row0, row0 +
// rows_per_cta) of the flattened (query row i, GQA head) list (blockIdx.y;
// row rg is query row rg / group of head hk * group + rg % group), and this
// split's share [tile_begin, tile_end) of the tiles of block_n keys from k_lo
// that the tile's rows can see (blockIdx.z of num_splits).
struct SplitCta {
  int group, b, hk;
  SeqInfo seq;
  int64_t rows_total, row0;
  int32_t k_lo, k_hi, tile_begin, tile_end;

  PFA_ATTN_DEVICE SplitCta(const AttentionFwdParams& p, int rows_per_cta, int block_n, int num_splits)
      : group(p.num_heads / p.num_heads_k),
        b(int(blockIdx.x / p.num_heads_k)),
        hk(int(blockIdx.x % p.num_heads_k)),
        seq(p, b),
        rows_total(int64_t(p.seqlen_q) * group),
        row0(int64_t(blockIdx.y) * rows_per_cta) {
    const int64_t last_row = (row0 + rows_per_cta < rows_total ? row0 + rows_per_cta : rows_total) - 1;
    k_lo = seq.key_lo(p, row_i(row0));
    k_hi = seq.key_hi(p, row_i(last_row));
    const int32_t n_tiles = k_hi > k_lo ? (k_hi - k_lo + block_n - 1) / block_n : 0;
    const int32_t tiles_per_split = (n_tiles + num_splits - 1) / num_splits;
    tile_begin = imin(n_tiles, int32_t(blockIdx.z) * tiles_per_split);
    tile_end = imin(n_tiles, tile_begin + tiles_per_split);
  }
  PFA_ATTN_DEVICE int32_t row_i(int64_t rg) const { return int32_t(rg / group); }
  PFA_ATTN_DEVICE int row_h(int64_t rg) const { return hk * group + int(rg % group); }
  // The mask of row rg (empty past the last row).
  PFA_ATTN_DEVICE RowMask row_mask(const AttentionFwdParams& p, int64_t rg) const {
    RowMask r;
    if (rg < rows_total) {
      const int32_t i = row_i(rg);
      r.lo = seq.key_lo(p, i);
      r.hi = seq.key_hi(p, i);
      r.diag = i + seq.offset;
      if (p.alibi_slopes != nullptr)
        r.slope = p.alibi_slopes[int64_t(b) * p.alibi_batch_stride + row_h(rg)] * kLog2e;
    }
    return r;
  }
};

// ---- the score step's masks (both split kernels) ---------------------------

// A raw dot product q . k_j to the score in log2 units: scaled, capped
// (softcap), ALiBi; -inf where the row does not see key j.
struct ScoreMap {
  bool softcap;
  float dot_scale, cap_log2;
  PFA_ATTN_DEVICE explicit ScoreMap(const AttentionFwdParams& p)
      : softcap(p.softcap > 0.f), dot_scale(p.softcap > 0.f ? p.scale / p.softcap : p.scale_log2),
        cap_log2(p.softcap * kLog2e) {}
  PFA_ATTN_DEVICE float operator()(float dot, const RowMask& r, int32_t j) const {
    if (j < r.lo || j >= r.hi) return -INFINITY;
    const float s = softcap ? cap_log2 * sm80::fast_tanh(dot * dot_scale) : dot * dot_scale;
    return s - r.slope * fabsf(float(r.diag - j));
  }
};

// ---- append and rotary ------------------------------------------------------

// cos / sin entry `idx` of rotary row `pos` as float (table in q's dtype or fp32).
template <typename Element>
PFA_ATTN_DEVICE float rotary_entry(const void* table, bool fp32, int64_t pos, int64_t row_stride, int idx) {
  const int64_t off = pos * row_stride + idx;
  if (fp32) return static_cast<const float*>(table)[off];
  const uint16_t bits = static_cast<const uint16_t*>(table)[off];
  return sm80::bits_to_float<Element>(bits);
}

// One 16-byte chunk (8 columns starting at c * 8) of a rotated row. `src` is
// the row; the partner chunk of the half-split layout is read from it too.
// The rotary dim is a multiple of 16, so a chunk is wholly inside or outside
// it, and a half-split chunk's partner is a whole chunk.
template <typename Element>
PFA_ATTN_DEVICE uint4 rotate_chunk(const Element* src, int c, const KvAppendParams& a, int64_t pos) {
  const uint4 raw = sm80::ld_global_nc_v4(src + c * 8);
  const int rd = a.rotary_dim;
  if (c * 8 >= rd) return raw;
  float x[8], y[8], out[8];
  unpack8<Element>(raw, x);
  if (a.rotary_interleaved) {
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      const int i = (c * 8 + e) / 2;
      const float cs = rotary_entry<Element>(a.rotary_cos, a.rotary_fp32, pos, a.rotary_row_stride, i);
      const float sn = rotary_entry<Element>(a.rotary_sin, a.rotary_fp32, pos, a.rotary_row_stride, i);
      out[e] = x[e] * cs - x[e + 1] * sn;
      out[e + 1] = x[e] * sn + x[e + 1] * cs;
    }
  } else {
    const int half_chunks = rd / 16;
    const bool first = c < half_chunks;
    unpack8<Element>(sm80::ld_global_nc_v4(src + (first ? c + half_chunks : c - half_chunks) * 8), y);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = (first ? c : c - half_chunks) * 8 + e;
      const float cs = rotary_entry<Element>(a.rotary_cos, a.rotary_fp32, pos, a.rotary_row_stride, i);
      const float sn = rotary_entry<Element>(a.rotary_sin, a.rotary_fp32, pos, a.rotary_row_stride, i);
      out[e] = first ? x[e] * cs - y[e] * sn : y[e] * sn + x[e] * cs;
    }
  }
  return pack8<Element>(out);
}

// One thread per 16-byte chunk: k_new (rotated) and v_new into the cache at
// positions cache_seqlens[b] + s, then (rotary only) q into q_rot. 1-D grid.
template <typename Element>
__global__ void __launch_bounds__(128) kvcache_append_kernel(const __grid_constant__ AttentionFwdParams p,
                                                             const __grid_constant__ KvAppendParams a) {
  const int chunks = p.head_dim / 8;
  const int64_t n_kv = int64_t(p.batch) * a.s_new * p.num_heads_k * chunks;
  const int64_t n_q = a.rotary_dim > 0 ? int64_t(p.batch) * p.seqlen_q * p.num_heads * chunks : 0;
  const int64_t item = int64_t(blockIdx.x) * 128 + threadIdx.x;
  const int c = int(item % chunks);
  if (item < 2 * n_kv) {
    const bool is_v = item >= n_kv;
    int64_t rest = (is_v ? item - n_kv : item) / chunks;
    const int h = int(rest % p.num_heads_k);
    rest /= p.num_heads_k;
    const int s = int(rest % a.s_new);
    const int b = int(rest / a.s_new);
    const int64_t pos = int64_t(a.cache_seqlens[b]) + s;  // absolute cache position
    const int32_t j = int32_t(pos - (p.cache_leftpad ? p.cache_leftpad[b] : 0));
    if (is_v) {
      const auto* src = static_cast<const Element*>(a.v_new) + b * a.vn_batch_stride + s * a.vn_row_stride +
                        h * a.vn_head_stride;
      auto* dst = const_cast<Element*>(static_cast<const Element*>(p.v)) +
                  kv_row_offset(p, b, j, p.v_batch_stride, p.v_row_stride) + h * p.v_head_stride;
      sm80::st_global_v4(dst + c * 8, sm80::ld_global_nc_v4(src + c * 8));
    } else {
      const auto* src = static_cast<const Element*>(a.k_new) + b * a.kn_batch_stride + s * a.kn_row_stride +
                        h * a.kn_head_stride;
      auto* dst = const_cast<Element*>(static_cast<const Element*>(p.k)) +
                  kv_row_offset(p, b, j, p.k_batch_stride, p.k_row_stride) + h * p.k_head_stride;
      const uint4 val = a.rotary_dim > 0 ? rotate_chunk<Element>(src, c, a, pos) : sm80::ld_global_nc_v4(src + c * 8);
      sm80::st_global_v4(dst + c * 8, val);
    }
  } else if (item < 2 * n_kv + n_q) {
    int64_t rest = (item - 2 * n_kv) / chunks;
    const int h = int(rest % p.num_heads);
    rest /= p.num_heads;
    const int i = int(rest % p.seqlen_q);
    const int b = int(rest / p.seqlen_q);
    const int64_t pos = int64_t(a.cache_seqlens[b]) + (a.q_per_row ? i : 0);
    const auto* src =
        static_cast<const Element*>(a.q) + b * a.q_batch_stride + i * a.q_row_stride + h * a.q_head_stride;
    auto* dst = static_cast<Element*>(a.q_rot) + b * a.qr_batch_stride + i * a.qr_row_stride + h * a.qr_head_stride;
    sm80::st_global_v4(dst + c * 8, rotate_chunk<Element>(src, c, a, pos));
  }
}

// ---- split-KV attention -----------------------------------------------------

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    kvcache_split_kernel(const __grid_constant__ AttentionFwdParams p, const KvSplitOut w) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim, kChunks = Traits::kChunks, kRows = Traits::kRows;
  constexpr int kBlockN = Traits::kBlockN, kParts = Traits::kParts;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int d_chunks = p.head_dim / 8;
  // The rows, and the keys this CTA reads: the tile rows' visible range, split.
  const SplitCta cta(p, kRows, kBlockN, w.num_splits);
  const int b = cta.b, hk = cta.hk;
  const int64_t rows_total = cta.rows_total, row0 = cta.row0;
  const SeqInfo& seq = cta.seq;
  const int32_t k_lo = cta.k_lo, k_hi = cta.k_hi, tile_begin = cta.tile_begin, tile_end = cta.tile_end;

  const uint32_t smem = sm80::smem_u32(sm80::dynamic_smem());
  const uint32_t sK = smem + Traits::kSK, sV = smem + Traits::kSV, sQ = smem + Traits::kSQ;
  const uint32_t sS = smem + Traits::kSS, sAlpha = smem + Traits::kSAlpha;
  const uint32_t sM = smem + Traits::kSM, sL = smem + Traits::kSL, sDump = smem + Traits::kSDump;

  // ---- Q (fp32) into shared memory; rows past the end and columns past d are 0
  for (int idx = tid; idx < kRows * kChunks; idx += Traits::kNThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t rg = row0 + r;
    if (rg < rows_total && c < d_chunks) {
      const auto* q = static_cast<const Element*>(p.q) + int64_t(b) * p.q_batch_stride +
                      int64_t(cta.row_i(rg)) * p.q_row_stride + int64_t(cta.row_h(rg)) * p.q_head_stride;
      unpack8<Element>(sm80::ld_global_nc_v4(q + c * 8), f);
    }
    const uint32_t base = sQ + uint32_t(r * kHeadDim * 4 + c * 16);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sm80::st_shared_u32(base + e * 4, float_bits(f[e]));
      sm80::st_shared_u32(base + kHeadDim * 2 + e * 4, float_bits(f[e + 4]));
    }
  }

  // ---- what the score step needs of the rows this thread finalises ----------
  // Thread part s finalises rows s, s + 8, ...: their visible key range and
  // ALiBi slope (log2 units) and diagonal (i + offset).
  const int part = tid % kParts;
  RowMask own[Traits::kOwnRows];
#pragma unroll
  for (int k = 0; k < Traits::kOwnRows; ++k) {
    const int r = part + k * kParts;  // past kRows (d = 256: 4 rows, 8 parts): no row
    own[k] = r < kRows ? cta.row_mask(p, row0 + r) : RowMask{};
  }
  const ScoreMap score(p);

  // ---- K / V tile loads (cp.async, zero-filled past the range or past d) ----
  const auto* kbase = static_cast<const Element*>(p.k);
  const auto* vbase = static_cast<const Element*>(p.v);
  auto load_tile = [&](int32_t tile, int stage) {
    const int32_t n0 = k_lo + tile * kBlockN;
    for (int idx = tid; idx < kBlockN * kChunks; idx += Traits::kNThreads) {
      const int jj = idx / kChunks, c = idx % kChunks;
      const int32_t j = n0 + jj;
      const bool valid = j < k_hi && c < d_chunks;
      const Element* ks = kbase;
      const Element* vs = vbase;
      if (valid) {
        ks = kbase + kv_row_offset(p, b, j, p.k_batch_stride, p.k_row_stride) + int64_t(hk) * p.k_head_stride + c * 8;
        vs = vbase + kv_row_offset(p, b, j, p.v_batch_stride, p.v_row_stride) + int64_t(hk) * p.v_head_stride + c * 8;
      }
      const uint32_t off = uint32_t(stage * Traits::kTileBytes + jj * kHeadDim * 2 + c * 16);
      sm80::cp_async_16(sK + off, ks, valid);
      sm80::cp_async_16(sV + off, vs, valid);
    }
    sm80::cp_async_commit();
  };

  // Online-softmax state of the rows this warp owns in the softmax step.
  float m_run[Traits::kRowsPerWarp], l_run[Traits::kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < Traits::kRowsPerWarp; ++k) m_run[k] = -INFINITY, l_run[k] = 0.f;
  // O step: thread owns 8 columns (chunk oc) of row orow.
  const int oc = tid % kChunks, orow = tid / kChunks;
  float o[8] = {0, 0, 0, 0, 0, 0, 0, 0};

  if (tile_begin < tile_end) load_tile(tile_begin, 0);
  for (int32_t tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = (tile - tile_begin) % Traits::kStages;
    if (tile + 1 < tile_end) {
      load_tile(tile + 1, stage ^ 1);
      sm80::cp_async_wait<1>();
    } else {
      sm80::cp_async_wait<0>();
    }
    sm80::sync_threads();  // tile `stage` (and Q) visible to every thread
    const int32_t n0 = k_lo + tile * kBlockN;

    // ---- scores: 8 threads per key, each a slice of the head dim --------------
#pragma unroll
    for (int pass = 0; pass < Traits::kPasses; ++pass) {
      const int jj = pass * Traits::kKeysPerPass + tid / kParts;
      float acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
#pragma unroll
      for (int u = 0; u < Traits::kChunksPerPart; ++u) {
        const int c = part + u * kParts;
        float kf[8];
        const uint32_t k_addr = sK + uint32_t(stage * Traits::kTileBytes + jj * kHeadDim * 2 + c * 16);
        unpack8<Element>(sm80::ld_shared_v4(k_addr), kf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const uint32_t qa = sQ + uint32_t(r * kHeadDim * 4 + c * 16);
          const uint4 q0 = sm80::ld_shared_v4(qa), q1 = sm80::ld_shared_v4(qa + kHeadDim * 2);
          acc[r] += kf[0] * sm80::u32_as_float(q0.x) + kf[1] * sm80::u32_as_float(q0.y) +
                    kf[2] * sm80::u32_as_float(q0.z) + kf[3] * sm80::u32_as_float(q0.w) +
                    kf[4] * sm80::u32_as_float(q1.x) + kf[5] * sm80::u32_as_float(q1.y) +
                    kf[6] * sm80::u32_as_float(q1.z) + kf[7] * sm80::u32_as_float(q1.w);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        acc[r] += sm80::shfl_xor(acc[r], 1);
        acc[r] += sm80::shfl_xor(acc[r], 2);
        acc[r] += sm80::shfl_xor(acc[r], 4);
      }
      // Part s writes rows s, s + 8, ...: masked, scaled (log2 units), capped,
      // ALiBi. With fewer than 8 rows (d = 256) parts past kRows store to
      // their dump slot.
      const int32_t j = n0 + jj;
      float dots[Traits::kOwnRows];
#pragma unroll
      for (int k = 0; k < Traits::kOwnRows; ++k) dots[k] = 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r)  // compile-time indices: acc stays in registers
        if (r % kParts == part) dots[r / kParts] = acc[r];
#pragma unroll
      for (int k = 0; k < Traits::kOwnRows; ++k) {
        const int r = part + k * kParts;
        const float s = score(dots[k], own[k], j);
        const uint32_t s_addr = r < kRows ? sS + uint32_t((r * Traits::kSRow + jj) * 4) : sDump + uint32_t(tid * 4);
        sm80::st_shared_u32(s_addr, float_bits(s));
      }
    }
    sm80::sync_threads();

    // ---- online softmax: a warp per row, a lane per key ----------------------
#pragma unroll
    for (int k = 0; k < Traits::kRowsPerWarp; ++k) {
      const int r = warp * Traits::kRowsPerWarp + k;
      const uint32_t addr = sS + uint32_t((r * Traits::kSRow + lane) * 4);
      const float s = lane < kBlockN ? sm80::ld_shared_f32(addr) : -INFINITY;
      const float m_new = fmaxf(m_run[k], warp_max(s));
      // A row with no visible key so far keeps m = -inf, l = 0, O = 0.
      const float pr = m_new == -INFINITY ? 0.f : sm80::fast_exp2(s - m_new);
      const float alpha = m_new == -INFINITY ? 1.f : sm80::fast_exp2(m_run[k] - m_new);
      l_run[k] = l_run[k] * alpha + warp_sum(pr);
      m_run[k] = m_new;
      sm80::st_shared_u32(addr, float_bits(lane < kBlockN ? pr : 0.f));
      sm80::st_shared_u32(sAlpha + uint32_t((r * 32 + lane) * 4), float_bits(alpha));
    }
    sm80::sync_threads();

    // ---- O = alpha O + P V --------------------------------------------------
    {
      const float alpha = sm80::ld_shared_f32(sAlpha + uint32_t(orow * 32 * 4));
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] *= alpha;
#pragma unroll 4
      for (int jj = 0; jj < kBlockN; ++jj) {
        const float pj = sm80::ld_shared_f32(sS + uint32_t((orow * Traits::kSRow + jj) * 4));
        float vf[8];
        const uint32_t v_addr = sV + uint32_t(stage * Traits::kTileBytes + jj * kHeadDim * 2 + oc * 16);
        unpack8<Element>(sm80::ld_shared_v4(v_addr), vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] += pj * vf[e];
      }
    }
    sm80::sync_threads();  // this stage's buffers and sS are free again
  }

  // ---- epilogue: the row statistics to every thread, then O and the LSE -----
#pragma unroll
  for (int k = 0; k < Traits::kRowsPerWarp; ++k) {
    const int r = warp * Traits::kRowsPerWarp + k;
    sm80::st_shared_u32(sM + uint32_t((r * 32 + lane) * 4), float_bits(m_run[k]));
    sm80::st_shared_u32(sL + uint32_t((r * 32 + lane) * 4), float_bits(l_run[k]));
  }
  sm80::sync_threads();
  const int64_t rg = row0 + orow;
  if (rg >= rows_total) return;
  const int32_t i = cta.row_i(rg);
  const int h = cta.row_h(rg);
  const float m = sm80::ld_shared_f32(sM + uint32_t(orow * 32 * 4));
  const float l = sm80::ld_shared_f32(sL + uint32_t(orow * 32 * 4));
  const float inv = l > 0.f ? sm80::fast_rcp(l) : 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] *= inv;
  const float lse = l > 0.f ? (m + sm80::fast_log2(l)) * kLn2 : -INFINITY;
  if (w.num_splits == 1) {
    if (oc < d_chunks) {
      auto* out = static_cast<Element*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(i) * p.o_row_stride +
                  int64_t(h) * p.o_head_stride + oc * 8;
      sm80::st_global_v4(out, pack8<Element>(o));
    }
    if (oc == 0) sm80::st_global_f32(p.lse + seq.lse_index(p, h, i), lse);
  } else {
    const int64_t row = (int64_t(b) * p.seqlen_q + i) * p.num_heads + h;
    const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.num_heads;
    if (oc < d_chunks) {
      float* acc = w.o_accum + (int64_t(blockIdx.z) * rows + row) * p.head_dim + oc * 8;
      sm80::st_global_v4(acc, uint4{float_bits(o[0]), float_bits(o[1]), float_bits(o[2]),
                                    float_bits(o[3])});
      sm80::st_global_v4(acc + 4, uint4{float_bits(o[4]), float_bits(o[5]), float_bits(o[6]),
                                        float_bits(o[7])});
    }
    if (oc == 0) sm80::st_global_f32(w.lse_accum + int64_t(blockIdx.z) * rows + row, lse);
  }
}

// ---- merge of the splits ------------------------------------------------------

// One warp per (b, i, h) row: lse = log sum_s exp(lse_s), out = sum_s
// exp(lse_s - lse) o_s. A split that saw no key (lse_s = -inf) weighs 0; a
// row no split saw gets out 0, lse -inf. Fused here rather than num_splits - 1
// calls of merge_attention_states: one pass over the partials instead of a
// read and a write of O per pairwise merge.
template <typename Element>
__global__ void __launch_bounds__(128) kvcache_combine_kernel(const __grid_constant__ AttentionFwdParams p,
                                                              const KvSplitOut w) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.num_heads;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= rows) return;
  const int h = int(row % p.num_heads);
  const int i = int(row / p.num_heads % p.seqlen_q);
  const int b = int(row / p.num_heads / p.seqlen_q);
  float m = -INFINITY;
  for (int s = lane; s < w.num_splits; s += 32) m = fmaxf(m, w.lse_accum[int64_t(s) * rows + row]);
  m = warp_max(m);
  float sum = 0.f;
  if (m != -INFINITY)
    for (int s = lane; s < w.num_splits; s += 32)
      sum += sm80::fast_exp2((w.lse_accum[int64_t(s) * rows + row] - m) * kLog2e);
  sum = warp_sum(sum);
  const float lse = m == -INFINITY ? -INFINITY : m + sm80::fast_log2(sum) * kLn2;
  const SeqInfo seq(p, b);
  if (lane == 0) sm80::st_global_f32(p.lse + seq.lse_index(p, h, i), lse);
  auto* out = static_cast<Element*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(i) * p.o_row_stride +
              int64_t(h) * p.o_head_stride;
  for (int c = lane; c < p.head_dim / 8; c += 32) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (m != -INFINITY) {
      for (int s = 0; s < w.num_splits; ++s) {
        const float ls = w.lse_accum[int64_t(s) * rows + row];
        if (ls == -INFINITY) continue;
        const float wt = sm80::fast_exp2((ls - lse) * kLog2e);
        const float* src = w.o_accum + (int64_t(s) * rows + row) * p.head_dim + c * 8;
        const uint4 a = sm80::ld_global_nc_v4(src), bq = sm80::ld_global_nc_v4(src + 4);
        const uint32_t x[8] = {a.x, a.y, a.z, a.w, bq.x, bq.y, bq.z, bq.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += wt * sm80::u32_as_float(x[e]);
      }
    }
    sm80::st_global_v4(out + c * 8, pack8<Element>(acc));
  }
}

}  // namespace kvcache
}  // namespace cuda
}  // namespace pyfastattn
