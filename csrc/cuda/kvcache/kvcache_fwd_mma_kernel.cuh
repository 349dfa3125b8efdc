// The tensor-core variant of the split-KV attention over a KV cache
// (kvcache_split_mma_kernel): the same contract, grid and partial outputs as
// kvcache_split_kernel (kvcache_fwd_kernel.cuh, whose append and combine
// kernels it shares), with a structure built for decode's memory-bound step.
//
// Why a second kernel. On an H200 (benchmarks/results/H200/run3-rerun), the
// CUDA-core kernel took 259 us for B1 Hq32 Hk8 D128 at 32k keys, 21 % of the
// read bandwidth and 0.26x torch's SDPA. Its CTA runs every tile as three
// barrier-separated phases with one tile in flight, and its score step reads
// Q from shared memory for each of its 8 rows (a decode GQA group of 4 fills
// half of them): a latency-bound loop with little memory in flight. Here:
//   - one m16 tile of query rows (GQA group x query rows, flattened, as the
//     other kernel) shared by the CTA's warps; S = Q K^T and O += P V on the
//     tensor cores (mma.m16n8k16, P converted to 16 bits in registers as in
//     the attention forward), so a tile costs 4 MMAs per 16 columns of d;
//   - every warp owns its own key tiles (tile w, w + W, ... of the CTA's
//     split), its own online softmax state and its own cp.async ring of K/V
//     stages in shared memory: no CTA barrier inside the key loop, only
//     __syncwarp, so each warp keeps its next tiles in flight while it
//     computes;
//   - the warps' (max, sum, O) are merged once at the end through shared
//     memory, by the same LSE rule the combine kernel applies to splits.
// The CTA's rows and key split (SplitCta) and the score step's row
// bookkeeping (RowMask / ScoreMap: visible key range per row, softcap, ALiBi,
// bottom-right masks) are shared with kvcache_split_kernel; the cache rows
// (paged / batch-indexed / left-padded) are kv_row_offset's, stepped per tile.
//
// Written and tested under the emulator (emu/kvcache_fwd_emu_test.cc runs
// every case through both kernels); not yet run on a GPU, so the launcher
// keeps kvcache_split_kernel unless PYFASTATTN_KVCACHE_CUDA_KERNEL=mma.
#pragma once

#include "../attention/attention_fwd_kernel.cuh"  // SwizzledRows, frag_addrs (ldmatrix lane addresses)
#include "kvcache_fwd_kernel.cuh"

