// The FFN GEMM kernels: one tensor-core main loop (mma.sync m16n8k16, ldmatrix,
// a 4-stage cp.async pipeline, swizzled shared memory) and three epilogues
// (ffn_gemm.h says what each computes). Written against the wrappers of
// ../attention/sm80_primitives.cuh and ffn_primitives.cuh only, so that
// emu/ffn_gemm_emu_test.cc runs it on the CPU emulation.
//
// CTA: 128 threads = 2 x 2 warps. Tiles (rows x cols of C per CTA):
//   NT plain (kFwdAct, kBiasResidual): kBM x 128, one B tile
//   NT gated (kFwdAct gated):         kBM x 64 of gate AND of up: two B tiles
//                                      (W1 and W3 rows of the same columns)
//   NN (kBwdAct):                     kBM x 128
// with kBM = 128 (64 for m <= 64, see gemm_block_m). Each warp owns
// (kBM / 2) x (cols / 2) of each B tile: at kBM 128, 64 x 64 plain (128 fp32
// accumulators per thread) or 64 x 32 of gate and of up (also 128).
// kBK = 32: 64-byte shared rows for the [rows][k] tiles, swizzled by XOR of the
// 16-byte chunk index with (row / 2) % 4, which makes each 8-row ldmatrix
// phase hit 8 distinct 16-byte bank groups; the NN tile [k][n] has 256-byte
// rows, swizzled by chunk ^ (row % 8). Shared memory: 4 stages x 16 KiB
// (kBM 128) or 12 KiB (kBM 64).
//
// Bounds: rows of A past m and columns past n are never read (cp.async
// zero-fills them, with an in-bounds source address) and never stored; k and
// n must be multiples of 8 (ffn_gemm_unsupported_reason), so a 16-byte chunk
// is either wholly inside or wholly outside.
#pragma once

#include <cstdint>

#include "ffn_act.cuh"
#include "ffn_gemm.h"
#include "ffn_primitives.cuh"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template <int kBM_, GemmEpilogue kEpi_, bool kGated_>
struct GemmTile {
  static constexpr GemmEpilogue kEpi = kEpi_;
  static constexpr bool kGated = kGated_ && kEpi_ != GemmEpilogue::kBiasResidual;
  static constexpr bool kNN = kEpi_ == GemmEpilogue::kBwdAct;  // B stored [k][n]
  static constexpr int kNumB = (kEpi_ == GemmEpilogue::kFwdAct && kGated) ? 2 : 1;
  static constexpr int kThreads = 128, kWarpsM = 2, kWarpsN = 2;
  static constexpr int kBM = kBM_;
  static constexpr int kBN = kNumB == 2 ? 64 : 128;  // output columns per CTA (per B tile)
  static constexpr int kBK = 32, kStages = 4;
  static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;
  static constexpr int kMT = kWM / 16, kNT = kWN / 8;  // m16 / n8 MMA tiles per warp
  static constexpr int kABytes = kBM * kBK * 2;
  static constexpr int kBBytes = kNumB * kBN * kBK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kBM == 64 || kBM == 128, "kBM must be 64 or 128");
  static_assert(kNT % 2 == 0, "B fragments load two n8 tiles per ldmatrix.x4");
  static_assert(kBM * 4 % kThreads == 0 && kNumB * kBN * 4 % kThreads == 0 &&
                    kBK * kBN / 8 % kThreads == 0,
                "every thread issues the same number of 16-byte copies");
  static_assert(!kNN || kBN / 8 >= 8, "the NN swizzle XORs 3 bits of the chunk index");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][32] tile.
PFA_ATTN_DEVICE uint32_t nt_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}
// ... in a [32][kBN] tile (kBN / 8 chunks per row).
template <int kBN>
PFA_ATTN_DEVICE uint32_t nn_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * kBN * 2 + ((chunk ^ (row & 7)) << 4));
}

template <typename T>
PFA_ATTN_DEVICE float lo_of(uint32_t v) {
  return sm80::bits_to_float<T>(v & 0xffffu);
}
template <typename T>
PFA_ATTN_DEVICE float hi_of(uint32_t v) {
  return sm80::bits_to_float<T>(v >> 16);
}

// The two elements (col, col + 1) of a bias vector, or zeros.
template <typename T>
PFA_ATTN_DEVICE void load_pair(const void* base, int64_t offset, float& x0, float& x1) {
  if (base == nullptr) {
    x0 = x1 = 0.f;
    return;
  }
  const uint32_t v = ld_global_b32(static_cast<const T*>(base) + offset);
  x0 = lo_of<T>(v);
  x1 = hi_of<T>(v);
}

