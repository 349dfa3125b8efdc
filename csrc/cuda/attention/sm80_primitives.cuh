// The sm_80 instructions the attention kernels are built from, one thin
// wrapper each: asynchronous copies, ldmatrix, the m16n8k16 tensor-core MMA,
// the special-function unit, warp shuffles and barriers.
//
// Kernels touch the hardware only through this header. Defining
// PFA_ATTN_HOST_EMULATION swaps in emu/sm80_emulation.h, which implements the
// same functions on the CPU (one fiber per CUDA thread, with a shared-memory
// race checker) so the kernel logic can be tested on a machine without a GPU.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"): lane = 4 * g + c, g in [0, 8),
// c in [0, 4).
//   A (16 x 16, row-major)   a0: (g, 2c..2c+1)   a1: (g+8, 2c..)   a2: (g, 2c+8..)   a3: (g+8, 2c+8..)
//   B (16 x 8,  "col")       b0: (k 2c..2c+1, n g)                 b1: (k 2c+8..2c+9, n g)
//   C/D (16 x 8, fp32)       d0, d1: (g, 2c), (g, 2c+1)            d2, d3: (g+8, 2c), (g+8, 2c+1)
// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register
// m of lane 4g+c then holds row g, columns 2c..2c+1 of matrix m (.trans: row
// 2c..2c+1, column g, i.e. the transposed matrix).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(PFA_ATTN_HOST_EMULATION)
#include "emu/sm80_emulation.h"
#else

#define PFA_ATTN_DEVICE __device__ __forceinline__

namespace pyfastattn {
namespace cuda {
namespace sm80 {

// ---- shared memory ----------------------------------------------------------

// The kernel's dynamic shared memory. 128-byte alignment keeps the swizzle's
// bank arithmetic exact.
PFA_ATTN_DEVICE char* dynamic_smem() {
  extern __shared__ __align__(128) char pfa_dynamic_smem[];
  return pfa_dynamic_smem;
}

// 32-bit shared-window address of a generic pointer into shared memory.
PFA_ATTN_DEVICE uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

PFA_ATTN_DEVICE void st_shared_u32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}

PFA_ATTN_DEVICE uint32_t ld_shared_u8(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

PFA_ATTN_DEVICE uint32_t ld_shared_u16(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

PFA_ATTN_DEVICE float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}

PFA_ATTN_DEVICE uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// ---- global memory ----------------------------------------------------------

// 16 bytes global -> shared, cached in L2 only (.cg). When `valid` is false the
// source size is 0: nothing is read and the 16 shared bytes are zero-filled.
PFA_ATTN_DEVICE void cp_async_16(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// 4 bytes global -> shared (both 4-byte aligned), through L1 (.ca, the only
// mode for 4-byte copies). Reads the first `src_bytes` (0..4) bytes of the
// source word and zero-fills the rest.
PFA_ATTN_DEVICE void cp_async_4(uint32_t smem_addr, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

PFA_ATTN_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are in flight.
// Other threads see the data only after a barrier.
template <int kPending>
PFA_ATTN_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// One 16-byte store (ptr 16-byte aligned). Written in PTX: a C++ uint4 store
// through a pointer derived from a 2-byte element type compiled to four
// 4-byte STG.E.
PFA_ATTN_DEVICE void st_global_v4(void* ptr, uint4 value) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "r"(value.x),
               "r"(value.y), "r"(value.z), "r"(value.w)
               : "memory");
}
PFA_ATTN_DEVICE void st_global_f32(float* ptr, float value) { *ptr = value; }

// One 16-byte load through the read-only (non-coherent) path: for inputs no
// thread of the kernel writes.
PFA_ATTN_DEVICE uint4 ld_global_nc_v4(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// ---- global atomics and inter-CTA ordering ---------------------------------

// *ptr += value at L2 (RED.E.ADD.F32), no result returned. The order in which
// different threads' adds land is unspecified: fp32 sums are then not
// bit-reproducible unless the caller orders them (see spin_wait_equal).
PFA_ATTN_DEVICE void red_add_f32(float* ptr, float value) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(ptr), "f"(value) : "memory");
}

// Spins until *ptr == value, reading with acquire semantics at GPU scope, so
// that everything the releasing CTA wrote before its release is visible.
PFA_ATTN_DEVICE void spin_wait_equal(const int32_t* ptr, int32_t value) {
  int32_t v;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(ptr) : "memory");
  } while (v != value);
}

