// The CPU attention's scheduling: which instruction set a call runs on, the
// block sizes, the context of a call, and the parallel loop over tasks.
#include "attention_schedule.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

// With PyTorch's OpenMP backend, at::parallel_for is inline code in
// ATen/ParallelOpenMP.h: without -fopenmp on this file it quietly runs on
// one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "attention_schedule.cpp compiled without -fopenmp: the CPU attention kernels will use one thread"
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

namespace pyfastattn {
namespace cpu {
namespace {

enum class IsaCap : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

IsaCap isa_cap() {
  static const IsaCap cap = [] {
    const char* env = std::getenv("PYFASTATTN_CPU_ISA");
    const std::string v = env ? env : "";
    if (v.empty() || v == "avx512bf16") return IsaCap::kAvx512Bf16;
    if (v == "avx512") return IsaCap::kAvx512;
    if (v == "avx2") return IsaCap::kAvx2;
    if (v == "portable") return IsaCap::kPortable;
    TORCH_CHECK_VALUE(false, "PYFASTATTN_CPU_ISA must be one of avx512bf16, avx512, avx2, portable; got '",
                      v, "'");
  }();
  return cap;
}

class Arena {
 public:
  explicit Arena(int64_t floats) {
    bytes_ = size_t(std::max<int64_t>(floats, 1)) * sizeof(float);
    data_ = static_cast<float*>(::operator new(bytes_, std::align_val_t(64)));
    std::memset(data_, 0, bytes_);  // stale lanes past a tile's edge stay finite
  }
  ~Arena() { ::operator delete(data_, std::align_val_t(64)); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  float* data() const { return data_; }

 private:
  float* data_;
  size_t bytes_;
};

}  // namespace

CpuPath cpu_path(DType dtype) {
  const IsaCap cap = isa_cap();
#if PFA_X86
  if (dtype == DType::kBFloat16 && cap >= IsaCap::kAvx512Bf16 && cpu_has_avx512_bf16())
    return CpuPath::kAvx512Bf16;
  if (cap >= IsaCap::kAvx512 && cpu_has_avx512()) return CpuPath::kAvx512;
  if (cap >= IsaCap::kAvx2 && cpu_has_avx2()) return CpuPath::kAvx2;
#endif
  (void)cap;
  (void)dtype;
  return CpuPath::kPortable;
}

void run_tasks(const Ctx& c, BlockFn fn, Kind kind, int64_t floats, const std::vector<Task>& tasks,
               const std::vector<int64_t>& cost) {
  if (tasks.empty()) return;
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  // Head by head, and within a head longest first: consecutive tasks share
  // the head's K and V (or Q and dO), which then stay in the core's L2; the
  // tasks of the last head end short, so threads still finish together.
  // (Longest first over all tasks cycled through the heads, reading K and V
  // from L3 for every task: PERF_NOTES "issue 21 v3".)
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    const Task& a = tasks[size_t(x)];
    const Task& b = tasks[size_t(y)];
    if (a.b != b.b) return a.b < b.b;
    if (a.h != b.h) return a.h < b.h;
    return cost[x] > cost[y];
  });
  std::atomic<int64_t> next{0};
  const int64_t n = int64_t(tasks.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Arena arena(floats);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(kind, c, arena.data(), tasks[size_t(order[size_t(i)])]);
    }
  });
}

// Block sizes depend on the shape only, never on the thread count: the
// summation order follows the blocks, so any thread count gives the same
// bits. Measured on one Zen 5 core (GFLOP/s from CPU time, B1 H4 S2048,
// fp32 / bf16; query rows x keys per tile):
//   forward,  D = 64 : 64x256 189 / 365, 128x256 217 / 395, 128x512 218 / 393
//   forward,  D = 256: 64x256 193 / 386, 128x256 192 / 355
//   backward, D = 64 : 64x256 146 / 268, 128x256 150 / 272, 256x256 107 / 273
//   backward, D = 128: 64x256 152 / 290, 128x256 121 / 287
// so 256 keys per tile, and 128 query rows unless the head dim makes the
// per-block buffers too large for L2 (backward: Q^T, dO^T, Q, dO blocks).
// Short sequences get smaller blocks (less scratch to clear), and problems
// with few blocks get smaller ones so that 32 threads find work (query blocks
// for the forward and backward pass 1, key blocks for backward pass 2).
// The backward without a window asks for 16: with 32, B1 H8 S256 D64 got
// 64 x 64 tiles, where the fixed costs per tile weigh most (bf16 backward, 2
// threads: 0.56-0.62 ms with 64 x 64, 0.52-0.54 with 128 x 128); causal
// keeps 32 (S512 causal: 1.33-1.37 ms with 32, 1.41-1.43 with 16, the larger
// diagonal tiles). PERF_NOTES.md.
int64_t min_tasks_bwd(const AttentionFwdParams& p) {
  return p.window_left < 0 && p.window_right < 0 ? 16 : 32;
}

namespace {

Blocks choose_blocks(const AttentionFwdParams& p, bool backward) {
  const int64_t kMinTasks = backward ? min_tasks_bwd(p) : 32;
  const int d = std::max(p.head_dim, p.head_dim_v);
  Blocks b;
  b.q = (backward ? d <= 64 : d <= 128) ? 128 : 64;
  b.k = kMaxKeyTile;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows =
      (varlen ? int64_t(p.cu_seqlens_q[p.batch]) : int64_t(p.batch) * p.seqlen_q) * p.num_heads;
  const int64_t keys =
      (varlen ? int64_t(p.cu_seqlens_k[p.batch]) : int64_t(p.batch) * p.seqlen_k) * p.num_heads_k;
  while (b.q > 32 && rows < kMinTasks * b.q) b.q /= 2;
  while (backward && b.k > 64 && keys < kMinTasks * b.k) b.k /= 2;
  b.q = int(std::min<int64_t>(b.q, round_up(std::max(p.seqlen_q, 1), kLanes)));
  b.k = int(std::min<int64_t>(b.k, round_up(std::max(p.seqlen_k, 1), kLanes)));
  return b;
}

}  // namespace

Ctx make_ctx(const AttentionFwdParams& p, bool backward) {
  Ctx c{};
  c.p = &p;
  c.pb = nullptr;
  c.blk = choose_blocks(p, backward);
  c.group = p.num_heads / p.num_heads_k;
  c.d = p.head_dim;
  c.dv = p.head_dim_v;
  c.softcap = p.softcap > 0.0f;
  c.score_scale = c.softcap ? p.scale / p.softcap : p.scale * kLog2e;
  c.cap_log2 = c.softcap ? p.softcap * kLog2e : 0.0f;
  c.dsum = nullptr;
  c.kv_pack = nullptr;
  c.kv_first = nullptr;
  c.dropout = p.dropout_p > 0.0f;
  c.alibi = p.alibi_slopes != nullptr;
  c.dropout_rescale = c.dropout ? p.dropout_rescale : 1.0f;
  return c;
}

void query_tasks(const Ctx& c, std::vector<Task>& tasks, std::vector<int64_t>& cost) {
  const AttentionFwdParams& p = *c.p;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    for (int i0 = 0; i0 < si.len_q; i0 += c.blk.q) {
      const int m = std::min(c.blk.q, si.len_q - i0);
      const int64_t keys = std::max(0, si.key_hi(p, i0 + m - 1) - si.key_lo(p, i0));
      for (int h = 0; h < p.num_heads; ++h) {
        tasks.push_back(Task{b, h, i0});
        cost.push_back(int64_t(m) * keys + m);
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyfastattn
