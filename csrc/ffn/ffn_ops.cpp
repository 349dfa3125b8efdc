// The fused feed-forward network: op schemas and the CPU implementation.
//
// torch.ops.pyfastattn.ffn_fwd / ffn_bwd compute the whole FFN of
// csrc/ffn/params.h (plain or gated) on 2-D x [tokens, d_model]; the Python
// layer (pyfastattn/ffn.py) flattens leading dims, validates arguments with
// friendly errors, and adds register_fake and register_autograd.
//
// The implementation here is device-generic ATen: the GEMMs are at::mm /
// at::addmm calls (on CPU, fp32 on AMD and fp16 take cpu::matmul_fp32
// instead: gemm() and own_gemm() below), and everything elementwise between
// them is ONE fused step per direction, a function over the params structs
// of csrc/ffn/params.h.
// The CPU registration passes the CPU step kernels (csrc/cpu/ffn_cpu.cpp). A
// CUDA build can register its own GEMM-with-epilogue kernels for the same
// schemas, or this composition with CUDA step kernels (cuBLAS + a fused
// elementwise kernel), whichever measures faster.
//
// Saved for backward (the forward's second output, when save_for_backward):
//   act_in [n, tokens, d_ff]  the first GEMMs' results, the pre-activations:
//                             n = 1: x W1^T;  n = 2: (x W1^T, x W3^T); with
//                             the biases added for bf16/fp16 (bias_in_gemm)
// h = act(...) is not saved: the backward step recomputes it while it reads
// the pre-activations anyway (one extra [tokens, d_ff] write), which halves
// what an FFN keeps between forward and backward: d_ff per token plain,
// 2 d_ff gated, against eager PyTorch's 2 d_ff and 4 d_ff.
// Otherwise act_in is empty ([0]) and ffn_bwd(recompute=true) recomputes it
// from x (one extra GEMM plain, two gated), Liger-style: nothing of size
// tokens x d_ff outlives the forward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "../cpu/ffn_cpu.h"
#include "../cpu/ffn_small_tokens.h"
#include "../cpu/matmul_fp32.h"
#include "../torch_dtype.h"
#include "ffn_ops.h"
#include "params.h"

namespace pyfastattn {

Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "ffn: activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu', got '",
              std::string(name), "'");
}

namespace {

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name,
                std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "ffn: ", name, ".dtype must be ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "ffn: ", name, " must be on ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "ffn: ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
}

}  // namespace

// The invariants a kernel relies on; pyfastattn/ffn.py has already checked
// them with friendlier messages.
FfnShape check_inputs(const at::Tensor& x, const at::Tensor& w1,
                      const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& w3,
                      const std::optional<at::Tensor>& b3) {
  TORCH_CHECK(x.dim() == 2, "ffn: x must be 2-D [tokens, d_model], got ", x.sizes());
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2, "ffn: weights must be 2-D, got w1 ", w1.sizes(),
              " and w2 ", w2.sizes());
  TORCH_CHECK(kernel_dtype(x.scalar_type()), "ffn: dtype must be ", kKernelDTypes, ", got ",
              x.scalar_type());
  FfnShape s{x.size(0), x.size(1), w1.size(0), w2.size(0), w3.has_value()};
  check_like(w1, x, "w1", {s.d_ff, s.d_model});
  check_like(w2, x, "w2", {s.d_out, s.d_ff});
  if (b1) check_like(*b1, x, "b1", {s.d_ff});
  if (b2) check_like(*b2, x, "b2", {s.d_out});
  if (w3) check_like(*w3, x, "w3", {s.d_ff, s.d_model});
  TORCH_CHECK(!b3 || w3, "ffn: b3 (the up-projection bias) needs w3");
  if (b3) check_like(*b3, x, "b3", {s.d_ff});
  return s;
}