// Orders this thread's earlier global writes and atomics before its later
// ones as seen by the whole GPU (MEMBAR.GPU).
PFA_ATTN_DEVICE void fence_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

// *ptr += value with release semantics at GPU scope (signals spin_wait_equal).
PFA_ATTN_DEVICE void red_release_add_s32(int32_t* ptr, int32_t value) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(ptr), "r"(value) : "memory");
}

// The CTA's rank in the order in which the grid's CTAs really started, for
// kernels whose CTAs wait on each other. CUDA dispatches CTAs in no promised
// order: a CTA that waits for a smaller blockIdx can be resident and spinning
// while the CTA it waits for has no multiprocessor, for good once every
// multiprocessor holds such a waiter. A CTA that waits only for CTAs of a
// smaller ticket waits only for CTAs that are running or done, and the one
// with the smallest ticket still running never waits: no deadlock. Thread 0
// takes the ticket (one relaxed atomic on `counter`, which the caller zeroes
// before the launch; grids of fewer than 2^32 CTAs) and passes it on through
// the 4 shared bytes at `smem_slot`; includes one barrier, and the slot is
// free again after the caller's next barrier.
PFA_ATTN_DEVICE uint32_t cta_start_ticket(uint32_t* counter, uint32_t smem_slot) {
  if (threadIdx.x == 0) {
    const uint32_t t = atomicAdd(counter, 1u);
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(smem_slot), "r"(t) : "memory");
  }
  __syncthreads();
  uint32_t t;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(t) : "r"(smem_slot) : "memory");
  return t;
}

// ---- tensor cores -----------------------------------------------------------

PFA_ATTN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

PFA_ATTN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

// d += a * b for one m16n8k16 tile, fp32 accumulation.
template <typename Element>
PFA_ATTN_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
PFA_ATTN_DEVICE void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
PFA_ATTN_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (the
// lower column of an MMA fragment).
template <typename Element>
PFA_ATTN_DEVICE uint32_t pack2(float lo, float hi);

template <>
PFA_ATTN_DEVICE uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
PFA_ATTN_DEVICE uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The float value of a 16-bit pattern of type Element.
template <typename Element>
PFA_ATTN_DEVICE float bits_to_float(uint32_t bits);

template <>
PFA_ATTN_DEVICE float bits_to_float<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

template <>
PFA_ATTN_DEVICE float bits_to_float<__nv_bfloat16>(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

// The float whose bit pattern is `bits`.
PFA_ATTN_DEVICE float u32_as_float(uint32_t bits) { return __uint_as_float(bits); }

// ---- special functions ------------------------------------------------------

// 2^x on the SFU (MUFU.EX2); exp2(-inf) = +0.
PFA_ATTN_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh on the SFU (sm_75+), max relative error 2^-11: below bf16 rounding.
PFA_ATTN_DEVICE float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x and log2(x) on the SFU (MUFU.RCP, MUFU.LG2). The IEEE-exact `1.f / x`
// and `a / b` compile to a CALL to a slow-path subroutine, and the registers
// saved around that call were the spills of the first build of this kernel.
PFA_ATTN_DEVICE float fast_rcp(float x) { return __fdividef(1.f, x); }
PFA_ATTN_DEVICE float fast_div(float a, float b) { return __fdividef(a, b); }
PFA_ATTN_DEVICE float fast_log2(float x) { return __log2f(x); }

// ---- warps and blocks -------------------------------------------------------

PFA_ATTN_DEVICE float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

PFA_ATTN_DEVICE void sync_warp() { __syncwarp(); }
PFA_ATTN_DEVICE void sync_threads() { __syncthreads(); }

}  // namespace sm80
}  // namespace cuda
}  // namespace pyfastattn

#endif  // PFA_ATTN_HOST_EMULATION
