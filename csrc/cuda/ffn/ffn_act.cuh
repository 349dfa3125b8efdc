// The fused elementwise step of csrc/ffn/params.h, per element, in fp32: the
// activation, its derivative, and the forward/backward of one (gate, up)
// pair. Shared by the GEMM epilogues (ffn_gemm_kernel.cuh) and the
// elementwise kernels (ffn_elementwise_kernel.cuh), so the two CUDA paths
// compute the same numbers.
//
// Accuracy: erff, tanhf and expf are CUDA's full-precision versions (a few
// ulp), not the SFU approximations (tanh.approx: 2^-11 relative), because the
// elementwise kernel also serves fp32 tensors, which the tolerance rule holds
// to ~1e-5. The one fast operation is the division of the sigmoid,
// __fdividef: 2 ulp, and for a denominator over 2^126 (x < -87) it gives 0,
// which is what sigmoid rounds to in fp32 anyway. A full IEEE division would
// add a slow-path CALL to every kernel (see sm80_primitives.cuh).
#pragma once

#include <cmath>

#include "../../ffn/params.h"

#if defined(PFA_ATTN_HOST_EMULATION)
// The emulator's __fdividef: its documented worst case (2 ulp; 0 for a
// denominator over 2^126), as sm80_emulation.h models it, not an exact division.
#include "../attention/sm80_primitives.cuh"
#define PFA_FFN_HD inline
#define PFA_FFN_FDIV(a, b) ::pyfastattn::cuda::sm80::fast_div((a), (b))
#else
#define PFA_FFN_HD __device__ __forceinline__
#define PFA_FFN_FDIV(a, b) __fdividef((a), (b))
#endif

namespace pyfastattn {
namespace cuda {
namespace ffn {

constexpr float kInvSqrt2 = 0.70710678118654752f;      // gelu: x / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // gelu': pdf(x) = e^{-x^2/2} / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;   // gelu_tanh: sqrt(2 / pi)
constexpr float kGeluTanhCubic = 0.044715f;            // gelu_tanh: x + 0.044715 x^3

PFA_FFN_HD float sigmoid(float x) { return PFA_FFN_FDIV(1.f, 1.f + expf(-x)); }

// act(x)
PFA_FFN_HD float act_fwd(Activation act, float x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5f * x * (1.f + erff(x * kInvSqrt2));
    case Activation::kGeluTanh: {
      const float u = kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x);
      return 0.5f * x * (1.f + tanhf(u));
    }
    case Activation::kRelu:
      return x < 0.f ? 0.f : x;  // NaN stays NaN, like torch.relu
    case Activation::kSilu:
    default:
      return x * sigmoid(x);
  }
}

// act(x) and act'(x) together (they share the expensive part).
PFA_FFN_HD void act_fwd_grad(Activation act, float x, float& f, float& df) {
  switch (act) {
    case Activation::kGelu: {
      const float cdf = 0.5f * (1.f + erff(x * kInvSqrt2));
      f = x * cdf;
      df = cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
      return;
    }
    case Activation::kGeluTanh: {
      const float x2 = x * x;
      const float t = tanhf(kSqrt2OverPi * x * (1.f + kGeluTanhCubic * x2));
      f = 0.5f * x * (1.f + t);
      df = 0.5f * (1.f + t) +
           0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * x2);
      return;
    }
    case Activation::kRelu:
      f = x < 0.f ? 0.f : x;
      df = x > 0.f ? 1.f : 0.f;  // torch's convention: relu'(0) = 0
      return;
    case Activation::kSilu:
    default: {
      const float s = sigmoid(x);
      f = x * s;
      df = s * (1.f + x * (1.f - s));
      return;
    }
  }
}

// Forward step of one element: a = gate (+ b1), h = act(a) [* (up + b3)].
// `up` is ignored unless gated (the caller passes 1).
PFA_FFN_HD float step_fwd(Activation act, float a, float up, bool gated) {
  const float f = act_fwd(act, a);
  return gated ? f * up : f;
}

// Backward step of one element (params.h): dgate, dup and the recomputed h.
PFA_FFN_HD void step_bwd(Activation act, float a, float up, float dh, bool gated, float& dgate,
                         float& dup, float& h) {
  float f, df;
  act_fwd_grad(act, a, f, df);
  if (gated) {
    dgate = dh * up * df;
    dup = dh * f;
    h = f * up;
  } else {
    dgate = dh * df;
    dup = 0.f;
    h = f;
  }
}

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
