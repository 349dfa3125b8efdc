// Compile-time shape of one attention backward variant: tile sizes per head
// dim, how the 4 warps split each of the three products, and the
// shared-memory layout.
//
// Light header (no kernel code): the launcher includes it to size shared
// memory and the workspace without pulling in the kernel.
#pragma once

#include <cstdint>

namespace pyfastattn {
namespace cuda {
namespace attention {

// Query rows (kBlockM) per step and key rows (kBlockN) per CTA. A CTA owns
// kBlockN keys of one (kv head, sequence) for its whole life and keeps their
// dK and dV in registers; query blocks of every query head of the GQA group
// stream past it. Per-thread fp32 registers (4 warps):
//   dK + dV: 2 * kBlockN * d / 128      S^T + dP^T: 2 * kBlockN * kBlockM / 128
//   d     M x N    dK+dV   S+dP    smem (K,V + 2 stages of Q,dO + P,dS + lse,D)
//   32   64 x 64     32     64      8 + 16 + 16 + 1  =  41 KB
//   64   64 x 64     64     64     16 + 32 + 16 + 1  =  65 KB
//   96   64 x 64     96     64     24 + 48 + 16 + 1  =  89 KB
//   128  64 x 32     64     32     16 + 64 +  8 + 1  =  89 KB
//   256  64 x 16     64     16     16 +128 +  4 + 1  = 149 KB
// (+ 2 * kBlockM * kBlockN / 8 bytes of dropout keep bits, always reserved:
// 1 KB at N = 64, which moves no variant's CTAs per SM on sm_80 or sm_90 --
// registers hold it at 2 CTAs per SM for d <= 64 and smem at 1 (sm_80) or
// 2 (sm_90) above; + 2 * kBlockM * (2 * kBlockN + 4) bytes of attn_mask
// staging with a mask.)
// ptxas needs ~100-150 registers beyond these accumulators (addresses, the
// masking paths, the pipeline); 64 x 64 at d = 128 and 32 x 32 at d = 256
// spilled (PERF_NOTES.md). These are first, register-driven choices; the GPU
// session is to tune them (8 warps and N = 128 at d = 128, as FA2 does).
template <int kHeadDim>
struct AttentionBwdTileShape {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kHeadDim == 256 ? 16 : (kHeadDim == 128 ? 32 : 64);
};

template <int kHeadDim_, typename Element_>
struct AttentionBwdTraits {
  using Element = Element_;  // __half or __nv_bfloat16
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = AttentionBwdTileShape<kHeadDim>::kBlockM;
  static constexpr int kBlockN = AttentionBwdTileShape<kHeadDim>::kBlockN;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kRowChunks = kHeadDim / 8;  // 16-byte chunks per Q/K/V/dO smem row

  // Product A: S^T = K Q^T and dP^T = V dO^T, [kBlockN keys x kBlockM queries].
  // Warps split the keys first (16 per warp), then the queries.
  static constexpr int kWarpsKeyA = kBlockN / 16 < kNWarps ? kBlockN / 16 : kNWarps;
  static constexpr int kWarpsQueryA = kNWarps / kWarpsKeyA;
  static constexpr int kKeyTilesA = kBlockN / 16 / kWarpsKeyA;      // m16 tiles per warp
  static constexpr int kQueryTilesA = kBlockM / 8 / kWarpsQueryA;   // n8 tiles per warp
  // Product B: dV += P^T dO and dK += dS^T Q, [kBlockN keys x d]: keys, then d.
  static constexpr int kWarpsKeyB = kWarpsKeyA;
  static constexpr int kWarpsDimB = kNWarps / kWarpsKeyB;
  static constexpr int kKeyTilesB = kBlockN / 16 / kWarpsKeyB;
  static constexpr int kDimTilesB = kHeadDim / 8 / kWarpsDimB;
  // Product C: dQ += dS K, [kBlockM queries x d]: queries, then d; computed
  // kDimTilesChunkC n8 tiles at a time and added to the fp32 dQ accumulator.
  static constexpr int kWarpsQueryC = kBlockM / 16 < kNWarps ? kBlockM / 16 : kNWarps;
  static constexpr int kWarpsDimC = kNWarps / kWarpsQueryC;
  static constexpr int kQueryTilesC = kBlockM / 16 / kWarpsQueryC;
  static constexpr int kDimTilesC = kHeadDim / 8 / kWarpsDimC;
  // One swizzle window of d (8 chunks; 4 for d = 32, 96): SwizzledRows::kWindow.
  static constexpr int kDimTilesChunkC = kHeadDim % 64 == 0 ? 8 : 4;

