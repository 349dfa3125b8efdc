// The storage dtypes of every kernel's tensors (attention and FFN, CPU and
// CUDA). Plain C++, no torch headers: CUDA kernels include it through the
// params structs. torch_dtype.h maps torch dtypes onto it.
#pragma once

#include <cstdint>

namespace pyfastattn {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace pyfastattn
