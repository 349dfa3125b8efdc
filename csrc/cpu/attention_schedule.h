// The CPU attention's shared frame: the context of one call (Ctx), tasks and
// their scratch, the instruction sets a task body is compiled for, and the
// per-instruction-set entry points that attention_fwd.cpp and the backward
// files instantiate for their task bodies. attention_schedule.cpp picks the
// block sizes and the instruction set and runs the tasks.
//
// How the work is cut (attention_cpu.h has the overview): tasks are blocks of
// query rows (forward, backward dQ, the one-pass backward's prep and
// reduction) or of key rows (backward dK/dV, the one-pass backward), handed
// out head by head, longest first within a head, from a shared counter inside
// at::parallel_for, so torch.set_num_threads applies, causal work balances
// and a head's K and V stay in L2 across its tasks. Block sizes depend
// on the shape only, never on the thread count, so results are bit-identical
// for any number of threads.
#pragma once

#include <memory>

#include <cstdint>
#include <vector>

#include "../attention/params.h"
#include "micro_gemm.h"
#include "simd.h"

namespace pyfastattn {
namespace cpu {

PFA_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Query rows per task and keys per tile (see choose_blocks for the numbers).
struct Blocks {
  int q;  // rows of a query block, a multiple of kLanes
  int k;  // keys of a key tile, even (bf16 pairs), at most kMaxKeyTile
};
constexpr int kMaxKeyTile = 256;

// A buffer of `floats` kept per calling thread between calls, up to
// kKeptBufferBytes (larger ones go to `temp`, freed by the caller): fresh
// multi-MiB buffers are page-faulted in on every call once glibc hands them
// back to the system (the one-pass backward, B1 H8 S1024 bf16, 2 threads:
// ~2000 faults per call, 10 ms instead of 7.6). Tag gives each user (the
// forward's K/V pack, the backward) its own buffer.
constexpr int64_t kKeptBufferBytes = int64_t(64) << 20;
template <class Tag>
float* kept_buffer(int64_t floats, std::unique_ptr<float[]>& temp) {
  thread_local std::unique_ptr<float[]> kept;
  thread_local int64_t kept_floats = 0;
  if (floats * int64_t(sizeof(float)) > kKeptBufferBytes) {
    temp.reset(new float[size_t(floats)]);
    return temp.get();
  }
  if (floats > kept_floats) {
    kept.reset(new float[size_t(floats)]);
    kept_floats = floats;
  }
  return kept.get();
}

// ---------------------------------------------------------------------------
// Shared context of one call.
// ---------------------------------------------------------------------------

struct Ctx {
  const AttentionFwdParams* p;
  const AttentionBwdParams* pb;  // backward only
  Blocks blk;
  int group;          // query heads per kv head
  int d, dv;          // head dims
  float score_scale;  // raw dot -> log2 units (no softcap) or tanh argument
  float cap_log2;     // softcap * log2(e); 0 when off
  bool softcap;
  float* dsum;  // backward: D = rowsum(dO * O), see dsum_index
  // One-pass backward (chunks > 0, see fused_chunks): dQ partial sums of each
  // key chunk, [chunks][rows][d] fp32 with rows indexed like dsum, and per
  // chunk and row whether that chunk wrote it (0: its partial is zero).
  int chunks;
  int64_t part_rows;
  float* dq_part;
  uint8_t* dq_touched;
  // One-pass backward, bf16 dot products only: Q^T, dO^T, Q and dO of every
  // query block in the products' B layouts (QoPack), packed once by the prep
  // pass instead of once per tile; nullptr when over kMaxPackBytes or another
  // path (then per tile). pack_first[b]: the sequence's first block index,
  // per head, see pack_parts (attention_bwd_fused.cpp).
  float* qo_pack;
  int64_t pack_floats;  // per query block
  const int64_t* pack_first;
  // Forward: K and V of every (sequence, kv head) in the products' operand
  // layouts (Tiles::a_rows / b_rows), packed once per call by a pass before
  // the query blocks instead of once per key tile of every query block
  // (KvPack, attention_fwd.cpp); nullptr: per tile. kv_first[b]: sequence
  // b's first key pair in the pack.
  float* kv_pack;
  const int64_t* kv_first;
  // Dropout and ALiBi (issue 17; attention_dropout.h, score_tile).
  bool dropout;           // p.dropout_p > 0
  bool alibi;             // p.alibi_slopes != nullptr: every tile goes through score_tile
  float dropout_rescale;  // 1 / (1 - p) (0 for p = 1), 1 without dropout: O and dV scale
};

// A query block (forward, dQ, prep, reduce) or a key block / chunk (dK dV,
// one-pass backward) of one (sequence, head).
struct Task {
  int b, h;  // sequence, head (query head: forward, dQ, prep, reduce; kv head: dK dV, one-pass)
  int i0;    // first row of the block (query or key), or the one-pass backward's chunk
};

// What a task computes; BlockFn runs one task of a kind.
enum class Kind { kFwdPack, kFwd, kBwdDq, kBwdDkDv, kBwdPrep, kBwdFused, kBwdReduce };

// Per-thread scratch: one 64-byte aligned block per worker (run_tasks; zeroed
// once, so stale lanes past a tile's edge stay finite), carved into tiles.
// Carver hands out 64-byte aligned sub-arrays; run it once with base =
// nullptr to size the block.
class Carver {
 public:
  explicit Carver(float* base) : base_(base) {}
  float* take(int64_t floats) {
    float* p = base_ ? base_ + used_ : nullptr;
    used_ += round_up(floats, 16);
    return p;
  }
  int64_t used() const { return used_; }

