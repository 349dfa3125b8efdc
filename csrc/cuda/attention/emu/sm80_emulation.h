// CPU emulation of the sm_80 primitives in ../sm80_primitives.cuh, for testing
// kernel logic on a machine without a GPU. Selected by PFA_ATTN_HOST_EMULATION;
// included from sm80_primitives.cuh in place of the PTX wrappers.
//
// Every CUDA thread of a CTA is a fiber (ucontext); the fibers of one CTA run
// round-robin, switching only at barriers and warp collectives, and CTAs run
// one after another, each to completion, in the dispatch order that
// PFA_EMU_CTA_ORDER names (see CtaOrder below): CUDA promises no order, so a
// kernel must pass in every one. Warp collectives (ldmatrix, mma, shuffles, __syncwarp)
// gather all 32 lanes' operands and compute each lane's result from the PTX
// ISA fragment layouts. cp.async copies land only when the issuing thread
// waits for their group.
//
// Checks, each a fatal error naming the operation:
//   - shared memory: a read of bytes whose cp.async has not been waited for;
//     a read of bytes another thread wrote, or a write of bytes another thread
//     read or wrote, with no barrier in between (__syncthreads, or __syncwarp
//     inside one warp): the data races a missing barrier would cause;
//   - shared reads of bytes never written in this CTA (garbage);
//   - shared and global accesses out of bounds or misaligned for their width
//     (global: outside the ranges the test registered, or a store outside the
//     ranges registered as outputs);
//   - cp.async source sizes outside [0, copy size];
//   - barrier deadlock (some threads never arrive) and warp divergence at a
//     collective;
//   - a CTA that waits for a value no CTA started before it has released
//     (spin_wait_equal): on the GPU that wait can hang for good, because the
//     CTA it waits for may have no multiprocessor until the waiter finishes.
// Shared-memory bank conflicts are counted, not fatal (bank_conflict_report).
//
// Numerics: the special-function instructions return their exact result
// moved by the documented worst-case error (fast_exp2, fast_tanh, fast_log2,
// fast_rcp, fast_div: see "special functions" below), and red.add.f32 flushes
// subnormal inputs and results to zero as the hardware does, so the tests'
// error figures are not lower bounds of the GPU's.
//
// Not modelled: timing, the memory model beyond barrier ordering, and the
// exact rounding of the tensor cores (products are exact in fp32 here, as in
// hardware; the accumulation order may differ).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define PFA_ATTN_DEVICE inline

