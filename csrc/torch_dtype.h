// torch dtype -> the kernels' DType (dtype.h): the one mapping, for the layers
// that turn tensors into params (attention/api.cpp, ffn/ffn_ops.cpp,
// cuda/ffn_cuda_api.cpp). Each of them words its own error for a dtype the
// kernels do not take.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

#include "dtype.h"

namespace pyfastattn {

// The dtypes the kernels take, as error messages name them.
constexpr const char* kKernelDTypes = "float32, float16 or bfloat16";

// The kernels' DType for torch dtype t; std::nullopt where there is none.
inline std::optional<DType> kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return DType::kFloat32;
    case c10::ScalarType::Half:
      return DType::kFloat16;
    case c10::ScalarType::BFloat16:
      return DType::kBFloat16;
    default:
      return std::nullopt;
  }
}

// kernel_dtype of a dtype the caller has already checked.
inline DType to_dtype(c10::ScalarType t) {
  const std::optional<DType> d = kernel_dtype(t);
  TORCH_INTERNAL_ASSERT(d.has_value(), "pyfastattn: no kernel dtype for ", t, " (unchecked input)");
  return *d;
}

}  // namespace pyfastattn
