// CUDA implementation of pyfastattn::ffn_fwd / ffn_bwd (schemas in
// csrc/ffn/ffn_ops.cpp). Two paths per op, chosen per shape class:
//
//   "fused"  our tensor-core GEMMs with the elementwise step in their
//            epilogues (csrc/cuda/ffn/ffn_gemm.h): forward = 2 kernels (first
//            GEMM(s) + activation [+ gate], second GEMM + bias); backward =
//            the dH GEMM with the activation derivative, dgate/dup, h and the
//            bias-gradient partials in its epilogue (+ the first GEMM again
//            with recompute), then the weight-gradient and dx GEMMs on cuBLAS
//            (at::mm).
//   "cublas" ffn_fwd_impl / ffn_bwd_impl of csrc/ffn/ffn_ops.cpp: cuBLAS
//            GEMMs (at::mm / at::addmm) and one fused elementwise pass per
//            direction (csrc/cuda/ffn/ffn_elementwise.h). Also the path for
//            fp32, and for shapes or layouts the fused GEMMs reject
//            (ffn_gemm_unsupported_reason: dims not multiples of 8, ...).
//
// Which path: pyfastattn/_ffn_cuda.py loads the dispatch table measured by
// benchmarks/ffn_bench.py --device cuda --write-dispatch (per device name and
// shape class) into ffn_cuda_set_dispatch below; a device with no record gets
// the default, "fused" (unmeasured). ffn_cuda_force_path overrides both (the
// benchmark and tests use it).
//
// Both paths save the same act_in (pre-activations with the biases added for
// fp16/bf16), so a forward on one path and a backward on the other agree.
// c10/cuda headers only (see attention_cuda_api.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../ffn/ffn_ops.h"
#include "../torch_dtype.h"
#include "ffn/ffn_elementwise.h"
#include "ffn/ffn_gemm.h"
#include "launch_check.h"

