// CPU emulation of the sm_80 primitives in ../sm80_primitives.cuh, for testing
// kernel logic on a machine without a GPU. Selected by PFA_ATTN_HOST_EMULATION;
// included from sm80_primitives.cuh in place of the PTX wrappers.
//
// Every CUDA thread of a CTA is a fiber (ucontext); the fibers of one CTA run
// round-robin, switching only at barriers and warp collectives, and CTAs run
// one after another. Warp collectives (ldmatrix, mma, shuffles, __syncwarp)
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
//     collective.
// Shared-memory bank conflicts are counted, not fatal (bank_conflict_report).
//
// Not modelled: timing, the memory model beyond barrier ordering, and the
// exact rounding of the tensor cores (products are exact in fp32 here, as in
// hardware; the accumulation order may differ).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
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

// Runs `body` as every thread of every CTA of the grid.
inline void launch(dim3 grid, int nthreads, size_t smem_bytes, std::function<void()> body) {
  Runtime& r = rt();
  if (nthreads > kMaxThreads || nthreads % kWarp) fatal("unsupported block size", 0, nthreads);
  r.grid_dim = grid;
  r.nthreads = nthreads;
  r.body = std::move(body);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
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

inline void red_add_f32(float* ptr, float value) {
  emu::check_global(ptr, 4, true, "red.global.add.f32 outside the outputs");
  if (reinterpret_cast<uintptr_t>(ptr) % 4) emu::fatal("red.global.add.f32 misaligned", emu::my_tid());
  ++emu::rt().stats.red_f32;
  *ptr += value;
}

// CTAs run one after another here, in the hardware's dispatch order (x
// fastest), so a wait that is not already satisfied would never end: on the
// GPU it would wait for a CTA dispatched later, or for one that never
// releases. Either is a bug, reported here instead of hanging.
inline void spin_wait_equal(const int32_t* ptr, int32_t value) {
  emu::check_global(ptr, 4, false, "spin_wait_equal reads outside the registered memory");
  ++emu::rt().stats.turn_waits;
  if (*ptr != value)
    emu::fatal("spin_wait_equal: the awaited value is never released by an earlier CTA",
               emu::my_tid(), static_cast<uint64_t>(static_cast<uint32_t>(*ptr)) << 32 |
                                  static_cast<uint32_t>(value));
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

inline float fast_exp2(float x) { return std::exp2(x); }
inline float fast_tanh(float x) { return std::tanh(x); }
inline float fast_rcp(float x) { return 1.f / x; }
inline float fast_div(float a, float b) { return a / b; }
inline float fast_log2(float x) { return std::log2(x); }

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