  // Shared memory, in this order (all offsets multiples of 128 bytes):
  static constexpr int kSmemKVBytes = kBlockN * kHeadDim * 2;  // K; V
  static constexpr int kSmemQBytes = kBlockM * kHeadDim * 2;   // Q[2]; dO[2]
  static constexpr int kSmemPBytes = kBlockN * kBlockM * 2;    // P^T; dS^T ([key][query])
  static constexpr int kSmemStatBytes = kBlockM * 4 * 2;       // [2]: lse * log2(e), D
  // [2]: dropout keep bits, [query][key / 8] bytes (bit g of byte n: key 8n + g).
  static constexpr int kSmemDropBytes = kBlockM * kBlockN / 8;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kSmemKVBytes;
  static constexpr int kOffQ = kOffV + kSmemKVBytes;
  static constexpr int kOffDO = kOffQ + 2 * kSmemQBytes;
  static constexpr int kOffP = kOffDO + 2 * kSmemQBytes;
  static constexpr int kOffDS = kOffP + kSmemPBytes;
  static constexpr int kOffStat = kOffDS + kSmemPBytes;
  static constexpr int kOffDrop = kOffStat + 2 * kSmemStatBytes;
  static constexpr int kOffMask = kOffDrop + 2 * kSmemDropBytes;
  static constexpr int kSmemBytes = kOffMask;
  // attn_mask staging, per stage (as in the forward: kBlockM query rows of
  // kBlockN values plus one word for the row's misalignment).
  static constexpr int kMaskRowBytes = kBlockN * 2 + 4;
  static constexpr int kSmemMaskBytes = kBlockM * kMaskRowBytes;

  static_assert(sizeof(Element) == 2, "attention backward runs on 16-bit types (fp16, bf16)");
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256,
                "compiled head dims are multiples of 32 up to 256 (32, 64, 96, 128, 256)");
  static_assert(kBlockM % 32 == 0, "P^T / dS^T rows are swizzled rows of a multiple of 32 queries");
  static_assert(kBlockN % 16 == 0, "key blocks are whole m16 tiles");
  static_assert(kWarpsKeyA * kWarpsQueryA == kNWarps && kWarpsQueryC * kWarpsDimC == kNWarps,
                "the warps tile every product exactly");
  static_assert(kQueryTilesA % 2 == 0 && kDimTilesB % 2 == 0,
                "ldmatrix.x4 loads two n8 tiles at a time");
  static_assert(kDimTilesC % kDimTilesChunkC == 0, "dQ is computed in whole chunks of n8 tiles");
  // A warp's column offset into a swizzled d-row must be a whole number of
  // swizzle windows (8 chunks), so that LdmatrixAddrs can take it as a base.
  static_assert(kWarpsDimB == 1 || (kHeadDim / kWarpsDimB / 8) % 8 == 0,
                "product B's per-warp d offset must be a multiple of 64 columns");
  static_assert(kWarpsDimC == 1 || (kHeadDim / kWarpsDimC / 8) % 8 == 0,
                "product C's per-warp d offset must be a multiple of 64 columns");
  static_assert(2 * kBlockM <= kNThreads, "one thread per statistic when staging lse and D");
  static_assert(kNThreads % kBlockM == 0, "attn_mask staging gives each row 1 or 2 threads");
  static_assert((kBlockN * kRowChunks) % kNThreads == 0,
                "the dK/dV store gives every thread the same number of 16-byte chunks");
  static_assert(kSmemBytes % 128 == 0, "the mask staging starts 128-byte aligned");
  static_assert(kSmemDropBytes % 4 == 0, "the keep bits are staged as 32-bit words");
};

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