 private:
  float* base_;
  int64_t used_ = 0;
};

// ---------------------------------------------------------------------------
// The instruction sets. A task body is instantiated per set and compiled
// inside a function with that set's target attribute. gemm_bf16 exists only
// where bf16 inputs are multiplied as bf16 (AVX512-BF16).
// ---------------------------------------------------------------------------

struct IsaPortable {
  using Vec = VecPortable;
  static constexpr bool kAvx512 = false;
  static void gemm_f32(const GemmArgs& g) { gemm_portable(g); }
};
#if PFA_X86
struct IsaAvx512 {
  using Vec = VecAvx512;
  static constexpr bool kAvx512 = true;
  static void gemm_f32(const GemmArgs& g) { gemm_tiled<MicroF32Avx512>(g); }
  static void gemm_bf16(const GemmArgs& g) { gemm_tiled<MicroBf16Avx512>(g); }
};
struct IsaAvx2 {
  using Vec = VecAvx2;
  static constexpr bool kAvx512 = false;
  static void gemm_f32(const GemmArgs& g) { gemm_tiled<MicroF32Avx2>(g); }
};
#endif

// The path a call of this dtype takes on this CPU: the best one it supports,
// capped by PYFASTATTN_CPU_ISA (read once):
//   avx512bf16 (default; bf16 inputs only) > avx512 (bf16 inputs through fp32
//   products) > avx2 > portable.
// The cap lets the tests run every fallback on an AVX-512 machine; an unknown
// value is an error rather than a silent choice.
enum class CpuPath { kPortable, kAvx2, kAvx512, kAvx512Bf16 };
CpuPath cpu_path(DType dtype);

// ---------------------------------------------------------------------------
// Per-instruction-set task entry points. Body::run<Isa, T, CT>(kind, ctx,
// scratch, task) is always_inline and neutral; `flatten` inlines it, and
// through it the VecAvx512 / VecAvx2 primitives (which need the target), into
// these functions, so every instantiation is compiled for its instruction
// set. CT is the products' operand type: float, or uint32_t for bf16 pairs.
// ---------------------------------------------------------------------------

using BlockFn = void (*)(Kind, const Ctx&, float*, const Task&);

template <class Body, typename T>
void block_portable(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  Body::template run<IsaPortable, T, float>(kind, c, scratch, t);
}
#if PFA_X86
// CPUs with AVX2 + FMA but no AVX-512 (Haswell to Alder Lake, Zen 1-3).
template <class Body, typename T>
PFA_AVX2 __attribute__((flatten)) void block_avx2(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  Body::template run<IsaAvx2, T, float>(kind, c, scratch, t);
}
template <class Body, typename T>
PFA_AVX512 __attribute__((flatten)) void block_avx512(Kind kind, const Ctx& c, float* scratch,
                                                      const Task& t) {
  Body::template run<IsaAvx512, T, float>(kind, c, scratch, t);
}
// bf16 inputs on a CPU with AVX512-BF16: products as bf16 dot products.
template <class Body>
PFA_AVX512_BF16 __attribute__((flatten)) void block_avx512_bf16(Kind kind, const Ctx& c, float* scratch,
                                                                const Task& t) {
  Body::template run<IsaAvx512, c10::BFloat16, uint32_t>(kind, c, scratch, t);
}
#endif

// Body's entry point for the path cpu_path(dtype) chooses.
template <class Body, typename T>
BlockFn block_fn_for(CpuPath path) {
#if PFA_X86
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (path == CpuPath::kAvx512Bf16) return &block_avx512_bf16<Body>;
  }
  if (path >= CpuPath::kAvx512) return &block_avx512<Body, T>;
  if (path == CpuPath::kAvx2) return &block_avx2<Body, T>;
#endif
  (void)path;
  return &block_portable<Body, T>;
}

template <class Body>
BlockFn block_fn(DType dtype) {
  const CpuPath path = cpu_path(dtype);
  switch (dtype) {
    case DType::kFloat16:
      return block_fn_for<Body, c10::Half>(path);
    case DType::kBFloat16:
      return block_fn_for<Body, c10::BFloat16>(path);
    case DType::kFloat32:
    default:
      return block_fn_for<Body, float>(path);
  }
}

// ---------------------------------------------------------------------------
// Scheduling (attention_schedule.cpp).
// ---------------------------------------------------------------------------

// The context of one call: block sizes, head dims, the score scale; the
// backward's fields are left for attention_bwd to fill.
Ctx make_ctx(const AttentionFwdParams& p, bool backward);

// Query-block tasks of every (sequence, query head); cost = rows x keys seen.
void query_tasks(const Ctx& c, std::vector<Task>& tasks, std::vector<int64_t>& cost);

// Runs `fn` over the tasks with a scratch block of `scratch_floats` floats per
// worker, (sequence, head) by (sequence, head) and within one in order of
// decreasing estimated cost (longest first), handed out one at a time from a
// shared counter, so causal blocks balance across threads. The order only affects which thread runs a task, never its result.
void run_tasks(const Ctx& c, BlockFn fn, Kind kind, int64_t scratch_floats, const std::vector<Task>& tasks,
               const std::vector<int64_t>& cost);

// Tasks the backward asks for before it shrinks blocks (see choose_blocks).
int64_t min_tasks_bwd(const AttentionFwdParams& p);

}  // namespace cpu
}  // namespace pyfastattn