namespace pyfastattn {
namespace {

using cuda::ffn::FfnGemmParams;
using cuda::ffn::GemmEpilogue;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---- the elementwise steps, for ffn_fwd_impl / ffn_bwd_impl -----------------

void act_fwd_step_cuda(const FfnActFwdParams& p) {
  check_launch(cuda::ffn::ffn_act_fwd_cuda(p, current_stream()), "ffn act_fwd_kernel (rows ",
               p.rows, ", cols ", p.cols, ")");
}

void act_bwd_step_cuda(const FfnActBwdParams& p) {
  at::Tensor workspace;
  const int64_t floats = cuda::ffn::ffn_act_bwd_workspace_floats(p);
  if (floats > 0) {
    workspace = at::empty({floats}, at::TensorOptions()
                                        .dtype(at::kFloat)
                                        .device(at::kCUDA, c10::cuda::current_device()));
  }
  check_launch(cuda::ffn::ffn_act_bwd_cuda(
                   p, workspace.defined() ? workspace.data_ptr<float>() : nullptr, current_stream()),
               "ffn act_bwd_kernel / column_sums_kernel (rows ", p.rows, ", cols ", p.cols, ")");
}

// ---- dispatch table -----------------------------------------------------------

enum Path : int64_t { kAuto = 0, kFused = 1, kCublas = 2 };
std::atomic<int64_t> g_forced{kAuto};

// One rule: for shapes with gated == `gated`, tokens <= max_tokens and
// d_model <= max_d_model (-1: no bound), use fwd_path / bwd_path. The first
// matching rule of the device wins.
struct Rule {
  int64_t gated, max_tokens, max_d_model, fwd_path, bwd_path;
};
std::mutex g_table_mutex;
std::map<std::string, std::vector<Rule>> g_table;

void set_dispatch(c10::string_view device_name, at::IntArrayRef flat) {
  TORCH_CHECK(flat.size() % 5 == 0,
              "ffn_cuda_set_dispatch: rules must be groups of 5 (gated, max_tokens, "
              "max_d_model, fwd_path, bwd_path), got ",
              flat.size(), " numbers");
  std::vector<Rule> rules;
  for (size_t i = 0; i < flat.size(); i += 5) {
    const Rule r{flat[i], flat[i + 1], flat[i + 2], flat[i + 3], flat[i + 4]};
    TORCH_CHECK(r.fwd_path >= kFused && r.fwd_path <= kCublas && r.bwd_path >= kFused &&
                    r.bwd_path <= kCublas,
                "ffn_cuda_set_dispatch: paths must be 1 (fused) or 2 (cublas)");
    rules.push_back(r);
  }
  const std::lock_guard<std::mutex> lock(g_table_mutex);
  g_table[std::string(device_name)] = std::move(rules);
}

void force_path(c10::string_view path) {
  if (path == "auto") {
    g_forced = kAuto;
  } else if (path == "fused") {
    g_forced = kFused;
  } else if (path == "cublas") {
    g_forced = kCublas;
  } else {
    TORCH_CHECK(false, "ffn_cuda_force_path: path must be 'auto', 'fused' or 'cublas', got '",
                std::string(path), "'");
  }
}

std::string device_name(int device) {
  static std::mutex mutex;
  static std::map<int, std::string> names;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = names.find(device);
  if (it != names.end()) return it->second;
  cudaDeviceProp prop;
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return names[device] = prop.name;
}

// The path the table (or the override, or the default) gives this shape.
Path choose(const FfnShape& s, bool backward, int device) {
  const int64_t forced = g_forced.load();
  if (forced != kAuto) return static_cast<Path>(forced);
  const std::string name = device_name(device);
  const std::lock_guard<std::mutex> lock(g_table_mutex);
  const auto it = g_table.find(name);
  if (it == g_table.end()) return kFused;  // no record for this device: default (unmeasured)
  for (const Rule& r : it->second) {
    if (r.gated != (s.gated ? 1 : 0)) continue;
    if (r.max_tokens >= 0 && s.tokens > r.max_tokens) continue;
    if (r.max_d_model >= 0 && s.d_model > r.max_d_model) continue;
    return static_cast<Path>(backward ? r.bwd_path : r.fwd_path);
  }
  return kFused;
}

// ---- the fused path -----------------------------------------------------------

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr() : nullptr;
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Row stride of a 2-D [rows, cols] operand as the fused GEMMs use it. PyTorch
// leaves the stride of a size-1 dim arbitrary (a [1, d] tensor can be
// is_contiguous() with stride(0) = 1001, or with a storage offset that breaks
// 16-byte alignment), and with one row the kernels never step to a second
// row, so any multiple of 8 serves there.
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// What the GEMMs' 16-byte cp.async / vector accesses need of a 2-D operand
// (ffn_gemm_unsupported_reason re-checks it): a 16-byte aligned base (the
// data_ptr, storage offset included), unit column stride, a row stride that
// is a multiple of 8 elements.
bool gemm_operand_ok(const at::Tensor& t) {
  return t.dim() == 2 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(1) <= 1 || t.stride(1) == 1) && row_stride(t) % 8 == 0;
}

// `t` itself when gemm_operand_ok, else a fresh contiguous copy (the caching
// allocator's blocks are 512-byte aligned).
at::Tensor gemm_operand(const at::Tensor& t) {
  if (gemm_operand_ok(t)) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

// The first GEMM(s): h = act(x W1^T + b1) [* (x W3^T + b3)], optionally
// saving the pre-activations (biases included) into pre_gate / pre_up.
FfnGemmParams first_gemm_params(const FfnShape& s, Activation act, const at::Tensor& x,
                                const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                const std::optional<at::Tensor>& w3,
                                const std::optional<at::Tensor>& b3, const at::Tensor& h,
                                const at::Tensor& pre_gate, const at::Tensor& pre_up) {
  FfnGemmParams p{};
  p.epilogue = GemmEpilogue::kFwdAct;
  p.a = x.data_ptr();
  p.a_row_stride = row_stride(x);
  p.b = w1.data_ptr();
  p.b_up = w3 ? w3->data_ptr() : nullptr;
  p.b_row_stride = w1.stride(0);
  p.m = s.tokens;
  p.n = s.d_ff;
  p.k = s.d_model;
  p.bias = ptr_or_null(b1);
  p.bias_up = ptr_or_null(b3);
  p.out = h.data_ptr();
  p.out_row_stride = h.stride(0);
  if (pre_gate.defined()) {
    p.pre_gate = pre_gate.data_ptr();
    p.pre_gate_row_stride = pre_gate.stride(0);
  }
  if (pre_up.defined()) {
    p.pre_up = pre_up.data_ptr();
    p.pre_up_row_stride = pre_up.stride(0);
  }
  p.act = act;
  p.gated = s.gated;
  p.dtype = to_dtype(x.scalar_type());
  return p;
}

// What the fused path needs beyond ffn_gemm_unsupported_reason: fp16/bf16,
// contiguous weights (W3 sharing W1's stride), every dim a multiple of 8, and
// x readable by the GEMMs (gemm_operand_ok; any other x takes the cuBLAS path,
// which takes any layout).
bool fused_possible(const FfnShape& s, const at::Tensor& x, const at::Tensor& w1,
                    const at::Tensor& w2, const std::optional<at::Tensor>& w3) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  if (!w1.is_contiguous() || !w2.is_contiguous() || (w3 && !w3->is_contiguous())) return false;
  if (s.d_model % 8 || s.d_ff % 8 || s.d_out % 8 || s.d_ff == 0 || s.d_model == 0 || s.d_out == 0)
    return false;
  if (!gemm_operand_ok(x)) return false;
  // 16-byte weight bases (the weights are contiguous, so their rows follow).
  for (const at::Tensor* t : {&w1, &w2})
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return false;
  if (w3 && reinterpret_cast<uintptr_t>(w3->data_ptr()) % 16) return false;
  return (s.d_ff + 63) / 64 <= 65535 && (s.d_out + 63) / 64 <= 65535;
}

void run_gemm(const FfnGemmParams& p) {
  const char* reason = cuda::ffn::ffn_gemm_unsupported_reason(p);
  TORCH_CHECK(reason == nullptr, "pyfastattn CUDA FFN GEMM: ", reason);
  static const char* const kEpilogue[] = {"kFwdAct", "kBiasResidual", "kBwdAct"};
  check_launch(cuda::ffn::ffn_gemm(p, current_stream()), "ffn_gemm_kernel (epilogue ",
               kEpilogue[static_cast<int>(p.epilogue)], p.gated ? ", gated" : "", ", m ", p.m,
               ", n ", p.n, ", k ", p.k, ")");
}

bool biases_aligned(std::initializer_list<const std::optional<at::Tensor>*> bs) {
  for (const auto* b : bs)
    if (*b && reinterpret_cast<uintptr_t>((*b)->data_ptr()) % 16) return false;
  return true;
}

std::tuple<at::Tensor, at::Tensor> ffn_fwd_fused(const FfnShape& s, Activation act,
                                                 const at::Tensor& x, const at::Tensor& w1,
                                                 const std::optional<at::Tensor>& b1,
                                                 const at::Tensor& w2,
                                                 const std::optional<at::Tensor>& b2,
                                                 const std::optional<at::Tensor>& w3,
                                                 const std::optional<at::Tensor>& b3,
                                                 bool save_for_backward) {
  const at::TensorOptions opts = x.options();
  at::Tensor act_in, pre_gate, pre_up;
  if (save_for_backward) {
    act_in = at::empty({s.n_in(), s.tokens, s.d_ff}, opts);
    pre_gate = act_in.select(0, 0);
    if (s.gated) pre_up = act_in.select(0, 1);
  }
  at::Tensor h = at::empty({s.tokens, s.d_ff}, opts);
  at::Tensor y = at::empty({s.tokens, s.d_out}, opts);
  if (s.tokens > 0) {
    run_gemm(first_gemm_params(s, act, x, w1, b1, w3, b3, h, pre_gate, pre_up));
    FfnGemmParams p{};
    p.epilogue = GemmEpilogue::kBiasResidual;
    p.a = h.data_ptr();
    p.a_row_stride = h.stride(0);
    p.b = w2.data_ptr();
    p.b_row_stride = w2.stride(0);
    p.m = s.tokens;
    p.n = s.d_out;
    p.k = s.d_ff;
    p.bias = ptr_or_null(b2);
    p.out = y.data_ptr();
    p.out_row_stride = y.stride(0);
    p.act = act;
    p.dtype = to_dtype(x.scalar_type());
    run_gemm(p);
  }
  return {y, save_for_backward ? act_in : at::empty({0}, opts)};
}

GradTuple ffn_bwd_fused(const FfnShape& s, Activation act, const at::Tensor& dout,
                        const at::Tensor& x, const at::Tensor& w1,
                        const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3,
                        const at::Tensor& act_in, bool recompute,
                        std::array<bool, kNumGrads> mask) {
  mask[kDb1] = mask[kDb1] && b1.has_value();
  mask[kDw3] = mask[kDw3] && s.gated;
  mask[kDb3] = mask[kDb3] && b3.has_value();
  const at::TensorOptions opts = x.options();
  // dY is the GEMM's A operand: an unaligned or oddly strided dout (a view
  // with a storage offset, a [1, d] row of a wider tensor) is copied, never
  // handed to a 16-byte cp.async.
  const at::Tensor dy = gemm_operand(dout);
  const auto new_buffer = [&] { return at::empty({s.tokens, s.d_ff}, opts); };
  const bool want_pre_grads = mask[kDx] || mask[kDw1] || mask[kDb1] || mask[kDw3] || mask[kDb3];
  const bool want_h = mask[kDw2];

  at::Tensor gate, up, h, dgate, dup, db1_part, db3_part;
  if (recompute && (want_pre_grads || want_h)) {
    // The first GEMM(s) again: pre-activations (biases included) and h.
    gate = new_buffer();
    if (s.gated) up = new_buffer();
    h = new_buffer();
    run_gemm(first_gemm_params(s, act, x, w1, b1, w3, b3, h, gate, up));
  } else if (!recompute) {
    gate = act_in.select(0, 0);
    if (s.gated) up = act_in.select(0, 1);
  }
  if (want_pre_grads) {
    // dH = dY W2 and its epilogue: dgate [, dup], h (unless recomputed
    // above), the bias partials. With recompute the pre-activation buffers
    // are ours and dgate/dup overwrite them (same index, read first).
    dgate = recompute ? gate : new_buffer();
    if (s.gated) dup = recompute ? up : new_buffer();
    if (want_h && !h.defined()) h = new_buffer();
    const int64_t prow = cuda::ffn::gemm_bias_partial_rows(s.tokens);
    const at::TensorOptions f32 = opts.dtype(at::kFloat);
    if (mask[kDb1]) db1_part = at::empty({prow, s.d_ff}, f32);
    if (mask[kDb3]) db3_part = at::empty({prow, s.d_ff}, f32);
    FfnGemmParams p{};
    p.epilogue = GemmEpilogue::kBwdAct;
    p.a = dy.data_ptr();
    p.a_row_stride = row_stride(dy);
    p.b = w2.data_ptr();
    p.b_row_stride = w2.stride(0);
    p.m = s.tokens;
    p.n = s.d_ff;
    p.k = s.d_out;
    p.gate_in = gate.data_ptr();
    p.gate_in_row_stride = row_stride(gate);
    if (s.gated) {
      p.up_in = up.data_ptr();
      p.up_in_row_stride = row_stride(up);
      p.out_up = dup.data_ptr();
      p.out_up_row_stride = dup.stride(0);
    }
    p.out = dgate.data_ptr();
    p.out_row_stride = dgate.stride(0);
    if (want_h && !recompute) {
      p.out_h = h.data_ptr();
      p.out_h_row_stride = h.stride(0);
    }
    p.dbias_partial = db1_part.defined() ? db1_part.data_ptr<float>() : nullptr;
    p.dbias_up_partial = db3_part.defined() ? db3_part.data_ptr<float>() : nullptr;
    p.act = act;
    p.gated = s.gated;
    p.dtype = to_dtype(x.scalar_type());
    if (s.tokens > 0) run_gemm(p);
  } else if (want_h && !recompute) {
    // Only dW2 wanted, from saved pre-activations: the forward step alone.
    // The saved pre-activations already hold their biases.
    h = new_buffer();
    act_fwd_step_cuda(fwd_step_params(s, act, x, gate, up, std::nullopt, std::nullopt, h));
  }
  gate = up = at::Tensor();

  GradTuple g{at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts),
              at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts),
              at::empty({0}, opts)};
  if (mask[kDw2]) std::get<kDw2>(g) = at::mm(dy.t(), h);
  h = at::Tensor();
  if (mask[kDb2]) std::get<kDb2>(g) = at::sum(dy, {0}, false, at::kFloat).to(x.scalar_type());
  at::Tensor dx;
  if (mask[kDw1]) std::get<kDw1>(g) = at::mm(dgate.t(), x);
  if (mask[kDx]) dx = at::mm(dgate, w1);
  dgate = at::Tensor();
  if (mask[kDw3]) std::get<kDw3>(g) = at::mm(dup.t(), x);
  if (mask[kDx] && s.gated) dx.addmm_(dup, *w3);
  dup = at::Tensor();
  if (mask[kDx]) std::get<kDx>(g) = dx;
  // Bias gradients: the partials' rows summed in a fixed order.
  if (mask[kDb1]) std::get<kDb1>(g) = db1_part.sum(0).to(x.scalar_type());
  if (mask[kDb3]) std::get<kDb3>(g) = db3_part.sum(0).to(x.scalar_type());
  return g;
}

