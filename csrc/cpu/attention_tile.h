// The steps of one tile that the forward and the backward share: which keys
// each query row sees (RowRanges, LaneWindow), loading K, V, Q and dO rows
// into the products' operand layouts (Tiles), the products themselves
// (gemm<Isa, CT>), and the scores of a tile with scale, softcap, attn_mask
// and window applied (score_tile).
//
// Layout of a tile. Scores are held transposed, S^T[key][query], so that the
// per-query softmax statistics (max, sum) run down the columns: each
// elementwise step works on 16 contiguous queries per vector, with no
// horizontal reductions. The forward's products per tile are then
//   S^T = K Q^T        (A = key rows, B = Q^T packed once per query block)
//   O   = a O + P V    (A = P read by column from S^T, B = value rows)
// and the backward ones follow the same pattern (attention_bwd.h). A tile that
// every row of the block sees whole, without softcap or attn_mask, gets its
// scale and column max in the S^T product's epilogue and skips the score pass
// (tile_inside).
#pragma once

#include "attention_schedule.h"

namespace pyfastattn {
namespace cpu {

// Visible keys of query rows i0 .. i0 + m - 1 (nondecreasing in the row).
struct RowRanges {
  int* lo;
  int* hi;
  int m;
  int first() const { return lo[0]; }
  int last() const { return hi[m - 1]; }
};

PFA_INLINE void fill_ranges(const AttentionFwdParams& p, const SeqInfo& si, int i0, RowRanges& rr) {
  for (int r = 0; r < rr.m; ++r) {
    rr.lo[r] = si.key_lo(p, i0 + r);
    rr.hi[r] = si.key_hi(p, i0 + r);
  }
}

// Sweeps key rows in increasing order and returns, for each, the query lanes
// [begin, end) that see it: hi > key (a suffix) and lo <= key (a prefix).
class LaneWindow {
 public:
  explicit LaneWindow(const RowRanges& rr) : rr_(rr) {}
  void advance(int key) {
    while (begin_ < rr_.m && rr_.hi[begin_] <= key) ++begin_;
    while (end_ < rr_.m && rr_.lo[end_] <= key) ++end_;
  }
  int begin() const { return begin_; }
  int end() const { return end_; }

 private:
  const RowRanges& rr_;
  int begin_ = 0, end_ = 0;
};

// ---------------------------------------------------------------------------
// Tile loaders: source rows of dtype T -> compute layout.
//   CT = float   : rows of fp32, leading dimension `ld`.
//   CT = uint32_t: bf16 pairs along the row ("A" operand rows), or VNNI pairs
//                  across two rows ("B" operand), zero-padded to full pairs.
// ---------------------------------------------------------------------------

// Where row r of a tile is: a strided tensor (StridedRows), or a list of row
// pointers (RowList: a paged KV cache's rows, gathered through its block
// table by paged_rows, attention_fwd.cpp).
template <typename T>
struct StridedRows {
  const T* s;
  int64_t st;
  PFA_INLINE const T* operator()(int r) const { return s + r * st; }
};
template <typename T>
struct RowList {
  const T* const* p;
  PFA_INLINE const T* operator()(int r) const { return p[r]; }
};

template <typename T, class Rows>
PFA_INLINE void load_rows_f32(const Rows& src, int rows, int cols, float* dst, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src(r);
    float* PFA_RESTRICT o = dst + r * ld;
    for (int c = 0; c < cols; ++c) o[c] = to_f32(s[c]);
  }
}

template <typename T, class Rows>
PFA_INLINE void load_rows_pairs(const Rows& src, int rows, int cols, uint32_t* dst, int64_t ld) {
  const int c2 = cols / 2;
  if (cols % 2 == 0) {  // a row of pairs is the row's bits (little-endian: low half first)
    for (int r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src(r), size_t(cols) * sizeof(T));
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src(r);
    uint32_t* PFA_RESTRICT o = dst + r * ld;
    for (int c = 0; c < c2; ++c)
      o[c] = uint32_t(raw_bits(s[2 * c])) | (uint32_t(raw_bits(s[2 * c + 1])) << 16);
    if (cols & 1) o[c2] = raw_bits(s[cols - 1]);
  }
}

// B operand in VNNI form from `rows` source rows (the K axis) of `cols` values.
template <typename T, class Rows>
PFA_INLINE void load_vnni(const Rows& src, int rows, int cols, uint32_t* dst, int64_t ld) {
  for (int r2 = 0; r2 < rows / 2; ++r2) {
    const T* PFA_RESTRICT s0 = src(2 * r2);
    const T* PFA_RESTRICT s1 = src(2 * r2 + 1);
    uint32_t* PFA_RESTRICT o = dst + r2 * ld;
    for (int c = 0; c < cols; ++c) o[c] = uint32_t(raw_bits(s0[c])) | (uint32_t(raw_bits(s1[c])) << 16);
  }
  if (rows & 1) {
    const T* PFA_RESTRICT s0 = src(rows - 1);
    uint32_t* PFA_RESTRICT o = dst + (rows / 2) * ld;
    for (int c = 0; c < cols; ++c) o[c] = raw_bits(s0[c]);
  }
}

// Transposed B operand: dst[c][r] (fp32) or dst[c2][r] (pairs of c) from
// `rows` source rows of `cols` values; used for Q^T and dO^T.
template <typename T>
PFA_INLINE void load_t_f32(const T* src, int64_t stride, int rows, int cols, float* dst, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    for (int c = 0; c < cols; ++c) dst[c * ld + r] = to_f32(s[c]);
  }
}

