// Where runtime values become template arguments, and the only place: the
// launcher maps (dtype, head_dim) to a compiled variant through these.
//
//   PFA_FP16_SWITCH(p.dtype == DType::kBFloat16, Element, [&] { ... Element ... });
//   PFA_HEADDIM_SWITCH(p.head_dim, kHeadDim, [&] { ... kHeadDim ... });
//
// A head dim runs in the smallest compiled one that holds it (40 -> 64,
// 80 -> 96, 160 -> 256); the kernel zero-fills the columns it does not have.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define PFA_FP16_SWITCH(IS_BF16, TYPE_NAME, ...) \
  [&] {                                          \
    if (IS_BF16) {                               \
      using TYPE_NAME = __nv_bfloat16;           \
      return __VA_ARGS__();                      \
    } else {                                     \
      using TYPE_NAME = __half;                  \
      return __VA_ARGS__();                      \
    }                                            \
  }()

#define PFA_HEADDIM_SWITCH(HEAD_DIM, CONST_NAME, ...) \
  [&] {                                               \
    if (HEAD_DIM <= 32) {                             \
      constexpr static int CONST_NAME = 32;           \
      return __VA_ARGS__();                           \
    } else if (HEAD_DIM <= 64) {                      \
      constexpr static int CONST_NAME = 64;           \
      return __VA_ARGS__();                           \
    } else if (HEAD_DIM <= 96) {                      \
      constexpr static int CONST_NAME = 96;           \
      return __VA_ARGS__();                           \
    } else if (HEAD_DIM <= 128) {                     \
      constexpr static int CONST_NAME = 128;          \
      return __VA_ARGS__();                           \
    } else {                                          \
      constexpr static int CONST_NAME = 256;          \
      return __VA_ARGS__();                           \
    }                                                 \
  }()