namespace pyfastattn {
namespace cuda {
namespace kvcache {

// kWarps warps, each with kStages stages of (K tile, V tile) of kBlockN keys.
// Shared memory (dynamic, opt-in above 48 KB; every variant <= 99 KB, the
// smallest opt-in limit of sm_80-sm_90): the warps' stages, Q (16 rows,
// 16-bit, swizzled), and the warps' row statistics; after the key loop the
// stages hold the warps' O partials for the merge.
//   d   64: 4 warps x 3 stages x 4 KB = 48 KB + 2 KB Q   (52 KB)
//   d  128: 4 warps x 2 stages x 8 KB = 64 KB + 4 KB Q   (70 KB)
//   d  256: 2 warps x 2 stages x 16 KB = 64 KB + 8 KB Q  (73 KB)
template <typename Element_, int kHeadDim_>
struct KvMmaTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kHeadDim == 256 ? 2 : 4;
  static constexpr int kNThreads = 32 * kWarps;
  static constexpr int kRows = 16;    // query rows per CTA: one m16 tile
  static constexpr int kBlockN = 16;  // keys per warp tile
  static constexpr int kStages = kHeadDim == 64 ? 3 : 2;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
  static constexpr int kLanesPerRow = kChunks < 32 ? kChunks : 32;
  static constexpr int kRowsPerPass = 32 / kLanesPerRow;  // key rows one warp-wide cp.async pass copies
  static constexpr int kPasses = kBlockN / kRowsPerPass;
  static constexpr int kKSteps = kHeadDim / 16;
  static constexpr int kNTilesO = kHeadDim / 8;
  using Tile = attention::SwizzledRows<kHeadDim>;
  static constexpr int kTileBytes = kBlockN * kHeadDim * 2;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K, then V
  static constexpr int kWarpBytes = kStages * kStageBytes;
  // O partials for the merge, [warp][row][kORowFloats] fp32. Within a row the
  // four low columns of every 8-column chunk come first, then the four high
  // ones, so that the merge's 16-byte reads (one per lane, consecutive
  // chunks) are free of bank conflicts.
  static constexpr int kORowFloats = kHeadDim + 4;
  static constexpr int kSKV = 0;
  static constexpr int kSQ = kWarps * kWarpBytes;
  static constexpr int kSStat = kSQ + kRows * kHeadDim * 2;  // [warp][row][lane of the row's quad] (m, l)
  static constexpr int kSmemBytes = kSStat + kWarps * kRows * 4 * 2 * 4;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head dims 64, 128, 256");
  static_assert(kPasses * kRowsPerPass == kBlockN && kLanesPerRow * kRowsPerPass == 32, "one warp copies a tile");
  static_assert(kWarps * kRows * kORowFloats * 4 <= kWarps * kWarpBytes, "the O partials fit the K/V stages");
  static_assert(kSmemBytes <= 99 * 1024, "fits every sm_80-sm_90 opt-in limit");
};

// Float index, within a row of the merge's O partials, of column x.
PFA_ATTN_DEVICE int merge_col(int x, int head_dim) {
  return (x / 8) * 4 + (x % 4) + ((x % 8) / 4) * (head_dim / 2);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    kvcache_split_mma_kernel(const __grid_constant__ AttentionFwdParams p, const KvSplitOut w) {
  using Element = typename Traits::Element;
  using Tile = typename Traits::Tile;
  constexpr int kHeadDim = Traits::kHeadDim, kRows = Traits::kRows, kBlockN = Traits::kBlockN;
  constexpr int kWarps = Traits::kWarps, kStages = Traits::kStages, kChunks = Traits::kChunks;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int d_chunks = p.head_dim / 8;
  // The rows, and the keys this CTA reads (the tile rows' visible range), split;
  // this warp's tiles of kBlockN keys are my_first, my_first + kWarps, ...
  const SplitCta cta(p, kRows, kBlockN, w.num_splits);
  const int b = cta.b, hk = cta.hk;
  const int64_t rows_total = cta.rows_total, row0 = cta.row0;

  const uint32_t smem = sm80::smem_u32(sm80::dynamic_smem());
  const uint32_t sQ = smem + Traits::kSQ, sStat = smem + Traits::kSStat;
  const uint32_t sRing = smem + Traits::kSKV + uint32_t(warp * Traits::kWarpBytes);
  const int32_t my_first = cta.tile_begin + warp;
  const int32_t my_count = my_first < cta.tile_end ? (cta.tile_end - my_first + kWarps - 1) / kWarps : 0;

  // ---- Q (16-bit, swizzled) by cp.async; rows past the end and columns past d are 0
  const auto* qbase = static_cast<const Element*>(p.q);
  for (int idx = tid; idx < kRows * kChunks; idx += Traits::kNThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t rg = row0 + r;
    const bool valid = rg < rows_total && c < d_chunks;
    const Element* src = qbase;
    if (valid)
      src = qbase + int64_t(b) * p.q_batch_stride + int64_t(cta.row_i(rg)) * p.q_row_stride +
            int64_t(cta.row_h(rg)) * p.q_head_stride + c * 8;
    sm80::cp_async_16(sQ + Tile::offset(r, c), src, valid);
  }
  sm80::cp_async_commit();

  // ---- this warp's K / V tile loads (zero-filled past the range or past d) ----
  const auto* kbase = static_cast<const Element*>(p.k);
  const auto* vbase = static_cast<const Element*>(p.v);
  const int lc = lane % Traits::kLanesPerRow;  // the chunk this lane copies of every row
  // Where key j lies: cache position t = j + leftpad, in table entry t / page
  // at row t % page (paged), or in the sequence's cache row at row t (as
  // kv_row_offset in params.h). A lane's keys are kRowsPerPass apart, so the
  // position is split once per tile and then stepped: no 64-bit division per
  // key (a subroutine of ~100 instructions, twice per key for K and V).
  const bool paged = p.block_table != nullptr;
  const int64_t leftpad = p.cache_leftpad ? p.cache_leftpad[b] : 0;
  const int32_t* table = paged ? p.block_table + int64_t(b) * p.block_table_batch_stride : nullptr;
  const int64_t seq_entry = paged ? 0 : (p.cache_batch_idx ? p.cache_batch_idx[b] : b);
  const int64_t k_head = int64_t(hk) * p.k_head_stride + lc * 8, v_head = int64_t(hk) * p.v_head_stride + lc * 8;
  auto load_tile = [&](int32_t k, int stage) {
    const int32_t n0 = cta.k_lo + (my_first + k * kWarps) * kBlockN;
    const uint32_t sK = sRing + uint32_t(stage * Traits::kStageBytes), sV = sK + Traits::kTileBytes;
    const int64_t t0 = int64_t(n0) + leftpad + lane / Traits::kLanesPerRow;
    // Table index (paged); a 32-bit division where the position fits (always, in practice).
    int64_t entry = !paged ? 0
                    : t0 <= 0x7fffffff ? int64_t(uint32_t(t0) / uint32_t(p.page_block_size))
                                       : t0 / p.page_block_size;
    int64_t row = t0 - entry * p.page_block_size;
#pragma unroll
    for (int ps = 0; ps < Traits::kPasses; ++ps) {
      const int jj = lane / Traits::kLanesPerRow + ps * Traits::kRowsPerPass;
      const bool valid = n0 + jj < cta.k_hi && lc < d_chunks;
      const Element* ks = kbase;
      const Element* vs = vbase;
      if (valid) {
        const int64_t e = paged ? int64_t(table[entry]) : seq_entry;
        ks = kbase + e * p.k_batch_stride + row * p.k_row_stride + k_head;
        vs = vbase + e * p.v_batch_stride + row * p.v_row_stride + v_head;
      }
      sm80::cp_async_16(sK + Tile::offset(jj, lc), ks, valid);
      sm80::cp_async_16(sV + Tile::offset(jj, lc), vs, valid);
      row += Traits::kRowsPerPass;
      if (paged)
        while (row >= p.page_block_size) row -= p.page_block_size, ++entry;
    }
  };
  // Prologue: kStages - 1 tiles in flight (a group per stage, empty past the
  // warp's tiles, so that the group count is the same in every warp).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_count) load_tile(s, s);
    sm80::cp_async_commit();
  }
  sm80::cp_async_wait<kStages - 1>();  // the oldest group, Q, has landed
  sm80::sync_threads();                // Q visible to every warp

  // ---- rows g and g + 8 of the tile (the C-fragment rows of this lane) ------
  const int g = lane / 4, cq = lane % 4;
  RowMask own[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) own[h2] = cta.row_mask(p, row0 + g + 8 * h2);
  const ScoreMap score(p);

  const auto q_addr = attention::frag_addrs<kHeadDim>(sQ, 0, lane);
  const auto k_addr = attention::frag_addrs<kHeadDim>(sRing, 0, lane);  // stage 0's K; + stage offsets
  const auto v_addr = attention::frag_addrs<kHeadDim>(sRing + Traits::kTileBytes, 0, lane);

  float o[Traits::kNTilesO][4];
#pragma unroll
  for (int nt = 0; nt < Traits::kNTilesO; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // l: this lane's columns only

  for (int32_t k = 0; k < my_count; ++k) {
    const int stage = k % kStages;
    // The tile kStages - 1 ahead goes into the stage the last iteration read.
    if (k + kStages - 1 < my_count) load_tile(k + kStages - 1, (k + kStages - 1) % kStages);
    sm80::cp_async_commit();
    sm80::cp_async_wait<kStages - 1>();  // tile k has landed (this lane's copies)
    sm80::sync_warp();                   // ... and every lane's
    const uint32_t stage_off = uint32_t(stage * Traits::kStageBytes);

    // ---- S = Q K^T: 16 rows x 16 keys ----------------------------------------
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < Traits::kKSteps; ++ks) {
      uint32_t a[4], bk[4];
      sm80::ldmatrix_x4(a, q_addr.at(ks, 0));
      sm80::ldmatrix_x4(bk, k_addr.at(ks, 0) + stage_off);
      sm80::mma_m16n8k16<Element>(s[0], a, bk[0], bk[2]);
      sm80::mma_m16n8k16<Element>(s[1], a, bk[1], bk[3]);
    }

    // ---- masked, scaled (log2 units), capped, ALiBi; online softmax ---------
    const int32_t n0 = cta.k_lo + (my_first + k * kWarps) * kBlockN;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = score(s[nt][2 * h2 + e], own[h2], n0 + nt * 8 + 2 * cq + e);
          s[nt][2 * h2 + e] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, sm80::shfl_xor(mx, 1));
      mx = fmaxf(mx, sm80::shfl_xor(mx, 2));
      const float m_new = fmaxf(m_run[h2], mx);
      // A row with no visible key so far keeps m = -inf, l = 0, O = 0.
      const float alpha = m_new == -INFINITY ? 1.f : sm80::fast_exp2(m_run[h2] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = m_new == -INFINITY ? 0.f : sm80::fast_exp2(s[nt][2 * h2 + e] - m_new);
          s[nt][2 * h2 + e] = pr;
          sum += pr;
        }
      l_run[h2] = l_run[h2] * alpha + sum;
      m_run[h2] = m_new;
#pragma unroll
      for (int nt = 0; nt < Traits::kNTilesO; ++nt) {
        o[nt][2 * h2] *= alpha;
        o[nt][2 * h2 + 1] *= alpha;
      }
    }