template <typename T>
PFA_INLINE void load_t_pairs(const T* src, int64_t stride, int rows, int cols, uint32_t* dst, int64_t ld) {
  const int c2 = cols / 2;
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    for (int c = 0; c < c2; ++c)
      dst[c * ld + r] = uint32_t(raw_bits(s[2 * c])) | (uint32_t(raw_bits(s[2 * c + 1])) << 16);
    if (cols & 1) dst[c2 * ld + r] = raw_bits(s[cols - 1]);
  }
}

// Compute-type traits: how a dtype's tiles are laid out for the products.
template <typename T, typename CT>
struct Tiles;

template <typename T>
struct Tiles<T, float> {
  static constexpr bool kPairs = false;
  static int kdim(int d) { return d; }  // K-axis length of a product over a head dim
  // A operand rows (keys / values), ld = cols; rows strided or listed.
  static void a_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_rows_f32<T>(StridedRows<T>{s, st}, rows, cols, dst, cols);
  }
  static void a_rows(const T* const* s, int rows, int cols, float* dst) {
    load_rows_f32<T>(RowList<T>{s}, rows, cols, dst, cols);
  }
  // B operand rows (K axis = rows), ld = cols.
  static void b_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_rows_f32<T>(StridedRows<T>{s, st}, rows, cols, dst, cols);
  }
  static void b_rows(const T* const* s, int rows, int cols, float* dst) {
    load_rows_f32<T>(RowList<T>{s}, rows, cols, dst, cols);
  }
  // B operand transposed (K axis = cols), ld given.
  static void b_t(const T* s, int64_t st, int rows, int cols, float* dst, int64_t ld) {
    load_t_f32(s, st, rows, cols, dst, ld);
  }
};

template <typename T>
struct Tiles<T, uint32_t> {
  static constexpr bool kPairs = true;
  static int kdim(int d) { return (d + 1) / 2; }
  static void a_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_rows_pairs<T>(StridedRows<T>{s, st}, rows, cols, reinterpret_cast<uint32_t*>(dst), (cols + 1) / 2);
  }
  static void a_rows(const T* const* s, int rows, int cols, float* dst) {
    load_rows_pairs<T>(RowList<T>{s}, rows, cols, reinterpret_cast<uint32_t*>(dst), (cols + 1) / 2);
  }
  static void b_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_vnni<T>(StridedRows<T>{s, st}, rows, cols, reinterpret_cast<uint32_t*>(dst), cols);
  }
  static void b_rows(const T* const* s, int rows, int cols, float* dst) {
    load_vnni<T>(RowList<T>{s}, rows, cols, reinterpret_cast<uint32_t*>(dst), cols);
  }
  static void b_t(const T* s, int64_t st, int rows, int cols, float* dst, int64_t ld) {
    load_t_pairs(s, st, rows, cols, reinterpret_cast<uint32_t*>(dst), ld);
  }
};

// Tiles<T, CT>::b_t (Q^T, dO^T) in 16 x 16 blocks through Vec::transpose16:
// the scalar b_t writes one value per row of dst, a strided store each (the
// forward's Q^T was 16% of its task body outside the products, perf on one
// core, PERF_NOTES "issue 21 v5"). The columns from `rows` to the next
// multiple of kLanes are written as zeros, so ld >= that. bf16 pairs with an
// odd head dim take the scalar b_t.
template <class Vec, typename T, typename CT>
PFA_INLINE void pack_t(const T* src, int64_t stride, int rows, int cols, float* dst, int64_t ld) {
  using TL = Tiles<T, CT>;
  if (TL::kPairs && cols % 2 != 0) {
    TL::b_t(src, stride, rows, cols, dst, ld);
    return;
  }
  const int kc = TL::kdim(cols);
  // A 16 x 16 block's row: 64 bytes, copied as one vector when whole (a
  // memcpy of variable size, or a scalar loop, was 14% of the forward's task
  // body outside the products: PERF_NOTES "issue 21, session 4").
  constexpr bool kRaw = TL::kPairs || std::is_same<T, float>::value;  // the row's bits are the block's
  const int64_t row_bytes = int64_t(cols) * sizeof(T);
  alignas(64) float in[kLanes][kLanes];
  for (int r0 = 0; r0 < rows; r0 += kLanes) {
    const int nr = std::min(kLanes, rows - r0);
    // The next 16 rows come in while these are transposed (they are read
    // once, from L3 or memory).
    for (int a = r0 + kLanes; a < std::min(rows, r0 + 2 * kLanes); ++a) {
      const char* row = reinterpret_cast<const char*>(src + int64_t(a) * stride);
      for (int64_t x = 0; x < row_bytes; x += 64) __builtin_prefetch(row + x, 0, 3);
    }
    for (int c0 = 0; c0 < kc; c0 += kLanes) {
      const int nc = std::min(kLanes, kc - c0);
      for (int a = 0; a < kLanes; ++a) {
        int b = 0;
        if (a < nr) {
          const T* row = src + int64_t(r0 + a) * stride;
          const T* at = row + (TL::kPairs ? 2 : 1) * c0;
          if constexpr (kRaw) {
            if (nc == kLanes) {
              std::memcpy(in[a], at, sizeof in[a]);
            } else {
              std::memcpy(in[a], at, size_t(nc) * sizeof(float));
            }
          } else {
            for (int x = 0; x < nc; ++x) in[a][x] = to_f32(at[x]);
          }
          b = nc;
        }
        for (; b < kLanes; ++b) in[a][b] = 0.0f;
      }
      Vec::transpose16(in, dst + int64_t(c0) * ld + r0, ld, nc);
    }
  }
}

template <class Isa, typename CT>
PFA_INLINE void gemm(const GemmArgs& g) {
  if constexpr (std::is_same<CT, float>::value) {
    Isa::gemm_f32(g);
  } else {
    Isa::gemm_bf16(g);
  }
}

// ---------------------------------------------------------------------------
// Scores of one tile: raw dot products S^T[j][i] -> log2-unit scores with
// softcap, attn_mask and the window applied.
// ---------------------------------------------------------------------------

// attn_mask of a tile in log2-unit additive form (bool: 0 or -inf).
struct MaskTile {
  const float* bias;  // nullptr: no mask
  bool per_key;       // bias[j] for every query (mask row stride 0), else bias[j][i]
  // ALiBi (issue 17): S^T[j][i] -= slope2 * |diag + i - j| (log2 units), with
  // diag = i0 + len_k - len_q - j0.
  bool alibi = false;
  float alibi_slope2 = 0.0f;
  int64_t alibi_diag = 0;
};

// A mask with row stride 0 (a key-padding mask, [b, h, 1, sk]) is the same
// for every query row: one value per key. Otherwise the tile is transposed
// into bias[j][i] in 16 x 16 blocks, reading mask rows contiguously. (A
// scalar transpose cost ~6 cycles per score and halved the speed of a
// fully masked forward.)
template <class Vec, typename M>
PFA_INLINE MaskTile load_mask_tile_as(const AttentionFwdParams& p, const M* mk, int m, int n, float* bias,
                                      int64_t ld) {
  if (p.mask_row_stride == 0) {
    for (int j = 0; j < n; ++j) bias[j] = mask_bias(mk[j]);
    return MaskTile{bias, true};
  }
  float blk[kLanes][kLanes] = {};
  for (int ib = 0; ib < m; ib += kLanes) {
    const int mi = std::min(kLanes, m - ib);
    for (int jb = 0; jb < n; jb += kLanes) {
      const int nj = std::min(kLanes, n - jb);
      for (int a = 0; a < mi; ++a) {
        const M* row = mk + int64_t(ib + a) * p.mask_row_stride + jb;
        if (nj == kLanes) {
          Vec::mask_bias16(row, blk[a]);
        } else {
          for (int b = 0; b < nj; ++b) blk[a][b] = mask_bias(row[b]);
        }
      }
      Vec::transpose16(blk, bias + jb * ld + ib, ld, nj);
    }
  }
  return MaskTile{bias, false};
}

template <class Vec, typename T>
PFA_INLINE MaskTile load_mask_tile_only(const AttentionFwdParams& p, int bi, int h, int i0, int m, int j0, int n,
                                        float* bias, int64_t ld);

// The attn_mask tile (if any) with the ALiBi terms of (sequence bi, head h).
template <class Vec, typename T>
PFA_INLINE MaskTile load_mask_tile(const AttentionFwdParams& p, int bi, int h, int i0, int m, int j0, int n,
                                   float* bias, int64_t ld) {
  MaskTile mt = load_mask_tile_only<Vec, T>(p, bi, h, i0, m, j0, n, bias, ld);
  if (p.alibi_slopes) {
    const SeqInfo si(p, bi);
    mt.alibi = true;
    mt.alibi_slope2 = p.alibi_slopes[int64_t(bi) * p.alibi_batch_stride + h] * kLog2e;
    mt.alibi_diag = int64_t(i0) + si.len_k - si.len_q - j0;
  }
  return mt;
}

template <class Vec, typename T>
PFA_INLINE MaskTile load_mask_tile_only(const AttentionFwdParams& p, int bi, int h, int i0, int m, int j0, int n,
                                        float* bias, int64_t ld) {
  const int64_t at = int64_t(bi) * p.mask_batch_stride + int64_t(h) * p.mask_head_stride +
                     int64_t(i0) * p.mask_row_stride + j0;
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return load_mask_tile_as<Vec>(p, static_cast<const uint8_t*>(p.mask) + at, m, n, bias, ld);
    case MaskKind::kAdditive:
      return load_mask_tile_as<Vec>(p, static_cast<const T*>(p.mask) + at, m, n, bias, ld);
    case MaskKind::kNone:
    default:
      return MaskTile{nullptr, false};
  }
}

// Scores of a tile that needs more than a scale (softcap, attn_mask, or a
// window edge crossing it), row by row, in place:
//   t = scale * raw (log2 units)  or  cap * tanh(raw * scale / softcap),
//   t += bias, and t = -inf for query lanes outside the key's window.
// Optionally fills col_max and, with a softcap, dtanh = 1 - tanh^2 (the
// derivative factor the backward needs), both [n][ld] like S^T.
// Only lanes [l0, mp) are touched (l0 a multiple of kLanes): a tile at the
// causal diagonal restricted to the rows that see it (fwd_block).
PFA_INLINE void score_tile(const Ctx& c, const RowRanges& rr, int j0, int n, int mp, float* s, int64_t ld,
                           const MaskTile& mask, float* dtanh, float* col_max, int l0 = 0) {
  const float scale = c.score_scale, cap = c.cap_log2;
  LaneWindow lw(rr);
  s += l0;
  if (dtanh) dtanh += l0;
  if (col_max) col_max += l0;
  mp -= l0;
  for (int j = 0; j < n; ++j) {
    lw.advance(j0 + j);
    float* PFA_RESTRICT sr = s + j * ld;
    if (c.softcap && dtanh) {
      float* PFA_RESTRICT dt = dtanh + j * ld;
      for (int i = 0; i < mp; ++i) {
        const float th = tanh_approx(sr[i] * scale);
        sr[i] = cap * th;
        dt[i] = 1.0f - th * th;
      }
    } else if (c.softcap) {
      for (int i = 0; i < mp; ++i) sr[i] = cap * tanh_approx(sr[i] * scale);
    } else {
      for (int i = 0; i < mp; ++i) sr[i] *= scale;
    }
    if (mask.bias && mask.per_key) {
      const float bj = mask.bias[j];
      for (int i = 0; i < mp; ++i) sr[i] += bj;
    } else if (mask.bias) {
      const float* PFA_RESTRICT br = mask.bias + j * ld + l0;
      for (int i = 0; i < mp; ++i) sr[i] += br[i];
    }
    if (mask.alibi) {
      const float slope = mask.alibi_slope2;
      const float base = float(mask.alibi_diag - j + l0);
      for (int i = 0; i < mp; ++i) sr[i] -= slope * std::fabs(base + float(i));
    }
    const int lane_end = std::min(lw.end(), rr.m) - l0;
    for (int i = 0; i < lw.begin() - l0; ++i) sr[i] = -kInf;
    for (int i = std::max(lane_end, 0); i < mp; ++i) sr[i] = -kInf;
    if (col_max) {
      float* PFA_RESTRICT cm = col_max;
      for (int i = 0; i < mp; ++i) cm[i] = std::max(cm[i], sr[i]);
    }
  }
}

