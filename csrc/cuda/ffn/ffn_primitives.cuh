// Global-memory loads and stores of 2, 4 and 16 bytes for the FFN kernels, on
// top of the sm_80 primitives the attention kernels use
// (../attention/sm80_primitives.cuh, included read-only). The attention
// kernels read global memory only through cp.async; the FFN epilogues also
// read bias vectors and saved pre-activations, and the elementwise kernels
// stream whole tensors, so they need plain loads, with the same emulation
// checks (bounds against the registered ranges, alignment, stores only into
// output ranges) when PFA_ATTN_HOST_EMULATION is defined.
//
// Loads are plain ld.global (not .nc): an elementwise step may write its
// output over an input at the same index (params.h, "Aliasing"), which the
// read-only path does not allow within one kernel.
#pragma once

#include <cstdint>

#include "../attention/sm80_primitives.cuh"

namespace pyfastattn {
namespace cuda {
namespace ffn {

#if defined(PFA_ATTN_HOST_EMULATION)

namespace detail {
template <int kBytes>
inline void check_access(const void* p, bool write) {
  if (reinterpret_cast<uintptr_t>(p) % kBytes) emu::fatal("misaligned global access", emu::my_tid(), kBytes);
  emu::check_global(p, kBytes, write,
                    write ? "global store outside the outputs" : "global load outside the inputs");
}
}  // namespace detail

inline uint32_t ld_global_b16(const void* p) {
  detail::check_access<2>(p, false);
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t ld_global_b32(const void* p) {
  detail::check_access<4>(p, false);
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint4 ld_global_v4(const void* p) {
  detail::check_access<16>(p, false);
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void st_global_b16(void* p, uint32_t v) {
  detail::check_access<2>(p, true);
  const uint16_t h = static_cast<uint16_t>(v);
  std::memcpy(p, &h, 2);
}
inline void st_global_b32(void* p, uint32_t v) {
  detail::check_access<4>(p, true);
  std::memcpy(p, &v, 4);
}
inline void st_global_v4_ffn(void* p, uint4 v) { sm80::st_global_v4(p, v); }

inline float bits_as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_as_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

#else

PFA_ATTN_DEVICE uint32_t ld_global_b16(const void* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
PFA_ATTN_DEVICE uint32_t ld_global_b32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
PFA_ATTN_DEVICE uint4 ld_global_v4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
PFA_ATTN_DEVICE void st_global_b16(void* p, uint32_t v) {
  *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(v);
}
PFA_ATTN_DEVICE void st_global_b32(void* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }
PFA_ATTN_DEVICE void st_global_v4_ffn(void* p, uint4 v) { sm80::st_global_v4(p, v); }

PFA_ATTN_DEVICE float bits_as_float(uint32_t b) { return __uint_as_float(b); }
PFA_ATTN_DEVICE uint32_t float_as_bits(float f) { return __float_as_uint(f); }

#endif

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
