// fp32 matrix product on the attention's AVX-512 micro-kernels
// (matmul_fp32.h says why).
//
// Blocking, as in the BLIS family of GEMMs:
//   * the work is cut into column chunks of kMatmulNc columns of C (and, when
//     there are too few of them to keep every thread busy, row chunks too),
//     handed to the threads from a shared counter;
//   * a chunk walks k in blocks of kMatmulKc; per block it packs its columns
//     of B into panels of 32 columns ([kc][32], contiguous: a panel stays in
//     L1 while the micro-kernels walk the rows), transposing where B is
//     column-major (the FFN's forward: B = W^T);
//   * then, per block of kMatmulMc rows of A (read in place, row- or
//     column-major: L2-resident across the panels), one gemm_tiled call per
//     panel: 8 x 32 micro-kernels, C accumulated from the second k block on.
#include "matmul_fp32.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

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

bool matmul_fp32_preferred() {
  static const int choice = [] {
    const char* env = std::getenv("PYFASTATTN_CPU_FFN_GEMM");
    const std::string v = env ? env : "";
    TORCH_CHECK_VALUE(v.empty() || v == "auto" || v == "own" || v == "aten",
                      "PYFASTATTN_CPU_FFN_GEMM must be 'auto' (the default), 'own' or 'aten', got '", v, "'");
    return v == "own" ? 1 : v == "aten" ? 0 : -1;
  }();
  // PYFASTATTN_FFN_ISA caps this FFN kernel as it caps the fused passes.
  if (!matmul_fp32_supported() || std::strcmp(ffn_cpu_isa(), "avx512") != 0) return false;
  if (choice >= 0) return choice == 1;
#if PFA_X86
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

#if PFA_X86
namespace {

// Columns [j0, j0 + cols) of B's rows [p0, p0 + kc) into panels of kPanel
// columns: panel q at dst + q * kc * kPanel, row p of it at + p * kPanel. A
// partial last panel's columns past `cols` are not read by the kernels
// (masked loads); where B is column-major, pack_t writes them as zeros.
PFA_AVX512 void pack_b_block(const MatmulF32Params& p, int64_t p0, int64_t kc, int64_t j0, int64_t cols,
                             float* dst) {
  for (int64_t q0 = 0; q0 < cols; q0 += kPanel) {
    const int64_t w = std::min(kPanel, cols - q0);
    float* panel = dst + (q0 / kPanel) * kc * kPanel;
    if (p.b_cs == 1) {
      const float* src = p.b + p0 * p.b_rs + (j0 + q0);
      for (int64_t r = 0; r < kc; ++r) std::memcpy(panel + r * kPanel, src + r * p.b_rs, size_t(w) * sizeof(float));
    } else {
      // B(p, j) = b[p + j * b_cs]: column j of B is a row of the source, so
      // the panel is the source's w x kc strip transposed.
      const float* src = p.b + p0 + (j0 + q0) * p.b_cs;
      pack_t<VecAvx512, float, float>(src, p.b_cs, int(w), int(kc), panel, kPanel);
    }
  }
}

// One chunk: rows [i0, i1) x columns [j0, j1) of C, every k block.
PFA_AVX512 void matmul_chunk(const MatmulF32Params& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                             float* bpack) {
  const bool a_col = p.a_cs != 1;  // A(i, p) = a[i + p * a_cs]
  const int64_t lda = a_col ? p.a_cs : p.a_rs;
  const int64_t cols = j1 - j0;
  for (int64_t p0 = 0; p0 < p.k; p0 += kMatmulKc) {
    const int64_t kc = std::min(kMatmulKc, p.k - p0);
    pack_b_block(p, p0, kc, j0, cols, bpack);
    for (int64_t m0 = i0; m0 < i1; m0 += kMatmulMc) {
      const int64_t mc = std::min(kMatmulMc, i1 - m0);
      const float* ablk = a_col ? p.a + m0 + p0 * p.a_cs : p.a + m0 * p.a_rs + p0;
      for (int64_t q0 = 0; q0 < cols; q0 += kPanel) {
        GemmArgs g{mc, std::min(kPanel, cols - q0), kc, ablk, lda, a_col,
                   bpack + (q0 / kPanel) * kc * kPanel, kPanel, p.c + m0 * p.ldc + j0 + q0, p.ldc,
                   p.accumulate || p0 > 0};
        gemm_tiled<MicroF32Avx512>(g);
      }
    }
  }
}

}  // namespace
#endif

void matmul_fp32(const MatmulF32Params& p) {
  TORCH_CHECK(matmul_fp32_supported(), "matmul_fp32: needs an AVX-512 CPU");
  TORCH_CHECK((p.a_rs == 1 || p.a_cs == 1) && (p.b_rs == 1 || p.b_cs == 1), "matmul_fp32: A and B need a unit stride");
  if (p.m <= 0 || p.n <= 0) return;
  if (p.k <= 0) {
    if (!p.accumulate) {
      for (int64_t i = 0; i < p.m; ++i) std::fill(p.c + i * p.ldc, p.c + i * p.ldc + p.n, 0.0f);
    }
    return;
  }
#if PFA_X86
  // Chunks: column chunks first (each packs only its own columns of B);
  // rows are split too while there are fewer than 4 chunks per thread and
  // the row chunks stay >= 2 blocks of kMatmulMc. Which thread computes a
  // chunk changes no sum, so the bits do not depend on the thread count.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nchunks = (p.n + kMatmulNc - 1) / kMatmulNc;
  int64_t mchunks = 1;
  while (nchunks * mchunks < 4 * threads && p.m / (2 * mchunks) >= 2 * kMatmulMc) mchunks *= 2;
  const int64_t mrows = ((p.m + mchunks - 1) / mchunks + kMatmulMc - 1) / kMatmulMc * kMatmulMc;
  mchunks = (p.m + mrows - 1) / mrows;
  const int64_t units = nchunks * mchunks;
  const int64_t kc = std::min(kMatmulKc, p.k);
  const int64_t pack_floats = kc * std::min(kMatmulNc, (p.n + kPanel - 1) / kPanel * kPanel);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min(threads, units);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::unique_ptr<float[], void (*)(float*)> bpack(
        static_cast<float*>(::operator new(size_t(pack_floats) * sizeof(float), std::align_val_t(64))),
        [](float* f) { ::operator delete(f, std::align_val_t(64)); });
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t jc = u % nchunks, ic = u / nchunks;
      const int64_t i0 = ic * mrows, i1 = std::min(p.m, i0 + mrows);
      const int64_t j0 = jc * kMatmulNc, j1 = std::min(p.n, j0 + kMatmulNc);
      matmul_chunk(p, i0, i1, j0, j1, bpack.get());
    }
  });
#endif
}

}  // namespace cpu
}  // namespace pyfastattn