// Whether every query row of the block sees every key of [j0, j0 + n): then
// a tile without softcap or attn_mask needs only the scale, which the S^T
// product applies in its epilogue (with the column max), and no score pass.
PFA_INLINE bool tile_inside(const RowRanges& rr, int j0, int n) {
  return rr.lo[rr.m - 1] <= j0 && rr.hi[0] >= j0 + n;
}

// Keys per tile at the edge of the rows' windows (the causal diagonal): see
// next_key_tile.
constexpr int kEdgeKeys = 32;

// The forward's next key tile from j0 (keys < key_end): the largest of
// blk.k, blk.k / 2, ... down to kEdgeKeys that every row of the block sees
// whole, else kEdgeKeys keys, of which each row sees a part or none (the
// causal diagonal, a window's edge). Without causal or window every tile is
// inside and this is blk.k. Sizes follow the shape only (never the thread
// count), so results stay bit-identical for any thread count. (fwd_block
// replaces the edge tiles of a plain causal diagonal by one tile,
// causal_tile_diag.)
PFA_INLINE int next_key_tile(const RowRanges& rr, int blk_k, int j0, int key_end) {
  int s = blk_k;
  while (s > kEdgeKeys && !tile_inside(rr, j0, std::min(s, key_end - j0))) s /= 2;
  return std::min(s, key_end - j0);
}

// The rows [begin, end) that see some key of [j0, j0 + n), widened to whole
// vectors of kLanes lanes (end <= mp); begin >= end when none does.
struct LaneSpan {
  int begin, end;
};
PFA_INLINE LaneSpan rows_seeing(const RowRanges& rr, int j0, int n, int mp) {
  int a = 0, b = rr.m;
  while (a < rr.m && rr.hi[a] <= j0) ++a;      // hi nondecreasing: a prefix sees nothing
  while (b > a && rr.lo[b - 1] >= j0 + n) --b;  // lo nondecreasing: a suffix sees nothing
  if (a >= b) return LaneSpan{0, 0};
  return LaneSpan{a / kLanes * kLanes, int(std::min<int64_t>(round_up(b, kLanes), mp))};
}

// Whether the rows of `span` (up to rr.m) see the keys [j0, j0 + n) as a
// causal diagonal does: each from j0 (lo <= j0) up to i + b for one b
// (clamped to the tile). Then the tile's products can skip what lies past the
// diagonal (GemmArgs::diag), and the diagonal relative to the tile is
// returned: lane c (row span.begin + c) sees key j0 + r iff r < c + diag.
// kNoDiag otherwise (a window's left edge, rows not one key apart).
PFA_INLINE int64_t causal_tile_diag(const RowRanges& rr, int j0, int n, LaneSpan span) {
  const int r1 = std::min(span.end, rr.m);
  int a = span.begin;
  while (a < r1 && rr.hi[a] <= j0) ++a;  // the first row that sees a key of the tile
  if (a >= r1) return kNoDiag;
  const int64_t b = int64_t(rr.hi[a]) - a;
  const auto clamp = [&](int64_t x) { return std::min<int64_t>(std::max<int64_t>(x, j0), int64_t(j0) + n); };
  for (int i = span.begin; i < r1; ++i) {
    if (rr.lo[i] > j0 || clamp(rr.hi[i]) != clamp(i + b)) return kNoDiag;
  }
  return span.begin + b - j0;
}

}  // namespace cpu
}  // namespace pyfastattn
