// CUDA launcher of pyfastattn::merge_attention_states (no torch headers).
#pragma once

#include <cuda_runtime.h>

#include "../../merge/params.h"

namespace pyfastattn {
namespace cuda {

// Launches the merge on `stream`; returns the launch error (cudaSuccess if none).
cudaError_t merge_attention_states(const MergeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyfastattn
