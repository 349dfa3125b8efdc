// CUDA kernel of pyfastattn::merge_attention_states (math in
// csrc/merge/params.h). Memory-bound: one warp per (batch, row, head) row;
// lane 0's two lse loads are broadcast by the cache, every lane computes the
// two weights (a few flops) and streams head_dim elements of both parts.
// One kernel per (out_a dtype, out_b dtype): 9 tiny variants, ~1 s to build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "merge_attention_states.h"

namespace pyfastattn {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename TA, typename TB>
__global__ void __launch_bounds__(kThreads) merge_attention_states_kernel(const MergeParams p) {
  const int64_t rows = p.batch * p.seqlen * p.heads;
  const int lane = threadIdx.x % 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const auto* a = static_cast<const TA*>(p.out_a);
  const auto* b = static_cast<const TB*>(p.out_b);
  auto* o = static_cast<TA*>(p.out);
  for (int64_t r = first; r < rows; r += step) {
    const int64_t h = r % p.heads;
    const int64_t s = (r / p.heads) % p.seqlen;
    const int64_t bi = r / (p.heads * p.seqlen);
    const float la = p.lse_a[bi * p.la_batch_stride + h * p.la_head_stride + s * p.la_row_stride];
    const float lb = p.lse_b[bi * p.lb_batch_stride + h * p.lb_head_stride + s * p.lb_row_stride];
    TA* orow = o + bi * p.o_batch_stride + s * p.o_row_stride + h * p.o_head_stride;
    const TA* arow = a + bi * p.a_batch_stride + s * p.a_row_stride + h * p.a_head_stride;
    const TB* brow = b + bi * p.b_batch_stride + s * p.b_row_stride + h * p.b_head_stride;
    const float m = fmaxf(la, lb);
    float lse, ca, cb;
    bool read_a, read_b;
    if (isnan(la) || isnan(lb)) {  // NaN in, NaN out: never hidden
      lse = __int_as_float(0x7fc00000);
      ca = cb = lse;
      read_a = read_b = false;
    } else if (m == -INFINITY) {  // neither part saw a key: out 0, lse -inf
      lse = -INFINITY;
      ca = cb = 0.0f;
      read_a = read_b = false;
    } else {
      const float wa = __expf(la - m), wb = __expf(lb - m);
      const float inv = 1.0f / (wa + wb);
      lse = m + __logf(wa + wb);
      ca = wa * inv;
      cb = wb * inv;
      read_a = wa != 0.0f;  // a part of weight 0 is never read
      read_b = wb != 0.0f;
    }
    if (lane == 0) p.lse[bi * p.lo_batch_stride + h * p.lo_head_stride + s * p.lo_row_stride] = lse;
    const bool nan_row = !read_a && !read_b && lse != -INFINITY;
    for (int64_t j = lane; j < p.head_dim; j += 32) {
      float acc = nan_row ? lse : 0.0f;
      if (read_a) acc += ca * to_float(arow[j]);
      if (read_b) acc += cb * to_float(brow[j]);
      orow[j] = from_float<TA>(acc);
    }
  }
}

template <typename TA, typename TB>
cudaError_t launch(const MergeParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen * p.heads;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  merge_attention_states_kernel<TA, TB><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename TA>
cudaError_t dispatch_b(const MergeParams& p, cudaStream_t stream) {
  switch (p.b_dtype) {
    case DType::kFloat16: return launch<TA, __half>(p, stream);
    case DType::kBFloat16: return launch<TA, __nv_bfloat16>(p, stream);
    default: return launch<TA, float>(p, stream);
  }
}

}  // namespace

cudaError_t merge_attention_states(const MergeParams& p, cudaStream_t stream) {
  switch (p.a_dtype) {
    case DType::kFloat16: return dispatch_b<__half>(p, stream);
    case DType::kBFloat16: return dispatch_b<__nv_bfloat16>(p, stream);
    default: return dispatch_b<float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace pyfastattn