    // ---- O += P V: P (16 rows x 16 keys) as the A fragment, V by ldmatrix.trans
    uint32_t pa[4];
    pa[0] = sm80::pack2<Element>(s[0][0], s[0][1]);
    pa[1] = sm80::pack2<Element>(s[0][2], s[0][3]);
    pa[2] = sm80::pack2<Element>(s[1][0], s[1][1]);
    pa[3] = sm80::pack2<Element>(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t bv[4];
      sm80::ldmatrix_x4_trans(bv, v_addr.at(dp, 0) + stage_off);
      sm80::mma_m16n8k16<Element>(o[2 * dp], pa, bv[0], bv[1]);
      sm80::mma_m16n8k16<Element>(o[2 * dp + 1], pa, bv[2], bv[3]);
    }
    sm80::sync_warp();  // every lane is done with this stage before it is refilled
  }
  sm80::cp_async_wait<0>();

  // ---- merge of the warps: statistics, then the scaled O partials -----------
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    l_run[h2] += sm80::shfl_xor(l_run[h2], 1);
    l_run[h2] += sm80::shfl_xor(l_run[h2], 2);
    // Every lane stores (a shared store is warp-wide), each to its own copy.
    const uint32_t at = sStat + uint32_t((((warp * kRows + g + 8 * h2) * 4 + cq) * 2) * 4);
    sm80::st_shared_u32(at, float_bits(m_run[h2]));
    sm80::st_shared_u32(at + 4, float_bits(l_run[h2]));
  }
  sm80::sync_threads();  // every warp is past its key loop: the stages are free
  auto row_max = [&](int r) {
    float m = -INFINITY;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) m = fmaxf(m, sm80::ld_shared_f32(sStat + uint32_t(((x * kRows + r) * 4 * 2) * 4)));
    return m;
  };
  const uint32_t sO = smem + Traits::kSKV;
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int r = g + 8 * h2;
    const float m = row_max(r);
    const float f = m_run[h2] == -INFINITY ? 0.f : sm80::fast_exp2(m_run[h2] - m);
    const uint32_t row = sO + uint32_t((warp * kRows + r) * Traits::kORowFloats * 4);