namespace pyfastattn {
namespace emu {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 128;

// What the test is doing, printed with any fatal error.
inline std::string& context() {
  static std::string s;
  return s;
}

uint3 current_block_for_report();

[[noreturn]] inline void fatal(const char* what, uint32_t tid, uint64_t detail = 0) {
  const uint3 b = current_block_for_report();
  std::fprintf(stderr, "EMULATION ERROR: %s (thread %u, block %u %u %u, detail %llu)\n  in: %s\n",
               what, tid, b.x, b.y, b.z, static_cast<unsigned long long>(detail),
               context().c_str());
  std::fflush(stderr);
  std::_Exit(2);
}

struct Range {
  const char* begin;
  const char* end;
  bool writable;
};

struct PendingCopy {
  uint32_t dst;
  int size;
  int group;
  uint8_t data[16];
};

struct ThreadState {
  ucontext_t ctx;
  std::vector<char> stack;
  uint32_t tid = 0;
  bool done = false;
  bool waiting = false;
  bool wait_warp = false;
  uint64_t wait_gen = 0;
  std::vector<PendingCopy> pending;
  int next_group = 0;  // id of the group being filled
};

struct Slot {
  int op;
  uint32_t v[12];
};

struct WarpState {
  uint64_t gen = 0;
  int arrived = 0;
  uint64_t sync_epoch = 0;
  Slot slots[2][kWarp];
};

struct ShadowByte {
  int32_t writer = -1;
  uint32_t w_epoch = 0;
  uint64_t w_wepoch = 0;
  int32_t pending_writer = -1;
  uint32_t r_epoch = 0xffffffffu;
  uint64_t r_wepoch = 0;
  uint64_t readers[2] = {0, 0};
};

struct Stats {
  uint64_t ldmatrix = 0, ldmatrix_extra_wavefronts = 0;
  uint64_t sts = 0, sts_extra_wavefronts = 0;
  uint64_t cp_async_16 = 0;
  uint64_t lds128 = 0, lds128_extra_wavefronts = 0;
  uint64_t mma = 0, ctas = 0;
  uint64_t red_f32 = 0, turn_waits = 0;
};

struct Runtime {
  std::vector<Range> ranges;
  Stats stats;
  // current CTA
  uint3 block_idx{0, 0, 0};
  dim3 grid_dim{1, 1, 1};
  int nthreads = 0;
  std::vector<uint8_t> smem;
  std::vector<ShadowByte> shadow;
  ThreadState threads[kMaxThreads];
  WarpState warps[kMaxThreads / kWarp];
  uint64_t bar_gen = 0;
  int bar_arrived = 0;
  uint32_t epoch = 0;
  ucontext_t sched;
  int current = -1;
  uint3 thread_idx[kMaxThreads];
  std::function<void()> body;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline uint3 current_block_for_report() { return rt().block_idx; }

inline ThreadState& me() { return rt().threads[rt().current]; }
inline uint32_t my_tid() { return static_cast<uint32_t>(rt().current); }
inline int my_warp() { return rt().current / kWarp; }
inline int my_lane() { return rt().current % kWarp; }

inline const uint3& current_thread_idx() { return rt().thread_idx[rt().current]; }
inline const uint3& current_block_idx() { return rt().block_idx; }
inline const dim3& current_grid_dim() { return rt().grid_dim; }

// ---- global memory ranges ---------------------------------------------------

inline void clear_ranges() { rt().ranges.clear(); }
inline void add_range(const void* p, size_t bytes, bool writable) {
  const char* b = static_cast<const char*>(p);
  rt().ranges.push_back({b, b + bytes, writable});
}
inline void check_global(const void* p, size_t bytes, bool write, const char* what) {
  const char* b = static_cast<const char*>(p);
  for (const Range& r : rt().ranges)
    if (b >= r.begin && b + bytes <= r.end) {
      if (write && !r.writable) fatal(what, my_tid(), 1);
      return;
    }
  fatal(what, my_tid(), reinterpret_cast<uintptr_t>(p));
}

// ---- scheduling -------------------------------------------------------------

inline void yield() { swapcontext(&me().ctx, &rt().sched); }

inline bool ready(const ThreadState& t) {
  if (!t.waiting) return true;
  if (t.wait_warp) return rt().warps[t.tid / kWarp].gen != t.wait_gen;
  return rt().bar_gen != t.wait_gen;
}

inline void fiber_entry() {
  rt().body();
  me().done = true;
  if (!me().pending.empty()) fatal("thread exited with cp.async copies never waited for", my_tid());
  swapcontext(&me().ctx, &rt().sched);
}

// ---- CTA dispatch order ------------------------------------------------------
//
// PFA_EMU_CTA_ORDER=in-order (default) | reverse | shuffle picks the order in
// which launch() starts the CTAs of a grid; shuffle draws a fresh permutation
// for every launch from a generator seeded once with PFA_EMU_CTA_SEED (default
// 1), so a failing run is reproduced by the same two variables. Every test
// program prints cta_order_line().

enum class CtaOrder { kInOrder, kReverse, kShuffle };

struct CtaOrderConfig {
  CtaOrder order = CtaOrder::kInOrder;
  uint64_t seed = 1;
  uint64_t state = 1;  // splitmix64 state, advanced by each shuffled launch
};

inline CtaOrderConfig read_cta_order_env() {
  CtaOrderConfig c;
  const char* order = std::getenv("PFA_EMU_CTA_ORDER");
  const std::string o = order ? order : "in-order";
  if (o == "in-order" || o.empty()) {
    c.order = CtaOrder::kInOrder;
  } else if (o == "reverse") {
    c.order = CtaOrder::kReverse;
  } else if (o == "shuffle") {
    c.order = CtaOrder::kShuffle;
  } else {
    std::fprintf(stderr, "PFA_EMU_CTA_ORDER must be in-order, reverse or shuffle, got '%s'\n",
                 o.c_str());
    std::exit(2);
  }
  if (const char* seed = std::getenv("PFA_EMU_CTA_SEED")) c.seed = std::strtoull(seed, nullptr, 10);
  c.state = c.seed;
  return c;
}

inline CtaOrderConfig& cta_order() {
  static CtaOrderConfig c = read_cta_order_env();
  return c;
}

// "cta order: shuffle (seed 7)": the line every emulator test prints.
inline std::string cta_order_line() {
  const CtaOrderConfig& c = cta_order();
  switch (c.order) {
    case CtaOrder::kInOrder: return "cta order: in-order (blockIdx x fastest, then y, then z)";
    case CtaOrder::kReverse: return "cta order: reverse (the last blockIdx first)";
    case CtaOrder::kShuffle:
      return "cta order: shuffle (seed " + std::to_string(c.seed) +
             ", a new permutation per launch; PFA_EMU_CTA_SEED)";
  }
  return "cta order: ?";
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Linear CTA indices (x fastest) in the order they are started.
inline std::vector<uint64_t> dispatch_order(uint64_t count) {
  std::vector<uint64_t> order(count);
  std::iota(order.begin(), order.end(), uint64_t{0});
  CtaOrderConfig& c = cta_order();
  if (c.order == CtaOrder::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (c.order == CtaOrder::kShuffle) {
    for (uint64_t i = count; i > 1; --i)  // Fisher-Yates, the same on every platform
      std::swap(order[i - 1], order[splitmix64(c.state) % i]);
  }
  return order;
}

// Runs `body` as every thread of every CTA of the grid, CTAs in cta_order().
inline void launch(dim3 grid, int nthreads, size_t smem_bytes, std::function<void()> body) {
  Runtime& r = rt();
  if (nthreads > kMaxThreads || nthreads % kWarp) fatal("unsupported block size", 0, nthreads);
  r.grid_dim = grid;
  r.nthreads = nthreads;
  r.body = std::move(body);
  const uint64_t gx = grid.x, gy = grid.y;
  for (const uint64_t linear : dispatch_order(gx * gy * grid.z)) {
    const unsigned x = static_cast<unsigned>(linear % gx);
    const unsigned y = static_cast<unsigned>(linear / gx % gy);
    const unsigned z = static_cast<unsigned>(linear / gx / gy);
    r.block_idx = uint3{x, y, z};
    r.smem.assign(smem_bytes, 0xA5);  // garbage: unwritten bytes must never matter
    r.shadow.assign(smem_bytes, ShadowByte{});
    r.bar_gen = 0;
    r.bar_arrived = 0;
    r.epoch = 0;
    ++r.stats.ctas;
    for (int w = 0; w < nthreads / kWarp; ++w) r.warps[w] = WarpState{};
    for (int t = 0; t < nthreads; ++t) {
      ThreadState& ts = r.threads[t];
      ts.tid = t;
      ts.done = ts.waiting = false;
      ts.pending.clear();
      ts.next_group = 0;
      r.thread_idx[t] = uint3{static_cast<unsigned>(t), 0, 0};
      if (ts.stack.empty()) ts.stack.resize(256 * 1024);
      getcontext(&ts.ctx);
      ts.ctx.uc_stack.ss_sp = ts.stack.data();
      ts.ctx.uc_stack.ss_size = ts.stack.size();
      ts.ctx.uc_link = &r.sched;
      makecontext(&ts.ctx, fiber_entry, 0);
    }
    for (;;) {
      bool all_done = true, progress = false;
      for (int t = 0; t < nthreads; ++t) {
        ThreadState& ts = r.threads[t];
        if (ts.done) continue;
        all_done = false;
        if (!ready(ts)) continue;
        ts.waiting = false;
        r.current = t;
        swapcontext(&r.sched, &ts.ctx);
        progress = true;
      }
      if (all_done) break;
      if (!progress) fatal("deadlock: threads wait at a barrier others never reach", 0);
    }
    r.current = -1;
  }
}

// ---- barriers and collectives -------------------------------------------------

inline void cta_barrier() {
  Runtime& r = rt();
  const uint64_t g = r.bar_gen;
  if (++r.bar_arrived == r.nthreads) {
    r.bar_arrived = 0;
    ++r.bar_gen;
    ++r.epoch;
    for (int w = 0; w < r.nthreads / kWarp; ++w) ++r.warps[w].sync_epoch;
    return;
  }
  me().waiting = true;
  me().wait_warp = false;
  me().wait_gen = g;
  yield();
}

// Deposits this lane's operands and waits for the other 31 lanes; returns the
// slot array holding all lanes' operands for this collective.
inline const Slot* warp_gather(int op, const uint32_t* in, int n, bool is_syncwarp = false) {
  WarpState& w = rt().warps[my_warp()];
  const uint64_t g = w.gen;
  Slot* slots = w.slots[g & 1];
  slots[my_lane()].op = op;
  for (int i = 0; i < n; ++i) slots[my_lane()].v[i] = in[i];
  if (++w.arrived == kWarp) {
    w.arrived = 0;
    ++w.gen;
    if (is_syncwarp) ++w.sync_epoch;
  } else {
    me().waiting = true;
    me().wait_warp = true;
    me().wait_gen = g;
    yield();
  }
  for (int l = 0; l < kWarp; ++l)
    if (slots[l].op != op) fatal("warp divergence: lanes at different collectives", my_tid(), op);
  return slots;
}

// ---- shared-memory race and bounds checks -----------------------------------

inline ShadowByte& shadow_at(uint32_t addr, int bytes, int align, const char* what) {
  if (addr % align) fatal(what, my_tid(), addr);
  if (static_cast<size_t>(addr) + bytes > rt().smem.size()) fatal(what, my_tid(), addr);
  return rt().shadow[addr];
}

inline bool synced_since(int other_tid, uint32_t other_epoch, uint64_t other_wepoch) {
  Runtime& r = rt();
  if (r.epoch > other_epoch) return true;
  return other_tid / kWarp == my_warp() && r.warps[my_warp()].sync_epoch > other_wepoch;
}

// A read by this thread (collective = the whole warp receives the data).
inline void check_read(uint32_t addr, int bytes, int align, bool collective, const char* what) {
  Runtime& r = rt();
  shadow_at(addr, bytes, align, what);
  const uint32_t me_tid = my_tid();
  for (int i = 0; i < bytes; ++i) {
    ShadowByte& s = r.shadow[addr + i];
    if (s.pending_writer >= 0) fatal("shared read of bytes whose cp.async was not waited for", me_tid, addr + i);
    if (s.writer < 0) fatal("shared read of bytes never written in this CTA", me_tid, addr + i);
    if (s.writer >= 0 && (collective || s.writer != static_cast<int32_t>(me_tid)) &&
        !synced_since(s.writer, s.w_epoch, s.w_wepoch))
      fatal("shared read-after-write race (missing barrier)", me_tid, addr + i);
    if (s.r_epoch != r.epoch) {
      s.r_epoch = r.epoch;
      s.readers[0] = s.readers[1] = 0;
    }
    if (collective) {
      s.readers[my_warp() / 2] |= 0xffffffffull << (32 * (my_warp() % 2));
    } else {
      s.readers[me_tid / 64] |= 1ull << (me_tid % 64);
    }
    s.r_wepoch = r.warps[my_warp()].sync_epoch;
  }
}

inline void check_write(uint32_t addr, int bytes, int align, const char* what) {
  Runtime& r = rt();
  shadow_at(addr, bytes, align, what);
  const uint32_t me_tid = my_tid();
  for (int i = 0; i < bytes; ++i) {
    ShadowByte& s = r.shadow[addr + i];
    if (s.pending_writer >= 0) fatal("shared write to bytes with a cp.async in flight", me_tid, addr + i);
    if (s.r_epoch == r.epoch) {
      // Readers in this barrier interval other than this thread: fine only if
      // all are in this warp and a __syncwarp came after their reads.
      uint64_t others[2] = {s.readers[0], s.readers[1]};
      others[me_tid / 64] &= ~(1ull << (me_tid % 64));
      const uint64_t warp_bits = 0xffffffffull << (32 * (my_warp() % 2));
      uint64_t outside[2] = {others[0], others[1]};
      outside[my_warp() / 2] &= ~warp_bits;
      const bool in_warp = (others[my_warp() / 2] & warp_bits) != 0;
      if (outside[0] || outside[1] || (in_warp && r.warps[my_warp()].sync_epoch <= s.r_wepoch))
        fatal("shared write-after-read race (missing barrier)", me_tid, addr + i);
    }
    if (s.writer >= 0 && s.writer != static_cast<int32_t>(me_tid) &&
        !synced_since(s.writer, s.w_epoch, s.w_wepoch))
      fatal("shared write-after-write race (missing barrier)", me_tid, addr + i);
  }
}

inline void mark_written(uint32_t addr, int bytes) {
  Runtime& r = rt();
  for (int i = 0; i < bytes; ++i) {
    ShadowByte& s = r.shadow[addr + i];
    s.writer = static_cast<int32_t>(my_tid());
    s.w_epoch = r.epoch;
    s.w_wepoch = r.warps[my_warp()].sync_epoch;
    s.pending_writer = -1;
  }
}

// Extra shared-memory wavefronts of one access phase: each bank serves one
// 4-byte word per wavefront; the same word to several lanes is a broadcast.
inline int extra_wavefronts(const uint32_t* addrs, int n, int bytes) {
  int words_per_bank[32][16];
  int count[32] = {0};
  for (int i = 0; i < n; ++i)
    for (int w = 0; w < bytes / 4; ++w) {
      const int word = static_cast<int>(addrs[i] / 4 + w);
      const int bank = word % 32;
      bool seen = false;
      for (int k = 0; k < count[bank]; ++k) seen |= words_per_bank[bank][k] == word;
      if (!seen && count[bank] < 16) words_per_bank[bank][count[bank]++] = word;
    }
  int worst = 0;
  for (int b = 0; b < 32; ++b) worst = count[b] > worst ? count[b] : worst;
  const int ideal = (n * bytes + 127) / 128;
  return worst > ideal ? worst - ideal : 0;
}

inline uint16_t smem_u16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, &rt().smem[addr], 2);
  return v;
}

}  // namespace emu

namespace cuda {
namespace sm80 {

inline char* dynamic_smem() { return reinterpret_cast<char*>(emu::rt().smem.data()); }
inline uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(static_cast<const uint8_t*>(ptr) - emu::rt().smem.data());
}

inline void st_shared_u32(uint32_t addr, uint32_t value) {
  const uint32_t in[1] = {addr};
  const emu::Slot* s = emu::warp_gather(1, in, 1);
  if (emu::my_lane() == 0) {
    uint32_t a[32];
    for (int l = 0; l < 32; ++l) a[l] = s[l].v[0];
    ++emu::rt().stats.sts;
    emu::rt().stats.sts_extra_wavefronts += emu::extra_wavefronts(a, 32, 4);
  }
  emu::check_write(addr, 4, 4, "st.shared.u32 out of bounds or misaligned");
  std::memcpy(&emu::rt().smem[addr], &value, 4);
  emu::mark_written(addr, 4);
}

inline uint32_t ld_shared_u8(uint32_t addr) {
  emu::check_read(addr, 1, 1, false, "ld.shared.u8 out of bounds");
  return emu::rt().smem[addr];
}

inline uint32_t ld_shared_u16(uint32_t addr) {
  emu::check_read(addr, 2, 2, false, "ld.shared.u16 out of bounds or misaligned");
  return emu::smem_u16(addr);
}

inline float ld_shared_f32(uint32_t addr) {
  emu::check_read(addr, 4, 4, false, "ld.shared.f32 out of bounds or misaligned");
  float v;
  std::memcpy(&v, &emu::rt().smem[addr], 4);
  return v;
}

inline uint4 ld_shared_v4(uint32_t addr) {
  const uint32_t in[1] = {addr};
  const emu::Slot* s = emu::warp_gather(2, in, 1);
  if (emu::my_lane() == 0) {
    for (int phase = 0; phase < 4; ++phase) {
      uint32_t a[8];
      for (int l = 0; l < 8; ++l) a[l] = s[phase * 8 + l].v[0];
      ++emu::rt().stats.lds128;
      emu::rt().stats.lds128_extra_wavefronts += emu::extra_wavefronts(a, 8, 16);
    }
  }
  emu::check_read(addr, 16, 16, false, "ld.shared.v4 out of bounds or misaligned");
  uint4 v;
  std::memcpy(&v, &emu::rt().smem[addr], 16);
  return v;
}

inline void cp_async(uint32_t smem_addr, const void* gmem, int size, int src_bytes,
                     const char* what) {
  if (src_bytes < 0 || src_bytes > size) emu::fatal("cp.async src-size out of range", emu::my_tid(), src_bytes);
  if (reinterpret_cast<uintptr_t>(gmem) % size) emu::fatal("cp.async source misaligned", emu::my_tid());
  if (src_bytes > 0) emu::check_global(gmem, src_bytes, false, what);
  emu::check_write(smem_addr, size, size, "cp.async destination out of bounds or misaligned");
  emu::PendingCopy c;
  c.dst = smem_addr;
  c.size = size;
  c.group = emu::me().next_group;
  std::memset(c.data, 0, sizeof(c.data));
  if (src_bytes > 0) std::memcpy(c.data, gmem, src_bytes);
  emu::me().pending.push_back(c);
  for (int i = 0; i < size; ++i) emu::rt().shadow[smem_addr + i].pending_writer = emu::my_tid();
}

inline void cp_async_16(uint32_t smem_addr, const void* gmem, bool valid) {
  ++emu::rt().stats.cp_async_16;
  cp_async(smem_addr, gmem, 16, valid ? 16 : 0, "cp.async (16 B) reads outside the inputs");
}

inline void cp_async_4(uint32_t smem_addr, const void* gmem, int src_bytes) {
  cp_async(smem_addr, gmem, 4, src_bytes, "cp.async (4 B) reads outside the inputs");
}

inline void cp_async_commit() { ++emu::me().next_group; }

template <int kPending>
inline void cp_async_wait() {
  emu::ThreadState& t = emu::me();
  // Groups with id < next_group - kPending are complete; the open (uncommitted)
  // group next_group counts as not committed and is not waited for.
  const int complete_below = t.next_group - kPending;
  std::vector<emu::PendingCopy> still;
  for (const emu::PendingCopy& c : t.pending) {
    if (c.group < complete_below) {
      std::memcpy(&emu::rt().smem[c.dst], c.data, c.size);
      emu::mark_written(c.dst, c.size);
    } else {
      still.push_back(c);
    }
  }
  t.pending.swap(still);
}

inline void st_global_v4(void* ptr, uint4 value) {
  emu::check_global(ptr, 16, true, "16-byte global store outside the outputs");
  if (reinterpret_cast<uintptr_t>(ptr) % 16) emu::fatal("16-byte global store misaligned", emu::my_tid());
  std::memcpy(ptr, &value, 16);
}

inline void st_global_f32(float* ptr, float value) {
  emu::check_global(ptr, 4, true, "fp32 global store outside the outputs");
  *ptr = value;
}

inline uint4 ld_global_nc_v4(const void* ptr) {
  emu::check_global(ptr, 16, false, "16-byte global load outside the inputs");
  if (reinterpret_cast<uintptr_t>(ptr) % 16) emu::fatal("16-byte global load misaligned", emu::my_tid());
  uint4 v;
  std::memcpy(&v, ptr, 16);
  return v;
}

// Subnormal fp32 -> zero of the same sign (what .ftz and the f32 atomics do).
inline float flush_subnormal(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x;
}

// PTX ISA, atom / red: "atom.add.f32 rounds to nearest even and flushes
// subnormal inputs and results to sign-preserving zero" (red.add.f32 alike).
inline void red_add_f32(float* ptr, float value) {
  emu::check_global(ptr, 4, true, "red.global.add.f32 outside the outputs");
  if (reinterpret_cast<uintptr_t>(ptr) % 4) emu::fatal("red.global.add.f32 misaligned", emu::my_tid());
  ++emu::rt().stats.red_f32;
  *ptr = flush_subnormal(flush_subnormal(*ptr) + flush_subnormal(value));
}

// CTAs run one after another here, each to completion, in the order
// PFA_EMU_CTA_ORDER gives, so a wait that is not already satisfied would never
// end: on the GPU it would wait for a CTA that has not started (and, with
// every multiprocessor busy with waiters, may never start), or for one that
// never releases. Either is a bug, reported here instead of hanging. A kernel
// that waits only for CTAs that started before it (cta_start_ticket) passes
// in every order.
inline void spin_wait_equal(const int32_t* ptr, int32_t value) {
  emu::check_global(ptr, 4, false, "spin_wait_equal reads outside the registered memory");
  ++emu::rt().stats.turn_waits;
  if (*ptr != value)
    emu::fatal("spin_wait_equal: the awaited value is never released by a CTA that started earlier",
               emu::my_tid(), static_cast<uint64_t>(static_cast<uint32_t>(*ptr)) << 32 |
                                  static_cast<uint32_t>(value));
}

// The CTA's rank in the order the CTAs really started (see the GPU version in
// sm80_primitives.cuh): thread 0 takes a ticket, a barrier, every thread reads
// it from the 4 shared bytes at smem_slot.
inline uint32_t cta_start_ticket(uint32_t* counter, uint32_t smem_slot) {
  if (emu::my_tid() == 0) {
    emu::check_global(counter, 4, true, "cta_start_ticket: counter outside the outputs");
    if (reinterpret_cast<uintptr_t>(counter) % 4) emu::fatal("cta_start_ticket: counter misaligned", 0);
    const uint32_t t = (*counter)++;
    emu::check_write(smem_slot, 4, 4, "cta_start_ticket: slot out of bounds or misaligned");
    std::memcpy(&emu::rt().smem[smem_slot], &t, 4);
    emu::mark_written(smem_slot, 4);
  }
  emu::cta_barrier();
  emu::check_read(smem_slot, 4, 4, false, "cta_start_ticket: slot read");
  uint32_t t;
  std::memcpy(&t, &emu::rt().smem[smem_slot], 4);
  return t;
}

inline void fence_gpu() {}

inline void red_release_add_s32(int32_t* ptr, int32_t value) {
  emu::check_global(ptr, 4, true, "red.release.add.s32 outside the outputs");
  *ptr += value;
}

// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m.
inline void ldmatrix_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  const uint32_t in[1] = {addr};
  emu::check_read(addr, 16, 16, true, "ldmatrix row out of bounds or misaligned");
  const emu::Slot* s = emu::warp_gather(trans ? 4 : 3, in, 1);
  const int lane = emu::my_lane();
  const int g = lane / 4, c = lane % 4;
  if (lane == 0) {
    for (int m = 0; m < 4; ++m) {
      uint32_t a[8];
      for (int i = 0; i < 8; ++i) a[i] = s[8 * m + i].v[0];
      ++emu::rt().stats.ldmatrix;
      emu::rt().stats.ldmatrix_extra_wavefronts += emu::extra_wavefronts(a, 8, 16);
    }
  }
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {  // row g, columns 2c, 2c+1
      lo = emu::smem_u16(s[8 * m + g].v[0] + 4 * c);
      hi = emu::smem_u16(s[8 * m + g].v[0] + 4 * c + 2);
    } else {  // rows 2c, 2c+1, column g
      lo = emu::smem_u16(s[8 * m + 2 * c].v[0] + 2 * g);
      hi = emu::smem_u16(s[8 * m + 2 * c + 1].v[0] + 2 * g);
    }
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) { ldmatrix_impl(r, smem_addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  ldmatrix_impl(r, smem_addr, true);
}

template <typename Element>
inline float bits_to_float(uint32_t bits);
template <>
inline float bits_to_float<__half>(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}
template <>
inline float bits_to_float<__nv_bfloat16>(uint32_t bits) {
  const uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename Element>
inline uint32_t pack2(float lo, float hi);
template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  const __half_raw a = __half_raw(__float2half_rn(lo)), b = __half_raw(__float2half_rn(hi));
  return static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
}
template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat16_raw a = __nv_bfloat16_raw(__float2bfloat16_rn(lo));
  const __nv_bfloat16_raw b = __nv_bfloat16_raw(__float2bfloat16_rn(hi));
  return static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
}

// d += a * b, m16n8k16, PTX fragment layouts (see sm80_primitives.cuh).
template <typename Element>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(&in[6], d, 16);
  const emu::Slot* s = emu::warp_gather(5, in, 10);
  if (emu::my_lane() == 0) ++emu::rt().stats.mma;
  auto elem = [](uint32_t reg, int half) {
    return bits_to_float<Element>(half ? reg >> 16 : reg & 0xffffu);
  };
  auto A = [&](int row, int k) {  // lane 4 * (row % 8) + (k % 8) / 2
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return elem(s[4 * (row % 8) + (k % 8) / 2].v[reg], k % 2);
  };
  auto B = [&](int k, int n) {  // lane 4 * n + (k % 8) / 2
    return elem(s[4 * n + (k % 8) / 2].v[4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  const int lane = emu::my_lane(), g = lane / 4, c = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * c + (i % 2);
    float acc;
    std::memcpy(&acc, &s[lane].v[6 + i], 4);
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
}

inline float u32_as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---- special functions --------------------------------------------------------
//
// The hardware's approximations are modelled by their documented worst case:
// the exact result (in double) moved by the largest error the documentation
// allows, up or down by a hash of the input bits, the function and
// PFA_EMU_SFU_SEED (default 1). Equal inputs give equal outputs (so the
// determinism checks stay meaningful) and neighbouring elements err in
// different directions, as a real approximation does; an error figure measured
// under the emulator is then a bound of the GPU's, not a best case. The
// figures (PTX ISA, "Floating Point Instructions", and the CUDA C++
// Programming Guide's table of intrinsic functions; the page was not at hand
// in the session that wrote this, so each is the larger of the values we know
// for it, and the model errs on the pessimistic side):
//   ex2.approx.ftz.f32   2^-22 relative (the ISA's 2^-22.5, rounded up to the
//                        2 ulp of exp2f); subnormal inputs and results -> 0
//   tanh.approx.f32      2^-10.987 relative (ISA; "2^-11" elsewhere)
//   lg2.approx.ftz.f32   __log2f: 2^-22.6 absolute for x in [0.5, 2], else 2 ulp
//   __fdividef(a, b)     2 ulp for |b| in [2^-126, 2^126]; 0 for |b| > 2^126
inline uint32_t sfu_seed() {
  static const uint32_t seed = [] {
    const char* s = std::getenv("PFA_EMU_SFU_SEED");
    return s ? static_cast<uint32_t>(std::strtoul(s, nullptr, 10)) : 1u;
  }();
  return seed;
}

inline uint64_t sfu_key(float x, uint32_t salt) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return (uint64_t(salt) << 32 | bits) ^ (uint64_t(sfu_seed()) << 40);
}

inline float sfu_result(double exact, uint64_t key, double rel, double abs_err = 0) {
  if (!std::isfinite(exact) || exact == 0) return static_cast<float>(exact);
  const double sign = emu::splitmix64(key) & 1 ? 1.0 : -1.0;
  return static_cast<float>(exact + sign * (abs_err > 0 ? abs_err : rel * std::fabs(exact)));
}

inline float fast_exp2(float x) {
  x = flush_subnormal(x);
  return flush_subnormal(sfu_result(std::exp2(double(x)), sfu_key(x, 1), std::ldexp(1.0, -22)));
}
inline float fast_tanh(float x) {
  return sfu_result(std::tanh(double(x)), sfu_key(x, 2), std::exp2(-10.987));
}
inline float fast_log2(float x) {
  x = flush_subnormal(x);
  const bool near_one = x >= 0.5f && x <= 2.f;
  return sfu_result(std::log2(double(x)), sfu_key(x, 3), std::ldexp(1.0, -22),
                    near_one ? std::exp2(-22.6) : 0.0);
}
inline float fast_div(float a, float b) {
  if (std::fabs(b) > 0x1p126f && std::isfinite(b)) return 0.f * a;  // documented: 0 (NaN for inf a)
  return flush_subnormal(
      sfu_result(double(a) / double(b), sfu_key(a, 4) ^ (sfu_key(b, 5) << 1), std::ldexp(1.0, -22)));
}
inline float fast_rcp(float x) { return fast_div(1.f, x); }

inline float shfl_xor(float v, int lane_mask) {
  uint32_t in[1];
  std::memcpy(in, &v, 4);
  const emu::Slot* s = emu::warp_gather(6, in, 1);
  float r;
  std::memcpy(&r, &s[emu::my_lane() ^ lane_mask].v[0], 4);
  return r;
}

inline void sync_warp() { emu::warp_gather(7, nullptr, 0, true); }
inline void sync_threads() { emu::cta_barrier(); }

}  // namespace sm80
}  // namespace cuda
}  // namespace pyfastattn

#define threadIdx (::pyfastattn::emu::current_thread_idx())
#define blockIdx (::pyfastattn::emu::current_block_idx())
#define gridDim (::pyfastattn::emu::current_grid_dim())