namespace {

// Per-thread scratch for the [tokens, d_ff] temporaries that never leave an
// op: dH, dgate, dup and recomputed pre-activations in the backward, gate and
// up in a forward that saves nothing. A fresh multi-MiB tensor from the
// system allocator is page-faulted in on first touch, every call: bf16 gated
// T512 D1024 fwd+bwd took 2784 minor faults per backward (11 MiB zeroed by
// the kernel), against 0 with one buffer reused. Held between calls (like
// CUDA's caching allocator), at most PYFASTATTN_CPU_FFN_SCRATCH_MB per thread
// (default 1024, 0 disables and frees it; read on every call); larger requests
// allocate as before. CPU only.
class Scratch {
 public:
  // Up to `count` buffers of [rows, cols], each from take(); from the scratch
  // when count * rows * cols fits under the cap, fresh tensors otherwise.
  Scratch(int count, int64_t rows, int64_t cols, const at::TensorOptions& opts)
      : rows_(rows), cols_(cols), opts_(opts) {
    const int64_t numel = int64_t(count) * rows * cols;
    const int64_t bytes = numel * int64_t(opts.dtype().itemsize());
    if (!opts.device().is_cpu()) return;
    const int64_t cap = cap_bytes();
    at::Tensor& held = held_buffer();
    if (held.defined() && int64_t(held.nbytes()) > cap) held = at::Tensor();  // cap lowered
    if (numel > 0 && bytes <= cap) {
      if (!held.defined() || held.nbytes() < size_t(bytes)) {
        held = at::Tensor();  // free before allocating the larger one
        held = at::empty({bytes}, opts.dtype(at::kByte));
      }
      base_ = held.narrow(0, 0, bytes).view(opts.dtype().toScalarType());
    }
  }
  at::Tensor take() {
    if (!base_.defined()) return at::empty({rows_, cols_}, opts_);
    TORCH_INTERNAL_ASSERT(next_ + rows_ * cols_ <= base_.numel(), "ffn scratch overrun");
    at::Tensor t = base_.narrow(0, next_, rows_ * cols_).view({rows_, cols_});
    next_ += rows_ * cols_;
    return t;
  }

 private:
  // Read on every call (a getenv, ~0.1 us), so a benchmark can switch the
  // scratch off to measure a call's true working set.
  static int64_t cap_bytes() {
    const char* env = std::getenv("PYFASTATTN_CPU_FFN_SCRATCH_MB");
    if (env == nullptr || *env == '\0') return int64_t(1024) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && mb >= 0 && mb <= (int64_t(1) << 40),
                      "PYFASTATTN_CPU_FFN_SCRATCH_MB must be a whole number of MiB >= 0 (0 frees the scratch), got '",
                      env, "'");
    return int64_t(mb) << 20;
  }
  static at::Tensor& held_buffer() {
    thread_local at::Tensor held;
    return held;
  }
  int64_t rows_, cols_, next_ = 0;
  at::TensorOptions opts_;
  at::Tensor base_;
};

// The FFN's GEMMs. fp32 and fp16 CPU tensors take cpu::matmul_fp32 (fp32
// arithmetic on the attention's AVX-512 micro-kernels) where
// cpu::matmul_fp32_preferred(): fp32 on AMD, where MKL's sgemm runs its AVX2
// code at ~40 % of the FMA peak, and fp16 on every AVX-512 CPU, where ATen's
// CPU product runs at a tenth of it (PERF_NOTES "The fp32 FFN's GEMMs on
// AMD"). Everything else is ATen's.
//
// Few rows of A: the own GEMM packs all of B once per call, which ATen's
// matrix-vector paths do not (one Zen 5 core, B 4096 x 4096: fp32 at 1 row
// 7.5 ms against 2.5, parity at 16, 0.78x at 32; fp16 with B = W^T 5.2
// against 1.2 ms at 1 row, parity at 4, 0.36x at 16; fp16 with B row-major
// (dX = dY W) 6.2 against 97 ms at 1 row). So fp32 takes it from 32 rows,
// fp16 from 8, or at any count where B is row-major.
bool own_gemm(const at::Tensor& a, const at::Tensor& b) {
  const auto st = a.scalar_type();
  if (!a.device().is_cpu() || (st != at::kFloat && st != at::kHalf) || !cpu::matmul_fp32_preferred(to_dtype(st)))
    return false;
  const int64_t rows = a.size(0);
  if (st == at::kHalf) return rows >= 8 || b.stride(1) == 1;
  return rows >= 32;
}

// A 2-D operand as (pointer, row stride, column stride) with a unit stride
// along one axis; `keep` holds a contiguous copy where it has none.
const void* operand(const at::Tensor& t, at::Tensor& keep, int64_t& rs, int64_t& cs) {
  const int64_t r = t.size(0), c = t.size(1);
  if (t.stride(1) == 1 || c == 1) {
    rs = r == 1 ? std::max<int64_t>(c, 1) : t.stride(0);
    cs = 1;
    return t.data_ptr();
  }
  if (t.stride(0) == 1 || r == 1) {
    rs = 1;
    cs = t.stride(1);
    return t.data_ptr();
  }
  keep = t.contiguous();
  rs = c;
  cs = 1;
  return keep.data_ptr();
}

