// The fused elementwise step of csrc/ffn/params.h on CUDA: one pass over
// [rows, cols] per direction, for the composition cuBLAS GEMM + this kernel
// (fp32 always; fp16/bf16 where the dispatch table prefers it or the fused
// GEMM cannot run). No torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../ffn/params.h"

namespace pyfastattn {
namespace cuda {
namespace ffn {

// Threads per CTA of the elementwise kernels; a CTA covers kEwThreads * V
// columns (V elements per thread, see elementwise_vec) of one chunk of rows.
constexpr int kEwThreads = 128;

// Elements per thread access: 16 bytes when every pointer is 16-byte aligned
// and cols and every row stride are multiples of it, else 1.
namespace detail {
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
inline int elem_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }
}  // namespace detail

inline int elementwise_vec(const FfnActFwdParams& p) {
  using detail::aligned16;
  const int v = 16 / detail::elem_bytes(p.dtype);
  bool ok = p.cols % v == 0 && aligned16(p.gate) && aligned16(p.out) &&
            p.gate_row_stride % v == 0 && p.out_row_stride % v == 0;
  if (p.bias_gate) ok &= aligned16(p.bias_gate);
  if (p.gated) ok &= aligned16(p.up) && p.up_row_stride % v == 0;
  if (p.gated && p.bias_up) ok &= aligned16(p.bias_up);
  return ok ? v : 1;
}

inline int elementwise_vec(const FfnActBwdParams& p) {
  using detail::aligned16;
  const int v = 16 / detail::elem_bytes(p.dtype);
  bool ok = p.cols % v == 0 && aligned16(p.gate) && aligned16(p.dout) && aligned16(p.dgate) &&
            p.gate_row_stride % v == 0 && p.dout_row_stride % v == 0 &&
            p.dgate_row_stride % v == 0;
  if (p.bias_gate) ok &= aligned16(p.bias_gate);
  if (p.gated) {
    ok &= aligned16(p.up) && aligned16(p.dup) && p.up_row_stride % v == 0 &&
          p.dup_row_stride % v == 0;
    if (p.bias_up) ok &= aligned16(p.bias_up);
  }
  if (p.out) ok &= aligned16(p.out) && p.out_row_stride % v == 0;
  return ok ? v : 1;
}

// Rows per CTA and the number of row chunks (the grid's y): enough CTAs to
// fill a large GPU (about 1024) without chunks under 8 rows.
struct RowChunks {
  int64_t rows_per_chunk, chunks;
};
inline RowChunks elementwise_row_chunks(int64_t rows, int64_t cols, int vec) {
  constexpr int64_t kTargetCtas = 1024, kMinRows = 8, kMaxChunks = 65535;
  const int64_t col_blocks = (cols + kEwThreads * vec - 1) / (kEwThreads * vec);
  int64_t chunks = (kTargetCtas + col_blocks - 1) / (col_blocks > 0 ? col_blocks : 1);
  const int64_t max_by_rows = (rows + kMinRows - 1) / kMinRows;
  chunks = chunks < max_by_rows ? chunks : max_by_rows;
  chunks = chunks < kMaxChunks ? chunks : kMaxChunks;
  chunks = chunks > 1 ? chunks : 1;
  int64_t per = (rows + chunks - 1) / chunks;
  per = per > 0 ? per : 1;
  const int64_t n = (rows + per - 1) / per;
  return {per, n > 0 ? n : 1};
}

// Forward step. Returns the launch error; never synchronises.
cudaError_t ffn_act_fwd_cuda(const FfnActFwdParams& p, cudaStream_t stream);

// Backward step. With p.dbias_gate / p.dbias_up set, `workspace` holds
// [2, chunks, cols] fp32 (chunks from elementwise_row_chunks(rows, cols,
// elementwise_vec(p))): per-chunk column sums, then summed in chunk order
// into dbias_* by a second kernel (deterministic: no atomics).
cudaError_t ffn_act_bwd_cuda(const FfnActBwdParams& p, float* workspace, cudaStream_t stream);
int64_t ffn_act_bwd_workspace_floats(const FfnActBwdParams& p);

// out[c] = sum over r < rows of partial[r, c] (fp32, r in order).
cudaError_t column_sums(const float* partial, int64_t rows, int64_t cols, float* out,
                        cudaStream_t stream);

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
