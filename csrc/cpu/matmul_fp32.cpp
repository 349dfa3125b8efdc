// Matrix products in fp32 on the attention's AVX-512 micro-kernels, fp32
// or fp16 storage (matmul_fp32.h says why).
//
// Blocking, as in the BLIS family of GEMMs:
//   * the work is cut into column chunks of up to kMatmulNc columns of C
//     (and, when there are too few of them to balance the threads, row
//     chunks too), handed to the threads from a shared counter;
//   * a chunk walks k in blocks of kMatmulKc; per block it packs its columns
//     of B into fp32 panels of 32 columns ([kc][32], contiguous: a panel stays
//     in L1 while the micro-kernels walk the rows), transposing where B is
//     column-major (the FFN's forward: B = W^T);
//   * then, per block of kMatmulMc rows of A (fp32: read in place, row- or
//     column-major, L2-resident across the panels; fp16: converted to fp32
//     first), one gemm_tiled call per panel: 8 x 32 micro-kernels, C
//     accumulated from the second k block on (fp16: in an fp32 buffer,
//     rounded once at the end).
#include "matmul_fp32.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#include "../env_switch.h"
#include "attention_schedule.h"
#include "attention_tile.h"
#include "ffn_cpu.h"
#include "micro_gemm.h"
#include "simd.h"

namespace pyfastattn {
namespace cpu {

namespace {

constexpr int64_t kMatmulKc = 256;  // k per block: a B panel is 256 x 32 floats = 32 KiB (L1)
constexpr int64_t kMatmulMc = 128;  // rows of A per block: 128 x 256 floats = 128 KiB (L2)
constexpr int64_t kMatmulNc = 256;  // columns of C per chunk: 8 panels, B block 256 KiB
constexpr int64_t kPanel = 32;      // columns per micro-kernel panel (8 x 2 vectors of 16)

}  // namespace

bool matmul_fp32_supported() {
#if PFA_X86
  return cpu_has_avx512();
#else
  return false;
#endif
}

bool matmul_fp32_preferred(DType dtype) {
  static const int choice = [] {
    const char* env = std::getenv("PYFASTATTN_CPU_FFN_GEMM");
    const std::string v = env ? env : "";
    TORCH_CHECK_VALUE(v.empty() || v == "auto" || v == "own" || v == "aten",
                      "PYFASTATTN_CPU_FFN_GEMM must be 'auto' (the default), 'own' or 'aten', got '", v, "'");
    return v == "own" ? 1 : v == "aten" ? 0 : -1;
  }();
  if (dtype == DType::kBFloat16) return false;
  // PYFASTATTN_FFN_ISA caps this FFN kernel as it caps the fused passes.
  if (!matmul_fp32_supported() || std::strcmp(ffn_cpu_isa(), "avx512") != 0) return false;
  if (choice >= 0) return choice == 1;
  if (dtype == DType::kFloat16) return true;
#if PFA_X86
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

#if PFA_X86
namespace {

// Per-thread buffers of a call: B's panels, and for fp16 A's block and C's
// chunk in fp32.
struct MatmulScratch {
  float* bpack;
  float* apack;
  float* cbuf;
};

// n halves from src to fp32 dst (F16C, exact).
PFA_AVX512 PFA_INLINE void halves_to_f32(const c10::Half* src, int64_t n, float* dst) {
  int64_t x = 0;
  for (; x + 16 <= n; x += 16)
    _mm512_storeu_ps(dst + x, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + x))));
  if (x < n) {
    const __mmask16 mk = __mmask16((1u << (n - x)) - 1u);
    _mm512_mask_storeu_ps(dst + x, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, src + x)));
  }
}

// n fp32 values to halves, rounded to nearest even.
PFA_AVX512 PFA_INLINE void f32_to_halves(const float* src, int64_t n, c10::Half* dst) {
  int64_t x = 0;
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (; x + 16 <= n; x += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + x), _mm512_cvtps_ph(_mm512_loadu_ps(src + x), kRound));
  if (x < n) {
    const __mmask16 mk = __mmask16((1u << (n - x)) - 1u);
    _mm256_mask_storeu_epi16(dst + x, mk, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(mk, src + x), kRound));
  }
}

// A row of n values of T as fp32 (a copy for fp32).
template <typename T>
PFA_AVX512 PFA_INLINE void row_to_f32(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same<T, float>::value) {
    std::memcpy(dst, src, size_t(n) * sizeof(float));
  } else {
    halves_to_f32(src, n, dst);
  }
}