// out (=|+=) a b, out [a.size(0), b.size(1)] with unit column stride;
// without accumulate, + bias (a [b.size(1)] tensor of out's dtype) if given.
void own_gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                   const at::Tensor* bias = nullptr) {
  TORCH_CHECK(out.dim() == 2 && (out.stride(1) == 1 || out.size(1) <= 1) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(1) && a.size(1) == b.size(0),
              "ffn: GEMM operands of mismatched shapes");
  at::Tensor ka, kb;
  cpu::MatmulF32Params p;
  p.m = a.size(0);
  p.n = b.size(1);
  p.k = a.size(1);
  p.dtype = to_dtype(a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type() && out.scalar_type() == a.scalar_type(),
              "ffn: GEMM operands of mixed dtypes");
  p.a = operand(a, ka, p.a_rs, p.a_cs);
  p.b = operand(b, kb, p.b_rs, p.b_cs);
  p.c = out.data_ptr();
  p.ldc = out.size(0) == 1 ? std::max<int64_t>(p.n, 1) : out.stride(0);
  p.accumulate = accumulate;
  at::Tensor kbias;
  if (bias && !accumulate) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.n && bias->scalar_type() == a.scalar_type(),
                "ffn: GEMM bias of the wrong shape or dtype");
    kbias = bias->contiguous();
    p.bias = kbias.data_ptr();
  }
  cpu::matmul_fp32(p);
}

// out = a b, into a given buffer.
void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (own_gemm(a, b) && out.stride(1) == 1) {
    own_gemm_into(out, a, b, false);
  } else {
    at::mm_out(out, a, b);
  }
}

// a b, a new tensor.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  if (!own_gemm(a, b)) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  own_gemm_into(out, a, b, false);
  return out;
}

// c += a b.
void gemm_acc(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (own_gemm(a, b) && c.stride(1) == 1) {
    own_gemm_into(c, a, b, true);
  } else {
    c.addmm_(a, b);
  }
}

// out = bias + a b (bias [b.size(1)], broadcast over rows), into a given
// buffer; fp16: the sum in fp32 from the bias, rounded once, as addmm.
void gemm_bias_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (own_gemm(a, b) && out.stride(1) == 1) {
    own_gemm_into(out, a, b, false, &bias);
  } else {
    at::addmm_out(out, bias, a, b);
  }
}

// bias + a b (bias [b.size(1)], broadcast over rows), a new tensor.
at::Tensor gemm_bias(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (!own_gemm(a, b)) return at::addmm(bias, a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  own_gemm_into(out, a, b, false, &bias);
  return out;
}

// Where the first layer's biases are added. fp32: in the fused step, so
// the GEMMs are plain products. bf16/fp16: inside the GEMM (at::addmm, which
// accumulates bias + product in fp32 and rounds once), because adding the
// bias after the product was rounded to 8/11 bits loses the sign of
// pre-activations near zero: with relu (bf16, 1000 tokens, d_ff 72) that gave
// dx errors of 0.22 against a tolerance of 0.036 (torch's own error 0.010).
// The cost is addmm's broadcast copy of the bias into the output.
bool bias_in_gemm(const at::Tensor& x) { return x.scalar_type() != at::kFloat; }

// gate = x W1^T [+ b1], up = x W3^T [+ b3], written into the given
// [tokens, d_ff] buffers; the bias only where bias_in_gemm.
void first_gemms(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                 const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3,
                 at::Tensor& gate, at::Tensor& up) {
  const bool fold = bias_in_gemm(x);
  if (fold && b1) {
    gemm_bias_out(gate, *b1, x, w1.t());
  } else {
    gemm_out(gate, x, w1.t());
  }
  if (!w3) return;
  if (fold && b3) {
    gemm_bias_out(up, *b3, x, w3->t());
  } else {
    gemm_out(up, x, w3->t());
  }
}

// The bias pointers of the fused step: null where the GEMM added the bias.
const void* step_bias(const at::Tensor& x, const std::optional<at::Tensor>& b) {
  return b && !bias_in_gemm(x) ? b->data_ptr() : nullptr;
}

}  // namespace

FfnActFwdParams fwd_step_params(const FfnShape& s, Activation act, const at::Tensor& x,
                                const at::Tensor& gate, const at::Tensor& up,
                                const std::optional<at::Tensor>& b1,
                                const std::optional<at::Tensor>& b3, at::Tensor& out) {
  FfnActFwdParams p{};
  p.gate = gate.data_ptr();
  p.up = s.gated ? up.data_ptr() : nullptr;
  p.bias_gate = step_bias(x, b1);
  p.bias_up = step_bias(x, b3);
  p.out = out.data_ptr();
  p.gate_row_stride = gate.stride(0);
  p.up_row_stride = s.gated ? up.stride(0) : 0;
  p.out_row_stride = out.stride(0);
  p.rows = s.tokens;
  p.cols = s.d_ff;
  p.act = act;
  p.gated = s.gated;
  p.dtype = to_dtype(x.scalar_type());
  return p;
}

namespace {

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ffn_fwd_impl(
    ActFwdStep step, const at::Tensor& x, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1_, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& w3,
    const std::optional<at::Tensor>& b3_, c10::string_view activation, bool save_for_backward) {
  const FfnShape s = check_inputs(x, w1, b1_, w2, b2, w3, b3_);
  const Activation act = parse_activation(activation);
  const auto b1 = contiguous(b1_);
  const auto b3 = contiguous(b3_);
  const at::TensorOptions opts = x.options();

  at::Tensor act_in, gate, up, h;
  if (save_for_backward) {
    act_in = at::empty({s.n_in(), s.tokens, s.d_ff}, opts);
    gate = act_in.select(0, 0);
    if (s.gated) up = act_in.select(0, 1);
    h = Scratch(1, s.tokens, s.d_ff, opts).take();
  } else {
    // h overwrites the gate in place.
    Scratch scratch(s.gated ? 2 : 1, s.tokens, s.d_ff, opts);
    gate = scratch.take();
    if (s.gated) up = scratch.take();
    h = gate;
  }
  first_gemms(x, w1, b1, w3, b3, gate, up);
  step(fwd_step_params(s, act, x, gate, up, b1, b3, h));
  gate = up = at::Tensor();
  at::Tensor out = b2 ? gemm_bias(*b2, h, w2.t()) : gemm(h, w2.t());
  return {out, save_for_backward ? act_in : at::empty({0}, opts)};
}

// output_mask: which of (dx, dw1, db1, dw2, db2, dw3, db3) to compute; the
// others come back as empty [0] tensors.
//
// Buffers, [tokens, d_ff] each; "over X" = written in place, same index:
//                 dgate        dup        h (for dW2)
//   saved, plain  over dH      -          new
//   saved, gated  new          new        over dH
//   recomputed    over dH (plain) / over gate (gated)
//                              over up    over gate (plain) / over dH (gated)
// and each is freed as soon as its last GEMM has run, so that the peak holds
// at most three of them besides what was saved.
GradTuple ffn_bwd_impl(ActFwdStep fwd_step, ActBwdStep bwd_step, const at::Tensor& dout,
                       const at::Tensor& x, const at::Tensor& w1,
                       const std::optional<at::Tensor>& b1_, const at::Tensor& w2,
                       const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3_,
                       const at::Tensor& act_in, c10::string_view activation, bool recompute,
                       std::array<bool, kNumGrads> mask) {
  const FfnShape s = check_inputs(x, w1, b1_, w2, std::nullopt, w3, b3_);
  const Activation act = parse_activation(activation);
  const DType dt = to_dtype(x.scalar_type());
  check_like(dout, x, "dout", {s.tokens, s.d_out});
  if (!recompute) {
    check_like(act_in, x, "act_in", {s.n_in(), s.tokens, s.d_ff});
    TORCH_CHECK(act_in.is_contiguous(), "ffn: act_in must be contiguous");
  }
  mask[kDb1] = mask[kDb1] && b1_.has_value();
  mask[kDw3] = mask[kDw3] && s.gated;
  mask[kDb3] = mask[kDb3] && b3_.has_value();
  const auto b1 = contiguous(b1_);
  const auto b3 = contiguous(b3_);
  const at::Tensor dy = dout.contiguous();  // dout of y.sum() is an expanded view
  const at::TensorOptions opts = x.options();
  // At most three [tokens, d_ff] temporaries are live at once (table above).
  Scratch scratch(3, s.tokens, s.d_ff, opts);
  const auto new_buffer = [&] { return scratch.take(); };

  const bool want_pre_grads = mask[kDx] || mask[kDw1] || mask[kDb1] || mask[kDw3] || mask[kDb3];
  const bool want_h = mask[kDw2];

  // The pre-activations: saved, or recomputed from x (the only extra work of
  // recompute: one GEMM plain, two gated).
  at::Tensor gate, up;
  if (!recompute) {
    gate = act_in.select(0, 0);
    if (s.gated) up = act_in.select(0, 1);
  } else if (want_pre_grads || want_h) {
    gate = new_buffer();
    if (s.gated) up = new_buffer();
    first_gemms(x, w1, b1, w3, b3, gate, up);
  }
  at::Tensor dgate, dup, h, db1_f32, db3_f32;
  if (want_pre_grads) {
    // dH = dY W2, then one pass: dgate [, dup], the bias sums, and h.
    at::Tensor dh = new_buffer();
    gemm_out(dh, dy, w2);
    if (s.gated) {
      dgate = recompute ? gate : new_buffer();
      dup = recompute ? up : new_buffer();
      if (want_h) h = dh;
    } else {
      dgate = dh;
      if (want_h) h = recompute ? gate : new_buffer();
    }
    if (mask[kDb1]) db1_f32 = at::empty({s.d_ff}, opts.dtype(at::kFloat));
    if (mask[kDb3]) db3_f32 = at::empty({s.d_ff}, opts.dtype(at::kFloat));

    FfnActBwdParams p{};
    p.gate = gate.data_ptr();
    p.up = s.gated ? up.data_ptr() : nullptr;
    p.bias_gate = step_bias(x, b1);
    p.bias_up = step_bias(x, b3);
    p.dout = dh.data_ptr();
    p.gate_row_stride = gate.stride(0);
    p.up_row_stride = s.gated ? up.stride(0) : 0;
    p.dout_row_stride = dh.stride(0);
    p.dgate = dgate.data_ptr();
    p.dup = s.gated ? dup.data_ptr() : nullptr;
    p.out = h.defined() ? h.data_ptr() : nullptr;
    p.dbias_gate = db1_f32.defined() ? db1_f32.data_ptr<float>() : nullptr;
    p.dbias_up = db3_f32.defined() ? db3_f32.data_ptr<float>() : nullptr;
    p.dgate_row_stride = dgate.stride(0);
    p.dup_row_stride = s.gated ? dup.stride(0) : 0;
    p.out_row_stride = h.defined() ? h.stride(0) : 0;
    p.rows = s.tokens;
    p.cols = s.d_ff;
    p.act = act;
    p.gated = s.gated;
    p.dtype = dt;
    bwd_step(p);
  } else if (want_h) {
    h = recompute ? gate : new_buffer();  // only dW2 wanted: the forward step
    fwd_step(fwd_step_params(s, act, x, gate, up, b1, b3, h));
  }
  // Drop the handles whose buffers are dead or owned by dgate/dup/h.
  gate = up = at::Tensor();

  // Gradients not asked for are empty [0] tensors, each its own (outputs of
  // an op may not alias).
  GradTuple g{at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts),
              at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts),
              at::empty({0}, opts)};
  if (mask[kDw2]) std::get<kDw2>(g) = gemm(dy.t(), h);
  h = at::Tensor();
  if (mask[kDb2]) std::get<kDb2>(g) = at::sum(dy, {0});
  at::Tensor dx;
  if (mask[kDw1]) std::get<kDw1>(g) = gemm(dgate.t(), x);
  if (mask[kDx]) dx = gemm(dgate, w1);
  dgate = at::Tensor();
  if (mask[kDw3]) std::get<kDw3>(g) = gemm(dup.t(), x);
  if (mask[kDx] && s.gated) gemm_acc(dx, dup, *w3);
  dup = at::Tensor();
  if (mask[kDx]) std::get<kDx>(g) = dx;
  if (mask[kDb1]) std::get<kDb1>(g) = db1_f32.to(x.scalar_type());
  if (mask[kDb3]) std::get<kDb3>(g) = db3_f32.to(x.scalar_type());
  return g;
}