// ---- the ops ------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ffn_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1_,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2_,
    const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3_,
    c10::string_view activation, bool save_for_backward) {
  const c10::cuda::CUDAGuard guard(x.device());
  const FfnShape s = check_inputs(x, w1, b1_, w2, b2_, w3, b3_);
  const Activation act = parse_activation(activation);
  const auto b1 = contiguous_opt(b1_), b2 = contiguous_opt(b2_), b3 = contiguous_opt(b3_);
  if (fused_possible(s, x, w1, w2, w3) && biases_aligned({&b1, &b2, &b3}) &&
      choose(s, false, x.get_device()) == kFused) {
    return ffn_fwd_fused(s, act, x, w1, b1, w2, b2, w3, b3, save_for_backward);
  }
  return ffn_fwd_impl(&act_fwd_step_cuda, x, w1, b1_, w2, b2_, w3, b3_, activation,
                      save_for_backward);
}

GradTuple ffn_bwd_cuda(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1,
                       const std::optional<at::Tensor>& b1_, const at::Tensor& w2,
                       const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3_,
                       const at::Tensor& act_in, c10::string_view activation, bool recompute,
                       std::array<bool, kNumGrads> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const FfnShape s = check_inputs(x, w1, b1_, w2, std::nullopt, w3, b3_);
  const Activation act = parse_activation(activation);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({s.tokens, s.d_out}) &&
                  dout.scalar_type() == x.scalar_type() && dout.device() == x.device(),
              "ffn: dout must be ", x.scalar_type(), " [", s.tokens, ", ", s.d_out, "] on ",
              x.device(), ", got ", dout.scalar_type(), " ", dout.sizes(), " on ", dout.device());
  if (!recompute) {
    TORCH_CHECK(act_in.sizes() == at::IntArrayRef({s.n_in(), s.tokens, s.d_ff}) &&
                    act_in.is_contiguous() && act_in.scalar_type() == x.scalar_type() &&
                    act_in.device() == x.device(),
                "ffn: act_in must be a contiguous ", x.scalar_type(), " [", s.n_in(), ", ",
                s.tokens, ", ", s.d_ff, "] on ", x.device(), ", got ", act_in.sizes());
  }
  const auto b1 = contiguous_opt(b1_), b3 = contiguous_opt(b3_);
  // Without recompute the saved pre-activations are epilogue inputs: both
  // halves of act_in must be readable (a [n, 1, d_ff] act_in is
  // is_contiguous() whatever its stride(0), which places the second half).
  const bool act_in_ok = recompute || (gemm_operand_ok(act_in.select(0, 0)) &&
                                       (!s.gated || gemm_operand_ok(act_in.select(0, 1))));
  if (fused_possible(s, x, w1, w2, w3) && biases_aligned({&b1, &b3}) && act_in_ok &&
      choose(s, true, x.get_device()) == kFused) {
    return ffn_bwd_fused(s, act, dout, x, w1, b1, w2, w3, b3, act_in, recompute, output_mask);
  }
  return ffn_bwd_impl(&act_fwd_step_cuda, &act_bwd_step_cuda, dout, x, w1, b1_, w2, w3, b3_,
                      act_in, activation, recompute, output_mask);
}

