// Kernel bodies of the elementwise FFN step (ffn_elementwise.h). Each thread
// owns V adjacent columns and walks a chunk of rows, so the backward's bias
// sums stay in registers; a warp reads 32 * V consecutive elements of a row
// (512 bytes at V = 16 bytes). Device functions, so that the emulator test
// can run them; ffn_elementwise.cu wraps them in kernels.
#pragma once

#include <cstdint>

#include "ffn_act.cuh"
#include "ffn_elementwise.h"
#include "ffn_primitives.cuh"

namespace pyfastattn {
namespace cuda {
namespace ffn {

template <typename T>
PFA_ATTN_DEVICE float elem_to_float(uint32_t bits) {
  if constexpr (sizeof(T) == 4) {
    return bits_as_float(bits);
  } else {
    return sm80::bits_to_float<T>(bits);
  }
}

// V elements of type T at p (aligned to V * sizeof(T) when that is 16).
template <typename T, int V>
PFA_ATTN_DEVICE void load_vec(const void* p, float (&f)[V]) {
  static_assert(V == 1 || V * sizeof(T) == 16, "V is 1 or 16 bytes' worth");
  if constexpr (V == 1) {
    f[0] = elem_to_float<T>(sizeof(T) == 4 ? ld_global_b32(p) : ld_global_b16(p));
  } else {
    const uint4 v = ld_global_v4(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) f[i] = bits_as_float(w[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f[2 * i] = sm80::bits_to_float<T>(w[i] & 0xffffu);
        f[2 * i + 1] = sm80::bits_to_float<T>(w[i] >> 16);
      }
    }
  }
}

template <typename T, int V>
PFA_ATTN_DEVICE void store_vec(void* p, const float (&f)[V]) {
  if constexpr (V == 1) {
    if constexpr (sizeof(T) == 4) {
      st_global_b32(p, float_as_bits(f[0]));
    } else {
      st_global_b16(p, sm80::pack2<T>(f[0], 0.f) & 0xffffu);
    }
  } else {
    uint32_t w[4];
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = float_as_bits(f[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = sm80::pack2<T>(f[2 * i], f[2 * i + 1]);
    }
    uint4 v;
    v.x = w[0];
    v.y = w[1];
    v.z = w[2];
    v.w = w[3];
    st_global_v4_ffn(p, v);
  }
}

template <typename T, int V>
PFA_ATTN_DEVICE void load_vec_or(const void* base, int64_t offset, float fill, float (&f)[V]) {
  if (base == nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = fill;
  } else {
    load_vec<T, V>(static_cast<const T*>(base) + offset, f);
  }
}

template <typename T, int V>
PFA_ATTN_DEVICE void act_fwd_cta(const FfnActFwdParams& p, int64_t rows_per_chunk) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kEwThreads + threadIdx.x) * V;
  if (col >= p.cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < p.rows ? r0 + rows_per_chunk : p.rows;
  float bg[V], bu[V];
  load_vec_or<T, V>(p.bias_gate, col, 0.f, bg);
  load_vec_or<T, V>(p.gated ? p.bias_up : nullptr, col, 0.f, bu);
  for (int64_t r = r0; r < r1; ++r) {
    float a[V], u[V], h[V];
    load_vec<T, V>(static_cast<const T*>(p.gate) + r * p.gate_row_stride + col, a);
    load_vec_or<T, V>(p.gated ? p.up : nullptr, r * p.up_row_stride + col, 1.f, u);
#pragma unroll
    for (int i = 0; i < V; ++i) h[i] = step_fwd(p.act, a[i] + bg[i], u[i] + bu[i], p.gated);
    store_vec<T, V>(static_cast<T*>(p.out) + r * p.out_row_stride + col, h);
  }
}

// partial: [chunks, cols] x 2 (gate, up) column sums of this chunk's rows, or
// nullptr when no bias gradient is wanted.
template <typename T, int V>
PFA_ATTN_DEVICE void act_bwd_cta(const FfnActBwdParams& p, int64_t rows_per_chunk,
                                 float* partial, int64_t chunks) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kEwThreads + threadIdx.x) * V;
  if (col >= p.cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < p.rows ? r0 + rows_per_chunk : p.rows;
  float bg[V], bu[V], sg[V], su[V];
  load_vec_or<T, V>(p.bias_gate, col, 0.f, bg);
  load_vec_or<T, V>(p.gated ? p.bias_up : nullptr, col, 0.f, bu);
#pragma unroll
  for (int i = 0; i < V; ++i) sg[i] = su[i] = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    float a[V], u[V], dh[V], dg[V], du[V], h[V];
    // Every input of the row is read before any output is written (params.h:
    // outputs may overwrite inputs at the same index).
    load_vec<T, V>(static_cast<const T*>(p.gate) + r * p.gate_row_stride + col, a);
    load_vec_or<T, V>(p.gated ? p.up : nullptr, r * p.up_row_stride + col, 1.f, u);
    load_vec<T, V>(static_cast<const T*>(p.dout) + r * p.dout_row_stride + col, dh);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      step_bwd(p.act, a[i] + bg[i], u[i] + bu[i], dh[i], p.gated, dg[i], du[i], h[i]);
      sg[i] += dg[i];
      su[i] += du[i];
    }
    store_vec<T, V>(static_cast<T*>(p.dgate) + r * p.dgate_row_stride + col, dg);
    if (p.gated) store_vec<T, V>(static_cast<T*>(p.dup) + r * p.dup_row_stride + col, du);
    if (p.out) store_vec<T, V>(static_cast<T*>(p.out) + r * p.out_row_stride + col, h);
  }
  if (partial == nullptr) return;
  float* pg = partial + static_cast<int64_t>(blockIdx.y) * p.cols + col;
  float* pu = pg + chunks * p.cols;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (p.dbias_gate) sm80::st_global_f32(pg + i, sg[i]);
    if (p.dbias_up) sm80::st_global_f32(pu + i, su[i]);
  }
}

// out[c] = sum_r partial[r, c], one thread per column, r in order.
PFA_ATTN_DEVICE void column_sums_cta(const float* partial, int64_t rows, int64_t cols,
                                     float* out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kEwThreads + threadIdx.x;
  if (col >= cols) return;
  float s = 0.f;
  for (int64_t r = 0; r < rows; ++r) s += bits_as_float(ld_global_b32(partial + r * cols + col));
  sm80::st_global_f32(out + col, s);
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