namespace {

// ---- CPU registrations ------------------------------------------------------

// The forward at decode sizes: the fused small-token kernel
// (csrc/cpu/ffn_small_tokens.cpp), one pass over the weights.
std::tuple<at::Tensor, at::Tensor> ffn_fwd_small_tokens_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3, Activation act,
    bool save_for_backward) {
  const FfnShape s = check_inputs(x, w1, b1, w2, b2, w3, b3);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const auto w3c = contiguous(w3), b1c = contiguous(b1), b2c = contiguous(b2), b3c = contiguous(b3);
  at::Tensor out = at::empty({s.tokens, s.d_out}, x.options());
  // What ffn_bwd reads: the first GEMMs' results, biases in them where
  // bias_in_gemm (here rounded once from the fp32 sum, as addmm does).
  at::Tensor act_in = save_for_backward ? at::empty({s.n_in(), s.tokens, s.d_ff}, x.options())
                                        : at::empty({0}, x.options());
  cpu::FfnSmallTokensParams p{};
  p.act_in = save_for_backward ? act_in.data_ptr() : nullptr;
  p.act_in_bias = bias_in_gemm(x);
  p.x = xc.data_ptr();
  p.w1 = w1c.data_ptr();
  p.w3 = w3c ? w3c->data_ptr() : nullptr;
  p.w2 = w2c.data_ptr();
  p.b1 = b1c ? b1c->data_ptr() : nullptr;
  p.b3 = b3c ? b3c->data_ptr() : nullptr;
  p.b2 = b2c ? b2c->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.x_row_stride = xc.stride(0);
  p.tokens = s.tokens;
  p.d_model = s.d_model;
  p.d_ff = s.d_ff;
  p.d_out = s.d_out;
  p.act = act;
  p.gated = s.gated;
  p.dtype = to_dtype(x.scalar_type());
  cpu::ffn_fwd_small_tokens(p);
  return {out, act_in};
}

