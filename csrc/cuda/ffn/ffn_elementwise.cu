// Launchers of the elementwise FFN step (ffn_elementwise.h): fp32, fp16 and
// bf16, each with 16-byte or 1-element accesses.
#include "ffn_elementwise_kernel.cuh"

namespace pyfastattn {
namespace cuda {
namespace ffn {
namespace {

template <typename T, int V>
__global__ void __launch_bounds__(kEwThreads)
    act_fwd_kernel(const __grid_constant__ FfnActFwdParams p, int64_t rows_per_chunk) {
  act_fwd_cta<T, V>(p, rows_per_chunk);
}

template <typename T, int V>
__global__ void __launch_bounds__(kEwThreads)
    act_bwd_kernel(const __grid_constant__ FfnActBwdParams p, int64_t rows_per_chunk,
                   float* partial, int64_t chunks) {
  act_bwd_cta<T, V>(p, rows_per_chunk, partial, chunks);
}

__global__ void __launch_bounds__(kEwThreads)
    column_sums_kernel(const float* partial, int64_t rows, int64_t cols, float* out) {
  column_sums_cta(partial, rows, cols, out);
}

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

dim3 grid_of(int64_t cols, int vec, const RowChunks& rc) {
  return dim3(static_cast<unsigned>((cols + kEwThreads * vec - 1) / (kEwThreads * vec)),
              static_cast<unsigned>(rc.chunks), 1);
}

}  // namespace

cudaError_t ffn_act_fwd_cuda(const FfnActFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const int vec = elementwise_vec(p);
  const RowChunks rc = elementwise_row_chunks(p.rows, p.cols, vec);
  return with_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    if (vec == 1) {
      act_fwd_kernel<T, 1><<<grid_of(p.cols, 1, rc), kEwThreads, 0, stream>>>(p, rc.rows_per_chunk);
    } else {
      act_fwd_kernel<T, kVec>
          <<<grid_of(p.cols, kVec, rc), kEwThreads, 0, stream>>>(p, rc.rows_per_chunk);
    }
    return cudaGetLastError();
  });
}

int64_t ffn_act_bwd_workspace_floats(const FfnActBwdParams& p) {
  if (!p.dbias_gate && !p.dbias_up) return 0;
  return 2 * elementwise_row_chunks(p.rows, p.cols, elementwise_vec(p)).chunks * p.cols;
}

cudaError_t ffn_act_bwd_cuda(const FfnActBwdParams& p, float* workspace, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  const int vec = elementwise_vec(p);
  const RowChunks rc = elementwise_row_chunks(p.rows, p.cols, vec);
  const bool sums = p.dbias_gate || p.dbias_up;
  if (p.rows == 0) {  // empty sums: zeros
    if (p.dbias_gate) {
      const cudaError_t e = cudaMemsetAsync(p.dbias_gate, 0, p.cols * sizeof(float), stream);
      if (e != cudaSuccess) return e;
    }
    if (p.dbias_up) return cudaMemsetAsync(p.dbias_up, 0, p.cols * sizeof(float), stream);
    return cudaSuccess;
  }
  if (sums && workspace == nullptr) return cudaErrorInvalidValue;
  float* partial = sums ? workspace : nullptr;
  const cudaError_t err = with_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    if (vec == 1) {
      act_bwd_kernel<T, 1><<<grid_of(p.cols, 1, rc), kEwThreads, 0, stream>>>(
          p, rc.rows_per_chunk, partial, rc.chunks);
    } else {
      act_bwd_kernel<T, kVec><<<grid_of(p.cols, kVec, rc), kEwThreads, 0, stream>>>(
          p, rc.rows_per_chunk, partial, rc.chunks);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess || !sums) return err;
  if (p.dbias_gate) {
    const cudaError_t e = column_sums(partial, rc.chunks, p.cols, p.dbias_gate, stream);
    if (e != cudaSuccess) return e;
  }
  if (p.dbias_up) return column_sums(partial + rc.chunks * p.cols, rc.chunks, p.cols, p.dbias_up, stream);
  return cudaSuccess;
}

cudaError_t column_sums(const float* partial, int64_t rows, int64_t cols, float* out,
                        cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  if (rows == 0) return cudaMemsetAsync(out, 0, cols * sizeof(float), stream);
  column_sums_kernel<<<static_cast<unsigned>((cols + kEwThreads - 1) / kEwThreads), kEwThreads, 0,
                       stream>>>(partial, rows, cols, out);
  return cudaGetLastError();
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