template <typename T>
PFA_ATTN_DEVICE void store_pair(void* base, int64_t offset, float x0, float x1) {
  st_global_b32(static_cast<T*>(base) + offset, sm80::pack2<T>(x0, x1));
}

// Issues the cp.async copies of k-tile `kt` into shared stage `stage`.
template <typename T, typename Tile>
PFA_ATTN_DEVICE void load_stage(const FfnGemmParams& p, uint32_t smem, int stage, int64_t kt,
                                int64_t m0, int64_t n0) {
  const int tid = static_cast<int>(threadIdx.x);
  const uint32_t sa = smem + stage * Tile::kStageBytes;
  const uint32_t sb = sa + Tile::kABytes;
  const int64_t k0 = kt * Tile::kBK;
  const T* a = static_cast<const T*>(p.a);
#pragma unroll
  for (int i = 0; i < Tile::kBM * 4 / Tile::kThreads; ++i) {
    const int idx = tid + i * Tile::kThreads, row = idx >> 2, chunk = idx & 3;
    const int64_t gm = m0 + row, gk = k0 + chunk * 8;
    const bool valid = gm < p.m && gk < p.k;
    sm80::cp_async_16(sa + nt_offset(row, chunk), valid ? a + gm * p.a_row_stride + gk : a, valid);
  }
  if constexpr (!Tile::kNN) {
#pragma unroll
    for (int i = 0; i < Tile::kNumB * Tile::kBN * 4 / Tile::kThreads; ++i) {
      const int idx = tid + i * Tile::kThreads, row = idx >> 2, chunk = idx & 3;
      const int which = row / Tile::kBN;  // 0: W1 / W2, 1: W3
      const T* b = static_cast<const T*>(which ? p.b_up : p.b);
      const int64_t gn = n0 + row % Tile::kBN, gk = k0 + chunk * 8;
      const bool valid = gn < p.n && gk < p.k;
      sm80::cp_async_16(sb + nt_offset(row, chunk), valid ? b + gn * p.b_row_stride + gk : b,
                        valid);
    }
  } else {
    constexpr int kChunks = Tile::kBN / 8;
    const T* b = static_cast<const T*>(p.b);
#pragma unroll
    for (int i = 0; i < Tile::kBK * kChunks / Tile::kThreads; ++i) {
      const int idx = tid + i * Tile::kThreads, row = idx / kChunks, chunk = idx % kChunks;
      const int64_t gk = k0 + row, gn = n0 + chunk * 8;
      const bool valid = gk < p.k && gn < p.n;
      sm80::cp_async_16(sb + nn_offset<Tile::kBN>(row, chunk),
                        valid ? b + gk * p.b_row_stride + gn : b, valid);
    }
  }
}

// acc[b][mt][nt] += the warp's share of one shared stage.
template <typename T, typename Tile>
PFA_ATTN_DEVICE void compute_stage(uint32_t smem, int stage, int wm, int wn, int lane,
                                   float (&acc)[Tile::kNumB][Tile::kMT][Tile::kNT][4]) {
  const uint32_t sa = smem + stage * Tile::kStageBytes;
  const uint32_t sb = sa + Tile::kABytes;
  const int l8 = lane & 7, lm = lane >> 3;  // row within an 8x8 matrix, matrix index
#pragma unroll
  for (int kk = 0; kk < Tile::kBK / 16; ++kk) {
    uint32_t af[Tile::kMT][4];
#pragma unroll
    for (int mt = 0; mt < Tile::kMT; ++mt) {
      // matrices: rows 0-7 / 8-15 x k 0-7, then the same for k 8-15: a0..a3
      const int row = wm * Tile::kWM + mt * 16 + (lm & 1) * 8 + l8;
      sm80::ldmatrix_x4(af[mt], sa + nt_offset(row, kk * 2 + (lm >> 1)));
    }
    uint32_t bf[Tile::kNumB][Tile::kNT][2];
#pragma unroll
    for (int bi = 0; bi < Tile::kNumB; ++bi) {
#pragma unroll
      for (int np = 0; np < Tile::kNT / 2; ++np) {
        uint32_t r[4];
        if constexpr (!Tile::kNN) {
          // [n][k] rows; matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
          // (n 8-15, k 8-15) = b0, b1 of n8 tile 2np, then of tile 2np + 1
          const int row = bi * Tile::kBN + wn * Tile::kWN + np * 16 + (lm >> 1) * 8 + l8;
          sm80::ldmatrix_x4(r, sb + nt_offset(row, kk * 2 + (lm & 1)));
        } else {
          // [k][n] rows, transposed: matrices (k 0-7, n 0-7), (k 8-15, n 0-7),
          // (k 0-7, n 8-15), (k 8-15, n 8-15): the same b0, b1 order
          const int krow = kk * 16 + (lm & 1) * 8 + l8;
          const int chunk = (wn * Tile::kWN + np * 16) / 8 + (lm >> 1);
          sm80::ldmatrix_x4_trans(r, sb + nn_offset<Tile::kBN>(krow, chunk));
        }
        bf[bi][2 * np][0] = r[0];
        bf[bi][2 * np][1] = r[1];
        bf[bi][2 * np + 1][0] = r[2];
        bf[bi][2 * np + 1][1] = r[3];
      }
    }
#pragma unroll
    for (int bi = 0; bi < Tile::kNumB; ++bi)
#pragma unroll
      for (int mt = 0; mt < Tile::kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < Tile::kNT; ++nt)
          sm80::mma_m16n8k16<T>(acc[bi][mt][nt], af[mt], bf[bi][nt][0], bf[bi][nt][1]);
  }
}