std::tuple<at::Tensor, at::Tensor> ffn_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3,
    c10::string_view activation, bool save_for_backward) {
  // Decode sizes: up to ffn_small_tokens_limit() tokens (the measured
  // crossover: bf16 16, fp32/fp16 32; PERF_NOTES.md "CPU feed-forward at
  // decode sizes") the forward is the fused small-token kernel, which also
  // writes act_in when the backward needs it (training at small T: fwd+bwd
  // 1.02-1.29x the ATen path). The backward keeps the composed GEMMs.
  if (x.dim() == 2 && x.size(0) > 0 && kernel_dtype(x.scalar_type()) &&
      x.size(0) <= cpu::ffn_small_tokens_limit(to_dtype(x.scalar_type()))) {
    return ffn_fwd_small_tokens_cpu(x, w1, b1, w2, b2, w3, b3, parse_activation(activation),
                                    save_for_backward);
  }
  return ffn_fwd_impl(&cpu::ffn_act_fwd, x, w1, b1, w2, b2, w3, b3, activation,
                      save_for_backward);
}

GradTuple ffn_bwd_cpu(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1,
                      const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3,
                      const at::Tensor& act_in, c10::string_view activation, bool recompute,
                      std::array<bool, kNumGrads> output_mask) {
  return ffn_bwd_impl(&cpu::ffn_act_fwd, &cpu::ffn_act_bwd, dout, x, w1, b1, w2, w3, b3, act_in,
                      activation, recompute, output_mask);
}

}  // namespace

