// The FFN's fused elementwise step on CPU: bias + activation (+ gate multiply)
// forward, and activation derivative + gate/up gradients + bias-gradient sums
// (+ the recomputed h) backward, each in ONE pass over the [rows, cols]
// intermediate. csrc/ffn/params.h defines the maths and every field.
//
// Work split. The [rows, cols] plane is cut into blocks of `rows_per_block`
// rows x `col_block` columns (whole rows unless that leaves too few tasks for
// the threads); one at::parallel_for task per block. A task walks its rows one
// by one and each row segment in chunks of kChunk elements: load + convert to
// fp32 locals, compute, convert + store. Whole-row blocks stream through
// contiguous memory: against 2048-column blocks that made the gelu backward
// 1.6x faster (2.0 -> 1.25 ms, fp32 512 x 4096, one thread). Reading every
// input of a chunk before storing any output is what makes same-index
// aliasing (h over gate, dgate over dout) safe.
//
// Bias gradients. Each task sums its columns over its rows into a partial
// row, partial[row block][col]; a second, tiny pass adds the partial rows in
// block order. The row blocking depends only on `rows` (never on the thread
// count), so the sums are bit-identical for any number of threads.
//
// Vectorisation. The chunk loops run over fp32 locals with branch-free
// bodies (selects, no calls), so gcc -O3 vectorises them; exp, erf and tanh
// are polynomial/rational approximations written out below for the same
// reason (libm calls would keep the loops scalar). The chunk code is
// always_inline and instantiated in three task functions with different
// target attributes (AVX-512, AVX2+FMA, baseline x86-64 / other CPUs); the
// widest one the CPU supports is picked once at run time. One thread, fp32
// 128 x 4096 (in cache), forward / backward: gelu 0.10 / 0.32 ms AVX-512,
// 0.21 / 0.57 AVX2, 0.58 / 1.58 portable (SSE2); silu 0.11 / 0.24, 0.23 /
// 0.36, 0.65 / 0.86.
//
// Accuracy (tests/test_ffn.py::test_activation_accuracy checks every
// activation and derivative over [-12, 12] against float64): exp is Cephes'
// expf (~1 ulp), erf a 13/8 rational (~2 ulp); gelu_tanh and silu are written
// through sigmoid so that neither tail cancels.
#include "ffn_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

// Let gcc if-convert selects around floating-point arithmetic: with the
// default -ftrapping-math it keeps the branches of the clamps and of the
// fp16 conversions, and the loops stay scalar (AVX2: every activation loop
// and conversion; AVX-512 only vectorises through masking). This changes no
// result, only which operations may run speculatively.
//
// And keep gcc from turning the fp32 copy loops into `rep movsq` (its
// memcpy idiom): on the 1 KiB chunks here that was 36% of the silu forward.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "no-tree-loop-distribute-patterns")
#endif

// After the pragma, so that the conversions are compiled with it too.
#include "simd.h"

// The AVX2 / AVX-512 variants rely on gcc's vectoriser (and the pragma
// above); other compilers build the portable one only.
#if PFA_X86 && defined(__GNUC__) && !defined(__clang__)
#define PFA_FFN_X86 1
#else
#define PFA_FFN_X86 0
#endif