#pragma unroll
    for (int nt = 0; nt < Traits::kNTilesO; ++nt) {
      const uint32_t at = row + uint32_t(merge_col(nt * 8 + 2 * cq, kHeadDim) * 4);
      sm80::st_shared_u32(at, float_bits(o[nt][2 * h2] * f));
      sm80::st_shared_u32(at + 4, float_bits(o[nt][2 * h2 + 1] * f));
    }
  }
  sm80::sync_threads();

  // ---- O = sum of the partials / l, and the LSE; one 8-column chunk per item
  for (int idx = tid; idx < kRows * kChunks; idx += Traits::kNThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t rg = row0 + r;
    // Every item reads (a shared 16-byte load is warp-wide); only rows and
    // columns that exist are stored.
    const float m = row_max(r);
    float l = 0.f;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int x = 0; x < kWarps; ++x) {
      const uint32_t st = sStat + uint32_t(((x * kRows + r) * 4 * 2) * 4);  // the copy of the row's first lane
      const float mx = sm80::ld_shared_f32(st);
      if (mx != -INFINITY) l += sm80::ld_shared_f32(st + 4) * sm80::fast_exp2(mx - m);
      const uint32_t row = sO + uint32_t((x * kRows + r) * Traits::kORowFloats * 4);
      const uint4 lo = sm80::ld_shared_v4(row + uint32_t(c * 16));
      const uint4 hi = sm80::ld_shared_v4(row + uint32_t((kHeadDim / 2 + c * 4) * 4));
      const uint32_t bits[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += sm80::u32_as_float(bits[e]);
    }
    const float inv = l > 0.f ? sm80::fast_rcp(l) : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;
    const float lse = l > 0.f ? (m + sm80::fast_log2(l)) * kLn2 : -INFINITY;
    if (rg >= rows_total || c >= d_chunks) continue;
    const int32_t i = cta.row_i(rg);
    const int h = cta.row_h(rg);
    if (w.num_splits == 1) {
      auto* out = static_cast<Element*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(i) * p.o_row_stride +
                  int64_t(h) * p.o_head_stride + c * 8;
      sm80::st_global_v4(out, pack8<Element>(acc));
      if (c == 0) sm80::st_global_f32(p.lse + cta.seq.lse_index(p, h, i), lse);
    } else {
      const int64_t row = (int64_t(b) * p.seqlen_q + i) * p.num_heads + h;
      const int64_t rows = int64_t(p.batch) * p.seqlen_q * p.num_heads;
      float* dst = w.o_accum + (int64_t(blockIdx.z) * rows + row) * p.head_dim + c * 8;
      sm80::st_global_v4(dst, uint4{float_bits(acc[0]), float_bits(acc[1]), float_bits(acc[2]), float_bits(acc[3])});
      sm80::st_global_v4(dst + 4, uint4{float_bits(acc[4]), float_bits(acc[5]), float_bits(acc[6]), float_bits(acc[7])});
      if (c == 0) sm80::st_global_f32(w.lse_accum + int64_t(blockIdx.z) * rows + row, lse);
    }
  }
}

}  // namespace kvcache
}  // namespace cuda
}  // namespace pyfastattn
