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
int elementwise_vec(const FfnActFwdParams& p);
int elementwise_vec(const FfnActBwdParams& p);

// Rows per CTA and the number of row chunks (the grid's y): enough CTAs to
// fill a large GPU (about 1024) without chunks under 8 rows.
struct RowChunks {
  int64_t rows_per_chunk, chunks;
};
RowChunks elementwise_row_chunks(int64_t rows, int64_t cols, int vec);

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