// Accumulator element i of tile (mt, nt) of warp (wm, wn) is C[row, col + i % 2]
// with row = m0 + wm kWM + mt 16 + lane / 4 + 8 (i / 2),
//      col = n0 + wn kWN + nt 8 + 2 (lane % 4).
template <typename T, typename Tile>
PFA_ATTN_DEVICE void epilogue(const FfnGemmParams& p,
                              const float (&acc)[Tile::kNumB][Tile::kMT][Tile::kNT][4],
                              int64_t m0, int64_t n0, int wm, int wn, int lane) {
  const int g = lane >> 2, c = lane & 3;
  const int64_t row0 = m0 + wm * Tile::kWM + g;
  const int64_t col0 = n0 + wn * Tile::kWN + 2 * c;
  [[maybe_unused]] float colsum[Tile::kGated ? 2 : 1][Tile::kNT][2] = {};

#pragma unroll
  for (int nt = 0; nt < Tile::kNT; ++nt) {
    const int64_t col = col0 + nt * 8;
    if (col >= p.n) continue;  // n % 8 == 0: col + 1 < n too
    float b0, b1, bu0 = 0.f, bu1 = 0.f;
    load_pair<T>(p.bias, col, b0, b1);
    if constexpr (Tile::kGated) load_pair<T>(p.bias_up, col, bu0, bu1);
#pragma unroll
    for (int mt = 0; mt < Tile::kMT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row0 + mt * 16 + half * 8;
        if (row >= p.m) continue;
        const float c0 = acc[0][mt][nt][2 * half], c1 = acc[0][mt][nt][2 * half + 1];
        if constexpr (Tile::kEpi == GemmEpilogue::kFwdAct) {
          const float a0 = c0 + b0, a1 = c1 + b1;
          float u0 = 1.f, u1 = 1.f;
          if constexpr (Tile::kGated) {
            u0 = acc[1][mt][nt][2 * half] + bu0;
            u1 = acc[1][mt][nt][2 * half + 1] + bu1;
            if (p.pre_up) store_pair<T>(p.pre_up, row * p.pre_up_row_stride + col, u0, u1);
          }
          if (p.pre_gate) store_pair<T>(p.pre_gate, row * p.pre_gate_row_stride + col, a0, a1);
          store_pair<T>(p.out, row * p.out_row_stride + col,
                        step_fwd(p.act, a0, u0, Tile::kGated), step_fwd(p.act, a1, u1, Tile::kGated));
        } else if constexpr (Tile::kEpi == GemmEpilogue::kBiasResidual) {
          float r0, r1;
          load_pair<T>(p.residual, row * p.residual_row_stride + col, r0, r1);
          store_pair<T>(p.out, row * p.out_row_stride + col, c0 + b0 + r0, c1 + b1 + r1);
        } else {  // kBwdAct: c = dh
          float a0, a1, u0 = 1.f, u1 = 1.f;
          load_pair<T>(p.gate_in, row * p.gate_in_row_stride + col, a0, a1);
          a0 += b0;
          a1 += b1;
          if constexpr (Tile::kGated) {
            load_pair<T>(p.up_in, row * p.up_in_row_stride + col, u0, u1);
            u0 += bu0;
            u1 += bu1;
          }
          float dg0, du0, h0, dg1, du1, h1;
          step_bwd(p.act, a0, u0, c0, Tile::kGated, dg0, du0, h0);
          step_bwd(p.act, a1, u1, c1, Tile::kGated, dg1, du1, h1);
          store_pair<T>(p.out, row * p.out_row_stride + col, dg0, dg1);
          if constexpr (Tile::kGated) {
            store_pair<T>(p.out_up, row * p.out_up_row_stride + col, du0, du1);
            colsum[1][nt][0] += du0;
            colsum[1][nt][1] += du1;
          }
          if (p.out_h) store_pair<T>(p.out_h, row * p.out_h_row_stride + col, h0, h1);
          colsum[0][nt][0] += dg0;
          colsum[0][nt][1] += dg1;
        }
      }
    }
  }

  if constexpr (Tile::kEpi == GemmEpilogue::kBwdAct) {
    // Column sums over the warp's kWM rows: reduce over g (lane bits 2..4),
    // then lanes 0..3 hold the sums of columns col0 + nt 8 + {0, 1}.
    const int64_t partial_row = static_cast<int64_t>(blockIdx.x) * Tile::kWarpsM + wm;
#pragma unroll
    for (int which = 0; which < (Tile::kGated ? 2 : 1); ++which) {
      float* dst = which ? p.dbias_up_partial : p.dbias_partial;
      if (dst == nullptr) continue;  // uniform across the CTA
#pragma unroll
      for (int nt = 0; nt < Tile::kNT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v = colsum[which][nt][j];
          v += sm80::shfl_xor(v, 4);
          v += sm80::shfl_xor(v, 8);
          v += sm80::shfl_xor(v, 16);
          const int64_t col = col0 + nt * 8 + j;
          if (g == 0 && col < p.n) sm80::st_global_f32(dst + partial_row * p.n + col, v);
        }
      }
    }
  }
}