namespace pyfastattn {
namespace cpu {
namespace {

// Elements per inner step: 1 KiB of fp32 per local array, 16 AVX-512 vectors.
constexpr int kChunk = 256;
// Bias-gradient partial rows: at most this many row blocks.
constexpr int64_t kMaxRowBlocks = 32;
constexpr int64_t kMinRowsPerBlock = 8;

// ---------------------------------------------------------------------------
// Scalar building blocks: branch-free, so that the loops over them vectorise.
// ---------------------------------------------------------------------------

// exp(x), Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial for
// e^r, 2^n put into the exponent bits. Inputs are clamped to [-87, 88], so
// the result is always a normal float (e^-87 = 1.6e-38 stands in for 0) and
// never overflows; NaN propagates.
PFA_INLINE float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: x + kRound - kRound rounds to an integer
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // n's integer value sits in t's low mantissa bits; unsigned arithmetic keeps
  // a NaN input free of undefined behaviour (p is NaN then anyway).
  const uint32_t n_bits = f32_to_bits(t) - f32_to_bits(kRound);
  return p * bits_to_f32((n_bits + 127u) << 23);
}

// erf(x): odd 13/even 8 rational approximation on [-4, 4] (erf is +-1 in fp32
// beyond), the coefficients Eigen and XLA use.
PFA_INLINE float erf_f32(float x) {
  x = x < -4.0f ? -4.0f : x;
  x = x > 4.0f ? 4.0f : x;
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  p = p * x;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return p / q;
}

// ---------------------------------------------------------------------------
// Activations on fp32 arrays: value, and value with derivative.
// ---------------------------------------------------------------------------

constexpr float kSqrtHalf = 0.70710678118654752f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;   // sqrt(2 / pi)
constexpr float kGeluTanhCubic = 0.044715f;

// The compute loops run over whole chunks (kChunk, a compile-time count):
// loads zero-fill a short chunk's tail, so no loop needs a scalar epilogue.
//
// exp goes in a loop of its own, into a local array, before the loop that
// divides: fused into one loop, exp + division measured 2.4x slower (silu,
// 0.89 vs 0.37 ms per 2M fp32 on the AVX-512 dev box; gcc's masked blends
// of the clamps then chain through the division).
template <Activation A>
PFA_INLINE void act_value(float* PFA_RESTRICT x) {
  alignas(64) float e[kChunk];
  if constexpr (A == Activation::kGeluTanh) {
    // 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation in either tail.
    for (int i = 0; i < kChunk; ++i) {
      const float v = x[i];
      e[i] = exp_f32(-2.0f * kSqrt2OverPi * (v + kGeluTanhCubic * v * v * v));
    }
  } else if constexpr (A == Activation::kSilu) {
    for (int i = 0; i < kChunk; ++i) e[i] = exp_f32(-x[i]);
  }
  for (int i = 0; i < kChunk; ++i) {
    const float v = x[i];
    float a;
    if constexpr (A == Activation::kGelu) {
      a = 0.5f * v * (1.0f + erf_f32(v * kSqrtHalf));
    } else if constexpr (A == Activation::kRelu) {
      a = v < 0.0f ? 0.0f : v;  // NaN stays NaN, as torch.relu
    } else {  // silu, gelu_tanh: v sigmoid(z) with e = exp(-z)
      a = v * (1.0f / (1.0f + e[i]));
    }
    x[i] = a;
  }
}

// With s = sigmoid(z) = 1 / (1 + e), e = exp(-z), the derivative terms use
// s (1 - s) = e s^2, exact in both tails (1 - s would cancel for z >> 0).
template <Activation A>
PFA_INLINE void act_value_grad(const float* PFA_RESTRICT x, float* PFA_RESTRICT a,
                                   float* PFA_RESTRICT da) {
  alignas(64) float e[kChunk];
  if constexpr (A == Activation::kGelu) {
    for (int i = 0; i < kChunk; ++i) e[i] = exp_f32(-0.5f * x[i] * x[i]);
  } else if constexpr (A == Activation::kGeluTanh) {
    for (int i = 0; i < kChunk; ++i) {
      const float v = x[i];
      e[i] = exp_f32(-2.0f * kSqrt2OverPi * (v + kGeluTanhCubic * v * v * v));
    }
  } else if constexpr (A == Activation::kSilu) {
    for (int i = 0; i < kChunk; ++i) e[i] = exp_f32(-x[i]);
  }
  for (int i = 0; i < kChunk; ++i) {
    const float v = x[i];
    if constexpr (A == Activation::kGelu) {
      const float cdf = 0.5f * (1.0f + erf_f32(v * kSqrtHalf));
      a[i] = v * cdf;
      da[i] = cdf + v * kInvSqrt2Pi * e[i];
    } else if constexpr (A == Activation::kGeluTanh) {
      // a = v sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3);
      // a' = s + v (1 - tanh(u)^2) / 2 u' = s + 2 v e s^2 u'.
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * v * v);
      const float s = 1.0f / (1.0f + e[i]);
      a[i] = v * s;
      da[i] = s + 2.0f * v * du * (e[i] * s * s);
    } else if constexpr (A == Activation::kRelu) {
      a[i] = v < 0.0f ? 0.0f : v;
      da[i] = v > 0.0f ? 1.0f : 0.0f;
    } else {
      const float s = 1.0f / (1.0f + e[i]);
      a[i] = v * s;
      da[i] = s + v * (e[i] * s * s);
    }
  }
}

// ---------------------------------------------------------------------------
// Loads and stores, converting to / from fp32. A load of n elements
// zero-fills dst up to the next multiple of kChunk.
// ---------------------------------------------------------------------------

PFA_INLINE int64_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

PFA_INLINE const char* at_elem(const void* base, DType dt, int64_t i) {
  return static_cast<const char*>(base) + i * elem_size(dt);
}
PFA_INLINE char* at_elem(void* base, DType dt, int64_t i) {
  return static_cast<char*>(base) + i * elem_size(dt);
}

PFA_INLINE void load(DType dt, const char* PFA_RESTRICT src, float* PFA_RESTRICT dst,
                         int n) {
  if (dt == DType::kFloat32) {
    const float* s = reinterpret_cast<const float*>(src);
    for (int i = 0; i < n; ++i) dst[i] = s[i];
  } else if (dt == DType::kBFloat16) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int i = 0; i < n; ++i) dst[i] = bf16_bits_to_f32(s[i]);
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int i = 0; i < n; ++i) dst[i] = f16_bits_to_f32(s[i]);
  }
  const int padded = (n + kChunk - 1) / kChunk * kChunk;
  for (int i = n; i < padded; ++i) dst[i] = 0.0f;
}

