// Matrix products in fp32 arithmetic on the CPU attention's AVX-512
// micro-kernels (micro_gemm.h), for the feed-forward network's GEMMs and the
// modules' projections; fp32 or fp16 storage.
//
// Why: PyTorch's CPU build computes fp32 products with MKL, whose sgemm takes
// its AVX2 code on AMD processors: ~100 GFLOP/s on one Zen 5 core against a
// 263 GFLOP/s FMA peak; and its fp16 products run at ~26 GFLOP/s there
// (PERF_NOTES "The fp32 FFN's GEMMs on AMD"). The attention's 8 x 32
// micro-kernel runs at 247-260. bf16 products are left to ATen (oneDNN
// reaches ~85 % of the dot-product peak).
//
// C[m x n] (=|+=) A[m x k] B[k x n], every element of C the sum of its k
// products in k order, in blocks of kMatmulKc along k, in fp32 (fp16 C: from
// an fp32 sum, rounded once, after C's own value where accumulating): the
// same bits for any thread count.
#pragma once

#include <cstdint>

#include "../dtype.h"

namespace pyfastattn {
namespace cpu {

struct MatmulF32Params {
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::kFloat32;  // of A, B and C: kFloat32 or kFloat16
  // A(i, p) = a[i * a_rs + p * a_cs]; one of the two strides is 1.
  const void* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  // B(p, j) = b[p * b_rs + j * b_cs]; one of the two strides is 1.
  const void* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  // C(i, j) = c[i * ldc + j].
  void* c = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;  // C += A B, else C = A B (+ bias)
  // Without accumulate: bias[j] (same dtype, contiguous, n values) starts
  // every row's sum, as addmm's broadcast bias does; null for none.
  const void* bias = nullptr;
};

// Whether matmul_fp32 can run here: an AVX-512 CPU.
bool matmul_fp32_supported();

// Whether the FFN's GEMMs of this dtype take matmul_fp32 (else ATen's): never
// for bf16, nor where PYFASTATTN_FFN_ISA caps the FFN kernels below avx512;
// else PYFASTATTN_CPU_FFN_GEMM=own / aten (read once), default "auto": fp16
// on every AVX-512 CPU (ATen's fp16 CPU product is ~10x slower), fp32 on AMD
// (where MKL runs its AVX2 code) but not elsewhere (MKL's AVX-512 sgemm on
// Intel is not measured against this one).
bool matmul_fp32_preferred(DType dtype);

// Requires matmul_fp32_supported(); the caller checked the shapes and strides.
void matmul_fp32(const MatmulF32Params& p);

}  // namespace cpu
}  // namespace pyfastattn