// The path ffn_fwd (backward=false) or ffn_bwd would take for these sizes on
// the current device, ignoring layout: "fused" or "cublas".
std::string ffn_cuda_path(int64_t tokens, int64_t d_model, int64_t d_ff, int64_t d_out, bool gated,
                          at::ScalarType dtype, bool backward) {
  const FfnShape s{tokens, d_model, d_ff, d_out, gated};
  const bool shape_ok = (dtype == at::kHalf || dtype == at::kBFloat16) && d_model % 8 == 0 &&
                        d_ff % 8 == 0 && d_out % 8 == 0 && d_model > 0 && d_ff > 0 && d_out > 0;
  if (!shape_ok) return "cublas";
  return choose(s, backward, c10::cuda::current_device()) == kFused ? "fused" : "cublas";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyfastattn, m) {
  // Dispatch rules of the CUDA FFN for one device name: groups of 5 numbers
  // (gated 0/1, max_tokens, max_d_model (-1: unbounded), fwd_path, bwd_path),
  // paths 1 = fused GEMMs, 2 = cuBLAS + elementwise; first match wins.
  m.def("ffn_cuda_set_dispatch(str device_name, int[] rules) -> ()", [](c10::string_view n, at::IntArrayRef r) { set_dispatch(n, r); });
  // "auto" (the table), "fused" or "cublas" for every shape.
  m.def("ffn_cuda_force_path(str path) -> ()", [](c10::string_view p) { force_path(p); });
  m.def("ffn_cuda_path(int tokens, int d_model, int d_ff, int d_out, bool gated, ScalarType dtype, bool backward) -> str",
        &ffn_cuda_path);
}

TORCH_LIBRARY_IMPL(pyfastattn, CUDA, m) {
  m.impl("ffn_fwd", &ffn_fwd_cuda);
  m.impl("ffn_bwd", &ffn_bwd_cuda);
}

}  // namespace pyfastattn