PFA_INLINE void store(DType dt, const float* PFA_RESTRICT src, char* PFA_RESTRICT dst,
                          int n) {
  if (dt == DType::kFloat32) {
    float* d = reinterpret_cast<float*>(dst);
    for (int i = 0; i < n; ++i) d[i] = src[i];
  } else if (dt == DType::kBFloat16) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = f32_to_bf16_bits(src[i]);
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = f32_to_f16_bits(src[i]);
  }
}

PFA_INLINE void add_to(float* PFA_RESTRICT x, const float* PFA_RESTRICT y) {
  for (int i = 0; i < kChunk; ++i) x[i] += y[i];
}

// ---------------------------------------------------------------------------
// The blocking (shared by forward and backward).
// ---------------------------------------------------------------------------

struct Tiling {
  int64_t rows, cols;
  int64_t rows_per_block, row_blocks;  // a function of `rows` only (deterministic sums)
  int64_t col_block, col_blocks;       // may depend on the thread count

  Tiling(int64_t rows_, int64_t cols_, int threads) : rows(rows_), cols(cols_) {
    rows_per_block = std::max(kMinRowsPerBlock, (rows + kMaxRowBlocks - 1) / kMaxRowBlocks);
    row_blocks = (rows + rows_per_block - 1) / rows_per_block;
    // Whole rows where there are enough row blocks to keep every thread
    // busy: a task then streams through contiguous memory. Otherwise split
    // the columns (in whole chunks) until there are ~4 tasks per thread.
    const int64_t chunks = (cols + kChunk - 1) / kChunk;
    const int64_t want_col_blocks = (4 * int64_t(threads) + row_blocks - 1) / row_blocks;
    const int64_t chunks_per_block = std::max<int64_t>(1, chunks / std::max<int64_t>(1, want_col_blocks));
    col_block = chunks_per_block * kChunk;
    col_blocks = (cols + col_block - 1) / col_block;
  }
  int64_t tasks() const { return row_blocks * col_blocks; }
};

struct Block {
  int64_t rb, r0, r1, c0, c1;
  Block(const Tiling& t, int64_t task) {
    rb = task / t.col_blocks;
    const int64_t cb = task % t.col_blocks;
    r0 = rb * t.rows_per_block;
    r1 = std::min(t.rows, r0 + t.rows_per_block);
    c0 = cb * t.col_block;
    c1 = std::min(t.cols, c0 + t.col_block);
  }
};

