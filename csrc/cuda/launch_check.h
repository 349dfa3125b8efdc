// Launch-error reporting for the CUDA glue (torch side). The launchers return
// cudaError_t; this turns a failure into an error that names the kernel and
// the call's shape, so a first GPU run that fails to launch (shared-memory
// opt-in, grid limits, a missing kernel image) says which kernel and why,
// where C10_CUDA_CHECK would say only "invalid argument" and a line of this
// file.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace pyfastattn {

template <typename... Args>
void check_launch(cudaError_t err, const Args&... what) {
  if (err == cudaSuccess) return;
  TORCH_CHECK(false, "pyfastattn CUDA kernel launch failed: ", what..., ": ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

}  // namespace pyfastattn