// Columns [j0, j0 + cols) of B's rows [p0, p0 + kc) into fp32 panels of
// kPanel columns: panel q at dst + q * kc * kPanel, row p of it at
// + p * kPanel. A partial last panel's columns past `cols` are not read by
// the kernels (masked loads); where B is column-major, pack_t writes them as
// zeros. `strip` (fp16, column-major B): kPanel x kc floats.
template <typename T>
PFA_AVX512 void pack_b_block(const MatmulF32Params& p, int64_t p0, int64_t kc, int64_t j0, int64_t cols,
                             float* dst, float* strip) {
  const T* b = static_cast<const T*>(p.b);
  for (int64_t q0 = 0; q0 < cols; q0 += kPanel) {
    const int64_t w = std::min(kPanel, cols - q0);
    float* panel = dst + (q0 / kPanel) * kc * kPanel;
    if (p.b_cs == 1) {
      const T* src = b + p0 * p.b_rs + (j0 + q0);
      for (int64_t r = 0; r < kc; ++r) row_to_f32(src + r * p.b_rs, w, panel + r * kPanel);
    } else {
      // B(p, j) = b[p + j * b_cs]: column j of B is a row of the source, so
      // the panel is the source's w x kc strip transposed.
      const T* src = b + p0 + (j0 + q0) * p.b_cs;
      if constexpr (std::is_same<T, float>::value) {
        pack_t<VecAvx512, float, float>(src, p.b_cs, int(w), int(kc), panel, kPanel);
      } else {
        for (int64_t r = 0; r < w; ++r) halves_to_f32(src + r * p.b_cs, kc, strip + r * kc);
        pack_t<VecAvx512, float, float>(strip, kc, int(w), int(kc), panel, kPanel);
      }
    }
  }
}

// One chunk: rows [i0, i1) x columns [j0, j1) of C, every k block. fp32: A
// read in place, C accumulated in place. fp16: A's block converted to fp32
// (apack, in its own orientation), C summed in fp32 (cbuf, from C's values
// where accumulating) and rounded once at the end.
template <typename T>
PFA_AVX512 void matmul_chunk(const MatmulF32Params& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                             const MatmulScratch& s) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  const T* a = static_cast<const T*>(p.a);
  T* c = static_cast<T*>(p.c);
  const bool a_col = p.a_cs != 1;  // A(i, p) = a[i + p * a_cs]
  const int64_t cols = j1 - j0, rows = i1 - i0;
  float* cf = kF32 ? reinterpret_cast<float*>(c) + i0 * p.ldc + j0 : s.cbuf;
  const int64_t ldcf = kF32 ? p.ldc : cols;
  if (!kF32 && p.accumulate) {
    for (int64_t r = 0; r < rows; ++r) row_to_f32(c + (i0 + r) * p.ldc + j0, cols, cf + r * ldcf);
  }
  // The bias starts each row's sum: the chunk's first k block accumulates
  // onto it (written per row block, just before its products read it).
  const bool biased = !p.accumulate && p.bias != nullptr;
  const T* bias = biased ? static_cast<const T*>(p.bias) + j0 : nullptr;
  for (int64_t p0 = 0; p0 < p.k; p0 += kMatmulKc) {
    const int64_t kc = std::min(kMatmulKc, p.k - p0);
    pack_b_block<T>(p, p0, kc, j0, cols, s.bpack, s.apack);
    for (int64_t m0 = i0; m0 < i1; m0 += kMatmulMc) {
      const int64_t mc = std::min(kMatmulMc, i1 - m0);
      const float* ablk;
      int64_t lda;
      if constexpr (kF32) {
        ablk = a_col ? a + m0 + p0 * p.a_cs : a + m0 * p.a_rs + p0;
        lda = a_col ? p.a_cs : p.a_rs;
      } else {
        if (a_col) {  // [kc][mc]
          for (int64_t q = 0; q < kc; ++q) row_to_f32(a + m0 + (p0 + q) * p.a_cs, mc, s.apack + q * mc);
          lda = mc;
        } else {  // [mc][kc]
          for (int64_t r = 0; r < mc; ++r) row_to_f32(a + (m0 + r) * p.a_rs + p0, kc, s.apack + r * kc);
          lda = kc;
        }
        ablk = s.apack;
      }
      if (biased && p0 == 0) {
        for (int64_t r = 0; r < mc; ++r) row_to_f32(bias, cols, cf + (m0 - i0 + r) * ldcf);
      }
      for (int64_t q0 = 0; q0 < cols; q0 += kPanel) {
        GemmArgs g{mc, std::min(kPanel, cols - q0), kc, ablk, lda, a_col,
                   s.bpack + (q0 / kPanel) * kc * kPanel, kPanel, cf + (m0 - i0) * ldcf + q0, ldcf,
                   p.accumulate || biased || p0 > 0};
        gemm_tiled<MicroF32Avx512>(g);
      }
    }
  }
  if constexpr (!kF32) {
    for (int64_t r = 0; r < rows; ++r) f32_to_halves(cf + r * ldcf, cols, c + (i0 + r) * p.ldc + j0);
  }
}

// Aligned per-thread buffers, freed with the thread's part of the call.
struct AlignedFloats {
  explicit AlignedFloats(int64_t n)
      : p(n > 0 ? static_cast<float*>(::operator new(size_t(n) * sizeof(float), std::align_val_t(64))) : nullptr) {}
  ~AlignedFloats() {
    if (p) ::operator delete(p, std::align_val_t(64));
  }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* p;
};

template <typename T>
void matmul_run(const MatmulF32Params& p) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  // Chunks: column chunks of kMatmulNc first (each packs only its own
  // columns of B). On more than one thread, while there are fewer than 8
  // chunks per thread (the shared counter then ends the call within ~1/8 of
  // a thread's share of each other: 11 chunks on 2 threads had one thread
  // doing 6 while the other did 5), rows are split too as long as the row
  // chunks keep >= 2 blocks of kMatmulMc, then columns down to 64. fp16
  // (whose chunk sums in an fp32 buffer) also splits rows into chunks of at
  // most kMaxRowsF16. Which thread computes a chunk changes no sum, and the
  // sums' k order is the same for any chunking: the bits do not depend on
  // the thread count.
  constexpr int64_t kMaxRowsF16 = 1024;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = threads == 1 ? 1 : 8 * threads;
  int64_t nc = kMatmulNc;
  int64_t nchunks = (p.n + nc - 1) / nc;
  int64_t mchunks = 1;
  while (nchunks * mchunks < target && p.m / (2 * mchunks) >= 2 * kMatmulMc) mchunks *= 2;
  while (nchunks * mchunks < target && nc > 2 * kPanel) {
    nc /= 2;
    nchunks = (p.n + nc - 1) / nc;
  }
  if (!kF32) mchunks = std::max(mchunks, (p.m + kMaxRowsF16 - 1) / kMaxRowsF16);
  const int64_t mrows = ((p.m + mchunks - 1) / mchunks + kMatmulMc - 1) / kMatmulMc * kMatmulMc;
  mchunks = (p.m + mrows - 1) / mrows;
  const int64_t units = nchunks * mchunks;
  const int64_t kc = std::min(kMatmulKc, p.k);
  const int64_t ncols = std::min(nc, (p.n + kPanel - 1) / kPanel * kPanel);
  const int64_t bpack_floats = kc * ncols;
  const int64_t apack_floats = kF32 ? 0 : std::max(kMatmulMc, kPanel) * kc;
  const int64_t cbuf_floats = kF32 ? 0 : std::min(mrows, p.m) * ncols;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min(threads, units);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    AlignedFloats bpack(bpack_floats), apack(apack_floats), cbuf(cbuf_floats);
    const MatmulScratch s{bpack.p, apack.p, cbuf.p};
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t jc = u % nchunks, ic = u / nchunks;
      const int64_t i0 = ic * mrows, i1 = std::min(p.m, i0 + mrows);
      const int64_t j0 = jc * nc, j1 = std::min(p.n, j0 + nc);
      matmul_chunk<T>(p, i0, i1, j0, j1, s);
    }
  });
}

}  // namespace
#endif

void matmul_fp32(const MatmulF32Params& p) {
  TORCH_CHECK(matmul_fp32_supported(), "matmul_fp32: needs an AVX-512 CPU");
  TORCH_CHECK(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16, "matmul_fp32: fp32 or fp16 data only");
  TORCH_CHECK((p.a_rs == 1 || p.a_cs == 1) && (p.b_rs == 1 || p.b_cs == 1), "matmul_fp32: A and B need a unit stride");
  if (p.m <= 0 || p.n <= 0) return;
  if (p.k <= 0) {  // C = bias or 0, or C as it is
    if (!p.accumulate) {
      const size_t row_bytes = size_t(p.n) * (p.dtype == DType::kFloat32 ? sizeof(float) : sizeof(c10::Half));
      for (int64_t i = 0; i < p.m; ++i) {
        char* row = static_cast<char*>(p.c) + size_t(i * p.ldc) * (row_bytes / size_t(p.n));
        if (p.bias) {
          std::memcpy(row, p.bias, row_bytes);
        } else {
          std::memset(row, 0, row_bytes);  // +0.0 in fp32 and fp16
        }
      }
    }
    return;
  }
#if PFA_X86
  if (p.dtype == DType::kFloat32) {
    matmul_run<float>(p);
  } else {
    matmul_run<c10::Half>(p);
  }
#endif
}

}  // namespace cpu
}  // namespace pyfastattn
