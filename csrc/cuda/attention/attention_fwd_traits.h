// Compile-time shape of one attention forward variant: tile sizes per head
// dim, the per-warp MMA tiling they imply, and the shared-memory budget.
//
// Light header (no kernel code): the launcher includes it to size shared memory
// without pulling in the kernel.
#pragma once

#include <cstdint>

namespace pyfastattn {
namespace cuda {
namespace attention {

// Query rows (kBlockM) and key rows (kBlockN) per CTA for each compiled head
// dim. Every CTA has 4 warps; a warp owns kBlockM / 4 query rows, i.e.
// kBlockM / 64 m16 tiles. Per-thread fp32 accumulators are
//   O: (kBlockM / 64) * head_dim / 2     S: (kBlockM / 64) * kBlockN / 2
// and Q is read from shared memory per k-step, not held in registers.
//
// Two m16 tiles per warp (kBlockM = 128) let each K/V fragment feed two MMAs.
// Shared-memory bytes per m16n8k16 MMA, averaged over Q K^T and P V, are
// ~160-190 with two m16 tiles and ~290 with one; at the A100 tensor rate (2
// clk per MMA per SM) that is 80-96 B/clk against the 128 B/clk port, versus
// 144 B/clk (port-bound) with one.
//
// Registers set the rest: the kernel carries every feature (window, softcap,
// masks, varlen) as runtime branches in one variant, and ptxas needs ~60-90
// registers beyond the accumulators. Measured with nvcc 13.0 (-maxrregcount
// without __launch_bounds__, a proxy for headroom under the 255 cap):
//   d    BlockM x BlockN   O + S regs   fits in            smem Q + K + V
//   32     128 x 64         32 + 64     232 regs            8 + 4 + 4   = 16 KB
//   64     128 x 64         64 + 64     255 (232 spills)   16 + 8 + 8   = 32 KB
//   96     128 x 32         96 + 32     255 (128 x 64 spills 8 B at 255)
//                                                          24 + 6 + 6   = 36 KB
//   128    128 x 32        128 + 32     232 (128 x 64 needs ~252 live, spills)
//                                                          32 + 8 + 8   = 48 KB
//   256     64 x 32        128 + 16     200 (64 x 64 spills at 255 on sm_90a)
//                                                          32 + 16 + 16 = 64 KB
// d = 256 cannot take two m16 tiles per warp: O alone would be 256 registers.
// An attn_mask adds kSmemMaskBytes (kBlockM * (2 * kBlockN + 4)): 4-17 KB.
template <int kHeadDim>
struct AttentionFwdTileShape;
template <>
struct AttentionFwdTileShape<32> {
  static constexpr int kBlockM = 128, kBlockN = 64;
};
template <>
struct AttentionFwdTileShape<64> {
  static constexpr int kBlockM = 128, kBlockN = 64;
};
template <>
struct AttentionFwdTileShape<96> {
  static constexpr int kBlockM = 128, kBlockN = 32;
};
template <>
struct AttentionFwdTileShape<128> {
  static constexpr int kBlockM = 128, kBlockN = 32;
};
template <>
struct AttentionFwdTileShape<256> {
  static constexpr int kBlockM = 64, kBlockN = 32;
};

template <int kHeadDim_, typename Element_>
struct AttentionFwdTraits {
  using Element = Element_;  // __half or __nv_bfloat16
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = AttentionFwdTileShape<kHeadDim>::kBlockM;
  static constexpr int kBlockN = AttentionFwdTileShape<kHeadDim>::kBlockN;

  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kWarpRows = kBlockM / kNWarps;  // query rows per warp
  static constexpr int kMTiles = kWarpRows / 16;       // m16 tiles per warp
  static constexpr int kNTilesS = kBlockN / 8;         // n8 tiles of S = Q K^T
  static constexpr int kNTilesO = kHeadDim / 8;        // n8 tiles of O = P V
  static constexpr int kKStepsQK = kHeadDim / 16;      // k16 steps of Q K^T
  static constexpr int kKStepsPV = kBlockN / 16;       // k16 steps of P V
  static constexpr int kRowChunks = kHeadDim / 8;      // 16-byte chunks per smem row

  static constexpr int kSmemQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kSmemKVBytes = kBlockN * kHeadDim * 2;  // one K or one V tile
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;
  // attn_mask staging (only when a mask is given): kBlockM rows of kBlockN
  // 16-bit values (or bytes) plus one 4-byte word for the source row's
  // misalignment, since the mask rows are copied by aligned 4-byte words.
  static constexpr int kMaskRowBytes = kBlockN * 2 + 4;
  static constexpr int kSmemMaskBytes = kBlockM * kMaskRowBytes;

  static_assert(sizeof(Element) == 2, "attention forward runs on 16-bit types (fp16, bf16)");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256,
                "compiled head dims are multiples of 32 up to 256 (32, 64, 96, 128, 256)");
  static_assert(kWarpRows % 16 == 0 && (kMTiles == 1 || kMTiles == 2),
                "each warp owns one or two m16 tiles of query rows");
  static_assert(kBlockN % 16 == 0, "BlockN is a whole number of k16 steps of P V");
  static_assert(kNTilesS % 2 == 0 && kNTilesO % 2 == 0,
                "ldmatrix.x4 loads two n8 tiles at a time");
  static_assert(kNThreads % kBlockM == 0, "attn_mask staging gives each row 1 or 2 threads");
  static_assert((kWarpRows * kRowChunks) % 32 == 0,
                "the output store gives every lane the same number of 16-byte chunks");
};

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