// torch.ops.pyfastattn.cpu_matmul_fp32: a @ b (+ bias, broadcast over rows),
// + c where c is given and accumulate (else the product is written over a
// copy of c: NaN-poisoned outputs in the tests), on the FFN's own fp32 CPU GEMM whatever
// PYFASTATTN_CPU_FFN_GEMM / PYFASTATTN_FFN_ISA say; for its tests and
// benchmarks (tests/test_matmul_fp32.py).
at::Tensor cpu_matmul_fp32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
                           bool accumulate, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(cpu::matmul_fp32_supported(), "cpu_matmul_fp32: needs an AVX-512 CPU");
  for (const at::Tensor* t : {&a, &b}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf) &&
                          t->dim() == 2,
                      "cpu_matmul_fp32: a and b must be 2-D float32 or float16 CPU tensors, got ", t->sizes(), " ",
                      t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), "cpu_matmul_fp32: a and b must have one dtype, got ",
                    a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), "cpu_matmul_fp32: a.size(1) must equal b.size(0), got ", a.sizes(),
                    " and ", b.sizes());
  at::Tensor out;
  if (c) {
    TORCH_CHECK_VALUE(c->device().is_cpu() && c->scalar_type() == a.scalar_type() &&
                          c->sizes() == at::IntArrayRef({a.size(0), b.size(1)}),
                      "cpu_matmul_fp32: c must be a ", a.scalar_type(), " CPU tensor of shape [", a.size(0), ", ",
                      b.size(1), "], got ", c->sizes(), " ", c->scalar_type());
    out = c->is_contiguous() ? c->clone() : c->contiguous();  // a copy either way
  } else {
    out = at::empty({a.size(0), b.size(1)}, a.options());
  }
  const bool acc = c.has_value() && accumulate;
  if (bias) {
    TORCH_CHECK_VALUE(!acc, "cpu_matmul_fp32: bias is for a product that is not accumulated into c");
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == a.scalar_type() && bias->dim() == 1 &&
                          bias->size(0) == b.size(1),
                      "cpu_matmul_fp32: bias must be a ", a.scalar_type(), " CPU tensor of shape [", b.size(1),
                      "], got ", bias->sizes(), " ", bias->scalar_type());
  }
  own_gemm_into(out, a, b, acc, bias ? &*bias : nullptr);
  return out;
}

// Fragments: the library itself is defined (TORCH_LIBRARY) in csrc/ops.cpp.
TORCH_LIBRARY_FRAGMENT(pyfastattn, m) {
  // y = W2 act(W1 x + b1) + b2, or with w3: y = W2 (act(W1 x + b1) * (W3 x + b3)) + b2.
  // x [tokens, d_model]; w1, w3 [d_ff, d_model]; w2 [d_out, d_ff]. Returns
  // (y [tokens, d_out], act_in [n, tokens, d_ff]); act_in is empty [0] unless
  // save_for_backward.
  m.def(
      "ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? w3, Tensor? b3, "
      "str activation, bool save_for_backward) -> (Tensor, Tensor)");
  // Gradients (dx, dw1, db1, dw2, db2, dw3, db3) for the entries of
  // output_mask that are true (and exist); empty [0] tensors otherwise.
  // recompute: act_in was not saved (pass an empty tensor).
  m.def(
      "ffn_bwd(Tensor dout, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? w3, Tensor? b3, "
      "Tensor act_in, str activation, bool recompute, bool[7] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The instruction set the CPU FFN kernels use here: avx512, avx2 or portable.
  m.def("ffn_cpu_isa() -> str", [] { return std::string(cpu::ffn_cpu_isa()); });
  // The instruction set of the CPU small-token forward: avx512_bf16, avx512,
  // avx2 or portable; and the most tokens the CPU ffn_fwd routes to it.
  m.def("ffn_small_tokens_isa() -> str",
        [] { return std::string(cpu::ffn_small_tokens_isa()); });
  // a @ b (+ c) on the FFN's own CPU GEMM (cpu/matmul_fp32.h: fp32 or fp16
  // data, fp32 arithmetic), for tests and benchmarks; and whether the FFN's
  // GEMMs of a dtype take it here ("own") or ATen's ("aten").
  m.def("cpu_matmul_fp32(Tensor a, Tensor b, Tensor? c=None, bool accumulate=True, Tensor? bias=None) -> Tensor", &cpu_matmul_fp32);
  m.def("ffn_cpu_gemm(ScalarType dtype) -> str", [](c10::ScalarType dt) {
    TORCH_CHECK_VALUE(kernel_dtype(dt), "ffn_cpu_gemm: dtype must be ", kKernelDTypes, ", got ", dt);
    return std::string(cpu::matmul_fp32_preferred(to_dtype(dt)) ? "own" : "aten");
  });
  m.def("ffn_small_tokens_limit(ScalarType dtype) -> int", [](c10::ScalarType dt) {
    TORCH_CHECK(kernel_dtype(dt), "ffn_small_tokens_limit: dtype must be ", kKernelDTypes, ", got ", dt);
    return cpu::ffn_small_tokens_limit(to_dtype(dt));
  });
}

TORCH_LIBRARY_IMPL(pyfastattn, CPU, m) {
  m.impl("ffn_fwd", &ffn_fwd_cpu);
  m.impl("ffn_bwd", &ffn_bwd_cpu);
}

}  // namespace pyfastattn
