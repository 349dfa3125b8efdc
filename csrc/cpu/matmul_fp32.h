// fp32 matrix product on the CPU attention's AVX-512 micro-kernels
// (micro_gemm.h), for the feed-forward network's GEMMs.
//
// Why: PyTorch's CPU build computes fp32 products with MKL, whose sgemm takes
// its AVX2 code on AMD processors: ~100 GFLOP/s on one Zen 5 core against a
// 263 GFLOP/s FMA peak (PERF_NOTES "The fp32 FFN's GEMMs on AMD"). The
// attention's 8 x 32 micro-kernel runs at 247-260 there. bf16 products are
// left to ATen (oneDNN reaches ~85 % of the dot-product peak).
//
// C[m x n] (=|+=) A[m x k] B[k x n], every element of C the sum of its k
// products in k order, in blocks of kMatmulKc along k: the same bits for
// any thread count.
#pragma once

#include <cstdint>

namespace pyfastattn {
namespace cpu {

struct MatmulF32Params {
  int64_t m = 0, n = 0, k = 0;
  // A(i, p) = a[i * a_rs + p * a_cs]; one of the two strides is 1.
  const float* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  // B(p, j) = b[p * b_rs + j * b_cs]; one of the two strides is 1.
  const float* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  // C(i, j) = c[i * ldc + j].
  float* c = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;  // C += A B, else C = A B
};

// Whether matmul_fp32 can run here: an AVX-512 CPU.
bool matmul_fp32_supported();

// Whether the FFN's fp32 GEMMs take matmul_fp32 (else ATen's at::mm): never
// where PYFASTATTN_FFN_ISA caps the FFN kernels below avx512; else
// PYFASTATTN_CPU_FFN_GEMM=own / aten (read once), default "auto": own on an
// AMD CPU with AVX-512 (where MKL runs its AVX2 code), ATen elsewhere (MKL's
// AVX-512 sgemm on Intel is not measured against this one).
bool matmul_fp32_preferred();

// Requires matmul_fp32_supported(); the caller checked the shapes and strides.
void matmul_fp32(const MatmulF32Params& p);

}  // namespace cpu
}  // namespace pyfastattn