// The whole CTA: main loop, then epilogue. A __device__ function so that the
// emulator test can run it; ffn_gemm_launch_template.h wraps it in a kernel.
template <typename T, typename Tile>
PFA_ATTN_DEVICE void ffn_gemm_cta(const FfnGemmParams& p) {
  const uint32_t smem = sm80::smem_u32(sm80::dynamic_smem());
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp / Tile::kWarpsN, wn = warp % Tile::kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Tile::kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * Tile::kBN;
  const int64_t ktiles = (p.k + Tile::kBK - 1) / Tile::kBK;

  float acc[Tile::kNumB][Tile::kMT][Tile::kNT][4];
#pragma unroll
  for (int bi = 0; bi < Tile::kNumB; ++bi)
#pragma unroll
    for (int mt = 0; mt < Tile::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Tile::kNT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[bi][mt][nt][i] = 0.f;

  // Prologue: stages 0 .. kStages - 2 in flight, one commit group each (empty
  // groups past the last k-tile keep the wait counts uniform).
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < ktiles) load_stage<T, Tile>(p, smem, s, s, m0, n0);
    sm80::cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    // Group kt has landed (at most kStages - 2 younger ones pending); the
    // barrier publishes it and retires every warp's reads of stage kt - 1,
    // which the prefetch below overwrites.
    sm80::cp_async_wait<Tile::kStages - 2>();
    sm80::sync_threads();
    const int64_t next = kt + Tile::kStages - 1;
    if (next < ktiles) load_stage<T, Tile>(p, smem, static_cast<int>(next % Tile::kStages), next, m0, n0);
    sm80::cp_async_commit();
    compute_stage<T, Tile>(smem, static_cast<int>(kt % Tile::kStages), wm, wn, lane, acc);
  }
  sm80::cp_async_wait<0>();
  epilogue<T, Tile>(p, acc, m0, n0, wm, wn, lane);
}

// Grid of the CTA tiles: x over row blocks, y over column blocks.
template <typename Tile>
inline dim3 gemm_grid(const FfnGemmParams& p) {
  return dim3(static_cast<unsigned>((p.m + Tile::kBM - 1) / Tile::kBM),
              static_cast<unsigned>((p.n + Tile::kBN - 1) / Tile::kBN), 1);
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