// The biases in fp32, converted once per call and padded with zeros to whole
// chunks (the kernels add a full chunk). nullptr where there is no bias.
struct Biases {
  std::unique_ptr<float[]> gate, up;
  Biases(DType dt, const void* bias_gate, const void* bias_up, int64_t cols) {
    const int64_t padded = (cols + kChunk - 1) / kChunk * kChunk;
    for (auto [src, dst] : {std::pair{bias_gate, &gate}, std::pair{bias_up, &up}}) {
      if (src == nullptr) continue;
      dst->reset(new float[size_t(padded)]);
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int n = int(std::min<int64_t>(kChunk, cols - c));
        load(dt, at_elem(src, dt, c), dst->get() + c, n);  // zero-fills to the chunk end
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Forward task: h = act(gate + b1) [* (up + b3)] over one block.
// ---------------------------------------------------------------------------

template <Activation A>
PFA_INLINE void fwd_block(const FfnActFwdParams& p, const Tiling& t, const float* bias_g,
                              const float* bias_u, int64_t task) {
  const Block b(t, task);
  const DType dt = p.dtype;
  alignas(64) float g[kChunk];
  alignas(64) float u[kChunk];
  for (int64_t r = b.r0; r < b.r1; ++r) {
    for (int64_t c = b.c0; c < b.c1; c += kChunk) {
      const int n = int(std::min<int64_t>(kChunk, b.c1 - c));
      load(dt, at_elem(p.gate, dt, r * p.gate_row_stride + c), g, n);
      if (bias_g) add_to(g, bias_g + c);
      if (p.gated) {
        load(dt, at_elem(p.up, dt, r * p.up_row_stride + c), u, n);
        if (bias_u) add_to(u, bias_u + c);
      }
      act_value<A>(g);
      if (p.gated) {
        for (int i = 0; i < kChunk; ++i) g[i] *= u[i];
      }
      store(dt, g, at_elem(p.out, dt, r * p.out_row_stride + c), n);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward task over one block; bias sums go to partial[rb][gate, up][cols],
// this task's columns of its row block (so no two tasks share a float).
// ---------------------------------------------------------------------------

template <Activation A>
PFA_INLINE void bwd_block(const FfnActBwdParams& p, const Tiling& t, const float* bias_g,
                              const float* bias_u, int64_t task, float* partial) {
  const Block b(t, task);
  const DType dt = p.dtype;
  const int64_t padded_cols = (t.cols + kChunk - 1) / kChunk * kChunk;
  float* sum_g = partial ? partial + (b.rb * 2) * padded_cols : nullptr;
  float* sum_u = partial ? partial + (b.rb * 2 + 1) * padded_cols : nullptr;
  if (partial) {
    const int64_t c1 = std::min(padded_cols, (b.c1 + kChunk - 1) / kChunk * kChunk);
    std::fill(sum_g + b.c0, sum_g + c1, 0.0f);
    std::fill(sum_u + b.c0, sum_u + c1, 0.0f);
  }
  alignas(64) float g[kChunk];   // gate + b1
  alignas(64) float u[kChunk];   // up + b3
  alignas(64) float d[kChunk];   // dL/dh
  alignas(64) float a[kChunk];   // act(g), then h
  alignas(64) float da[kChunk];  // act'(g), then dgate
  alignas(64) float du[kChunk];  // dup
  for (int64_t r = b.r0; r < b.r1; ++r) {
    for (int64_t c = b.c0; c < b.c1; c += kChunk) {
      const int n = int(std::min<int64_t>(kChunk, b.c1 - c));
      // Every load of the chunk comes before its first store (aliasing).
      load(dt, at_elem(p.gate, dt, r * p.gate_row_stride + c), g, n);
      load(dt, at_elem(p.dout, dt, r * p.dout_row_stride + c), d, n);
      if (bias_g) add_to(g, bias_g + c);
      if (p.gated) {
        load(dt, at_elem(p.up, dt, r * p.up_row_stride + c), u, n);
        if (bias_u) add_to(u, bias_u + c);
      }
      act_value_grad<A>(g, a, da);
      if (p.gated) {
        for (int i = 0; i < kChunk; ++i) {
          const float dgi = d[i] * u[i] * da[i];
          du[i] = d[i] * a[i];
          a[i] *= u[i];
          da[i] = dgi;
        }
      } else {
        for (int i = 0; i < kChunk; ++i) da[i] *= d[i];
      }
      if (partial) {  // a short chunk's tail adds zeros (d = 0 there)
        add_to(sum_g + c, da);
        if (p.gated) add_to(sum_u + c, du);
      }
      store(dt, da, at_elem(p.dgate, dt, r * p.dgate_row_stride + c), n);
      if (p.gated) store(dt, du, at_elem(p.dup, dt, r * p.dup_row_stride + c), n);
      if (p.out) store(dt, a, at_elem(p.out, dt, r * p.out_row_stride + c), n);
    }
  }
}

// ---------------------------------------------------------------------------
// Per-ISA task functions. The bodies above are always_inline, so each
// instantiation here is compiled (and vectorised) for its target.
// ---------------------------------------------------------------------------

// g = act(g) [* u] over n fp32 values in place (the small-token forward's
// step, csrc/cpu/ffn_small_tokens.cpp): whole chunks in place, a short tail
// through a zero-padded local copy.
template <Activation A>
PFA_INLINE void act_fp32_span(float* g, const float* u, int64_t n) {
  alignas(64) float tail[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int m = int(std::min<int64_t>(kChunk, n - c));
    float* v = g + c;
    if (m < kChunk) {
      for (int i = 0; i < kChunk; ++i) tail[i] = i < m ? g[c + i] : 0.0f;
      v = tail;
    }
    act_value<A>(v);
    if (u != nullptr) {
      for (int i = 0; i < m; ++i) v[i] *= u[c + i];
    }
    if (m < kChunk) {
      for (int i = 0; i < m; ++i) g[c + i] = tail[i];
    }
  }
}

using FwdFn = void (*)(const FfnActFwdParams&, const Tiling&, const float*, const float*, int64_t,
                       int64_t);
using SpanFn = void (*)(float*, const float*, int64_t);
using BwdFn = void (*)(const FfnActBwdParams&, const Tiling&, const float*, const float*, int64_t,
                       int64_t, float*);

#define PFA_FFN_TASKS(SUFFIX, ATTR)                                                          \
  template <Activation A>                                                                    \
  ATTR void fwd_tasks_##SUFFIX(const FfnActFwdParams& p, const Tiling& t, const float* bg,   \
                               const float* bu, int64_t begin, int64_t end) {                \
    for (int64_t i = begin; i < end; ++i) fwd_block<A>(p, t, bg, bu, i);                     \
  }                                                                                          \
  template <Activation A>                                                                    \
  ATTR void bwd_tasks_##SUFFIX(const FfnActBwdParams& p, const Tiling& t, const float* bg,   \
                               const float* bu, int64_t begin, int64_t end, float* partial) { \
    for (int64_t i = begin; i < end; ++i) bwd_block<A>(p, t, bg, bu, i, partial);            \
  }                                                                                          \
  template <Activation A>                                                                    \
  ATTR void act_span_##SUFFIX(float* g, const float* u, int64_t n) {                         \
    act_fp32_span<A>(g, u, n);                                                               \
  }

PFA_FFN_TASKS(portable, )
#if PFA_FFN_X86
PFA_FFN_TASKS(avx2, PFA_AVX2)
PFA_FFN_TASKS(avx512, PFA_AVX512)
#endif
#undef PFA_FFN_TASKS

enum class Isa { kPortable, kAvx2, kAvx512 };

// The widest supported set, lowered by PYFASTATTN_FFN_ISA=avx2|portable (read
// once; tests use it to run every variant on one machine).
Isa detect_isa() {
  Isa best = Isa::kPortable;
#if PFA_FFN_X86
  if (cpu_has_avx512()) {
    best = Isa::kAvx512;
  } else if (cpu_has_avx2()) {
    best = Isa::kAvx2;
  }
#endif
  const char* cap = std::getenv("PYFASTATTN_FFN_ISA");
  const std::string v = cap ? cap : "";
  // avx512bf16 and avx512 leave this step's choice as it is (avx512 caps the
  // small-token forward's dot products, ffn_small_tokens.cpp).
  TORCH_CHECK_VALUE(v.empty() || v == "avx512bf16" || v == "avx512" || v == "avx2" || v == "portable",
                    "PYFASTATTN_FFN_ISA must be one of avx512bf16, avx512, avx2, portable; got '", v, "'");
  const Isa want = v == "portable" ? Isa::kPortable : v == "avx2" ? Isa::kAvx2 : best;
  if (int(want) < int(best)) best = want;
  return best;
}

Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

template <Activation A>
void pick(Isa i, FwdFn& f, BwdFn& b) {
  switch (i) {
#if PFA_FFN_X86
    case Isa::kAvx512:
      f = &fwd_tasks_avx512<A>;
      b = &bwd_tasks_avx512<A>;
      return;
    case Isa::kAvx2:
      f = &fwd_tasks_avx2<A>;
      b = &bwd_tasks_avx2<A>;
      return;
#endif
    default:
      f = &fwd_tasks_portable<A>;
      b = &bwd_tasks_portable<A>;
  }
}

void kernels(Activation act, FwdFn& f, BwdFn& b) {
  const Isa i = isa();
  switch (act) {
    case Activation::kGelu:
      return pick<Activation::kGelu>(i, f, b);
    case Activation::kGeluTanh:
      return pick<Activation::kGeluTanh>(i, f, b);
    case Activation::kRelu:
      return pick<Activation::kRelu>(i, f, b);
    case Activation::kSilu:
    default:
      return pick<Activation::kSilu>(i, f, b);
  }
}

}  // namespace

void ffn_act_fwd(const FfnActFwdParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  FwdFn fwd;
  BwdFn bwd;
  kernels(p.act, fwd, bwd);
  const Tiling t(p.rows, p.cols, at::get_num_threads());
  const Biases bias(p.dtype, p.bias_gate, p.bias_up, p.cols);
  const float* bg = bias.gate.get();
  const float* bu = bias.up.get();
  at::parallel_for(0, t.tasks(), 1,
                   [&](int64_t begin, int64_t end) { fwd(p, t, bg, bu, begin, end); });
}

void ffn_act_bwd(const FfnActBwdParams& p) {
  const bool sums = p.dbias_gate != nullptr || p.dbias_up != nullptr;
  if (p.rows == 0 || p.cols == 0) {
    if (p.dbias_gate) std::fill(p.dbias_gate, p.dbias_gate + p.cols, 0.0f);
    if (p.dbias_up) std::fill(p.dbias_up, p.dbias_up + p.cols, 0.0f);
    return;
  }
  FwdFn fwd;
  BwdFn bwd;
  kernels(p.act, fwd, bwd);
  const Tiling t(p.rows, p.cols, at::get_num_threads());
  const Biases bias(p.dtype, p.bias_gate, p.bias_up, p.cols);
  const float* bg = bias.gate.get();
  const float* bu = bias.up.get();
  // partial[row block][gate, up][padded cols]: each task zeroes and fills its
  // own columns of its row block.
  const int64_t padded_cols = (p.cols + kChunk - 1) / kChunk * kChunk;
  std::unique_ptr<float[]> partial(sums ? new float[size_t(t.row_blocks * 2 * padded_cols)] : nullptr);
  float* part = partial.get();
  at::parallel_for(0, t.tasks(), 1,
                   [&](int64_t begin, int64_t end) { bwd(p, t, bg, bu, begin, end, part); });
  if (!sums) return;
  // Sum the partial rows in row-block order, parallel over columns.
  float* outs[2] = {p.dbias_gate, p.dbias_up};
  at::parallel_for(0, p.cols, 1024, [&](int64_t c0, int64_t c1) {
    for (int k = 0; k < 2; ++k) {
      float* out = outs[k];
      if (out == nullptr) continue;
      std::copy(part + k * padded_cols + c0, part + k * padded_cols + c1, out + c0);
      for (int64_t rb = 1; rb < t.row_blocks; ++rb) {
        const float* row = part + (rb * 2 + k) * padded_cols;
        for (int64_t c = c0; c < c1; ++c) out[c] += row[c];
      }
    }
  });
}

namespace {

template <Activation A>
SpanFn pick_span(Isa i) {
  switch (i) {
#if PFA_FFN_X86
    case Isa::kAvx512:
      return &act_span_avx512<A>;
    case Isa::kAvx2:
      return &act_span_avx2<A>;
#endif
    default:
      return &act_span_portable<A>;
  }
}

}  // namespace

void ffn_act_fp32(Activation act, float* g, const float* u, int64_t n) {
  const Isa i = isa();
  SpanFn f;
  switch (act) {
    case Activation::kGelu:
      f = pick_span<Activation::kGelu>(i);
      break;
    case Activation::kGeluTanh:
      f = pick_span<Activation::kGeluTanh>(i);
      break;
    case Activation::kRelu:
      f = pick_span<Activation::kRelu>(i);
      break;
    case Activation::kSilu:
    default:
      f = pick_span<Activation::kSilu>(i);
  }
  f(g, u, n);
}

const char* ffn_cpu_isa() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace cpu
}  // namespace pyfastattn
