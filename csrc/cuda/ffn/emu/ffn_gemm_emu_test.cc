// Runs the CUDA FFN kernels (the GEMM with its three epilogues, and the
// elementwise step) under the CPU emulation of their sm_80 primitives
// (../../attention/emu/sm80_emulation.h) on random small and odd shapes, and
// compares every output with a float64 reference written from the contract in
// csrc/ffn/params.h and ffn_gemm.h, not from the kernels. It exercises
// indexing, predication, the cp.async pipeline's barriers (race checker),
// fragment layouts and swizzles (bank-conflict counts); it cannot show speed,
// hardware rounding or compiler bugs. A standalone program, not part of the
// extension build:
//
//   g++ -std=c++17 -O2 -DPFA_ATTN_HOST_EMULATION -I/usr/local/cuda/include -Icsrc
//       csrc/cuda/ffn/emu/ffn_gemm_emu_test.cc -o /tmp/ffn_gemm_emu_test
//   /tmp/ffn_gemm_emu_test [gemm_cases=60] [elementwise_cases=60] [seed=1]
// Exit status 0 when every case and the bank-conflict counts pass.
//
// Inputs hold NaN in the padding of every row stride (the kernels must not
// read past k or n); outputs hold a sentinel there and must keep it; buffers
// end exactly at their last element, so the emulator's range check catches a
// read or write past the last row.
#include "../ffn_elementwise.h"  // first: cuda_runtime.h before the emulation macros
#include "../ffn_gemm.h"
#include "../ffn_elementwise_kernel.cuh"
#include "../ffn_gemm_kernel.cuh"

#include <algorithm>
#include <random>
#include <sstream>

using pyfastattn::Activation;
using pyfastattn::DType;
using pyfastattn::FfnActBwdParams;
using pyfastattn::FfnActFwdParams;
namespace ffn = pyfastattn::cuda::ffn;
namespace emu = pyfastattn::emu;
using ffn::FfnGemmParams;
using ffn::GemmEpilogue;

namespace {

std::mt19937_64 rng;

double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
int pick(std::initializer_list<int> xs) {
  return *(xs.begin() + std::uniform_int_distribution<int>(0, static_cast<int>(xs.size()) - 1)(rng));
}
bool coin(double p = 0.5) { return uniform(0, 1) < p; }

// A row-major [rows, cols] tensor of `dtype` with row stride `stride`: the
// padding holds `pad` (NaN for inputs, a sentinel for outputs); the buffer
// ends at the last element of the last row.
struct Mat {
  DType dtype = DType::kBFloat16;
  int64_t rows = 0, cols = 0, stride = 0;
  std::vector<uint8_t> buf;  // over-allocated by 16 for alignment
  size_t off = 0;

  int esize() const { return dtype == DType::kFloat32 ? 4 : 2; }
  void* data() { return buf.data() + off; }
  const void* data() const { return buf.data() + off; }
  size_t bytes() const { return rows == 0 ? 0 : ((rows - 1) * stride + cols) * esize(); }

  static double to_double(uint32_t bits, DType t) {
    if (t == DType::kFloat32) return ffn::bits_as_float(bits);
    if (t == DType::kBFloat16) return ffn::bits_as_float(bits << 16);
    __half_raw r;
    r.x = static_cast<unsigned short>(bits);
    return __half2float(__half(r));
  }
  static uint32_t to_bits(double v, DType t) {
    const float f = static_cast<float>(v);
    if (t == DType::kFloat32) return ffn::float_as_bits(f);
    if (t == DType::kBFloat16) return __nv_bfloat16_raw(__float2bfloat16_rn(f)).x;
    return __half_raw(__float2half_rn(f)).x;
  }
  uint32_t bits(int64_t r, int64_t c) const {
    uint32_t v = 0;
    std::memcpy(&v, buf.data() + off + (r * stride + c) * esize(), esize());
    return v;
  }
  void set_bits(int64_t r, int64_t c, uint32_t v) {
    std::memcpy(buf.data() + off + (r * stride + c) * esize(), &v, esize());
  }
  double at(int64_t r, int64_t c) const { return to_double(bits(r, c), dtype); }
  void set(int64_t r, int64_t c, double v) { set_bits(r, c, to_bits(v, dtype)); }

  Mat() = default;
  Mat(DType t, int64_t r, int64_t c, int64_t s, uint32_t pad_bits) : dtype(t), rows(r), cols(c), stride(s) {
    buf.assign(bytes() + 16, 0);
    off = (16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16;
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < s && (i < r - 1 || j < c); ++j) set_bits(i, j, pad_bits);
  }
  void fill_random(double scale) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) set(i, j, uniform(-scale, scale));
  }
  // Every padding element still holds `pad_bits`.
  bool padding_intact(uint32_t pad_bits) const {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = cols; j < stride && i < rows - 1; ++j)
        if (bits(i, j) != pad_bits) return false;
    return true;
  }
};

uint32_t nan_bits(DType t) { return t == DType::kFloat32 ? 0x7fc00000u : 0x7fffu; }
uint32_t sentinel_bits(DType t) { return t == DType::kFloat32 ? 0x7fa5a5a5u : 0x7e5au; }

double act_ref(Activation a, double x) {
  switch (a) {
    case Activation::kGelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::kRelu: return x > 0 ? x : 0;
    case Activation::kSilu: return x / (1 + std::exp(-x));
  }
  return 0;
}
double act_grad_ref(Activation a, double x) {
  switch (a) {
    case Activation::kGelu:
      return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
    case Activation::kGeluTanh: {
      const double k = std::sqrt(2 / M_PI), t = std::tanh(k * (x + 0.044715 * x * x * x));
      return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x);
    }
    case Activation::kRelu: return x > 0 ? 1 : 0;
    case Activation::kSilu: {
      const double s = 1 / (1 + std::exp(-x));
      return s * (1 + x * (1 - s));
    }
  }
  return 0;
}
const char* act_name(Activation a) {
  static const char* n[] = {"gelu", "gelu_tanh", "relu", "silu"};
  return n[static_cast<int>(a)];
}
const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "fp32" : t == DType::kFloat16 ? "fp16" : "bf16";
}

// Relative precision of the storage dtype (one rounding of the output).
double eps_of(DType t) { return t == DType::kFloat32 ? 1e-6 : t == DType::kFloat16 ? 1.0 / 1024 : 1.0 / 128; }

int failures = 0;

// Compares an output with its reference: every element within
// 2 eps |ref| + c eps max|ref| (one rounding of the result, plus fp32
// arithmetic noise: c = 1e-3 for fp16/bf16 outputs; c = 1 for fp32 ones,
// whose activations lose a few ulp of max|ref| to cancellation, e.g.
// 0.5 x (1 + erf(x / sqrt 2)) for negative x), never NaN, padding untouched.
void check_mat(const char* name, const Mat& out, const std::vector<double>& ref, const std::string& what) {
  double max_ref = 0;
  for (double v : ref) max_ref = std::max(max_ref, std::fabs(v));
  const double eps = eps_of(out.dtype);
  double worst = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < out.rows; ++i)
    for (int64_t j = 0; j < out.cols; ++j) {
      const double r = ref[i * out.cols + j], o = out.at(i, j);
      const double err = std::fabs(o - r);
      if (!(err <= 2 * eps * std::fabs(r) + (out.dtype == DType::kFloat32 ? 1.0 : 1e-3) * eps * max_ref + 1e-30)) {
        if (!bad) std::fprintf(stderr, "  %s[%lld, %lld] = %g, reference %g\n", name, (long long)i, (long long)j, o, r);
        ++bad;
      }
      if (err == err) worst = std::max(worst, err);
    }
  if (!out.padding_intact(sentinel_bits(out.dtype))) {
    std::fprintf(stderr, "  %s: padding past the last column was written\n", name);
    ++bad;
  }
  if (bad) {
    ++failures;
    std::fprintf(stderr, "FAIL %s: %s: %lld bad elements (max error %.3g, max |ref| %.3g)\n", what.c_str(), name,
                 (long long)bad, worst, max_ref);
  }
}

// Column sums (bias gradients) against the float64 sum, relative to sum |x|.
void check_sums(const char* name, const std::vector<float>& got, const std::vector<double>& ref,
                const std::vector<double>& abs_sum, const std::string& what) {
  double max_abs = 0;
  for (double v : abs_sum) max_abs = std::max(max_abs, v);
  for (size_t j = 0; j < ref.size(); ++j) {
    const double err = std::fabs(got[j] - ref[j]);
    // fp32 sums of values computed in fp32 from the same inputs (the outputs'
    // rounding does not enter): 1e-5 of the sum of magnitudes, plus 1e-6 of
    // the largest column's for the activations' cancellation (check_mat).
    if (!(err <= 1e-5 * abs_sum[j] + 1e-6 * max_abs + 1e-30)) {
      ++failures;
      std::fprintf(stderr, "FAIL %s: %s[%zu] = %g, reference %g\n", what.c_str(), name, j, got[j], ref[j]);
      return;
    }
  }
}

// ---- the GEMM --------------------------------------------------------------

template <typename T, GemmEpilogue kEpi, bool kGated, int kBM>
void run_gemm_tile(const FfnGemmParams& p) {
  using Tile = ffn::GemmTile<kBM, kEpi, kGated>;
  emu::launch(ffn::gemm_grid<Tile>(p), Tile::kThreads, Tile::kSmemBytes,
              [&p] { ffn::ffn_gemm_cta<T, Tile>(p); });
}

template <typename T, GemmEpilogue kEpi, bool kGated>
void run_gemm_typed(const FfnGemmParams& p) {
  if (ffn::gemm_block_m(p.m) == 64) {
    run_gemm_tile<T, kEpi, kGated, 64>(p);
  } else {
    run_gemm_tile<T, kEpi, kGated, 128>(p);
  }
}

template <typename T>
void run_gemm_t(const FfnGemmParams& p) {
  switch (p.epilogue) {
    case GemmEpilogue::kFwdAct:
      return p.gated ? run_gemm_typed<T, GemmEpilogue::kFwdAct, true>(p)
                     : run_gemm_typed<T, GemmEpilogue::kFwdAct, false>(p);
    case GemmEpilogue::kBiasResidual:
      return run_gemm_typed<T, GemmEpilogue::kBiasResidual, false>(p);
    case GemmEpilogue::kBwdAct:
      return p.gated ? run_gemm_typed<T, GemmEpilogue::kBwdAct, true>(p)
                     : run_gemm_typed<T, GemmEpilogue::kBwdAct, false>(p);
  }
}

void run_gemm(const FfnGemmParams& p) {
  if (const char* r = ffn::ffn_gemm_unsupported_reason(p)) {
    std::fprintf(stderr, "unexpected: kernel rejects the case: %s\n", r);
    std::exit(1);
  }
  if (p.dtype == DType::kFloat16) run_gemm_t<__half>(p); else run_gemm_t<__nv_bfloat16>(p);
}

int64_t padded(int64_t cols) { return cols + (coin() ? 0 : 8 * pick({1, 2, 3})); }

void gemm_case(int index) {
  const DType dt = coin() ? DType::kBFloat16 : DType::kFloat16;
  const GemmEpilogue epi = static_cast<GemmEpilogue>(index % 3);
  const bool gated = epi != GemmEpilogue::kBiasResidual && coin();
  const Activation act = static_cast<Activation>(pick({0, 1, 2, 3}));
  const int64_t m = pick({1, 7, 16, 63, 64, 65, 130, 200});
  const int64_t n = 8 * pick({1, 2, 9, 16, 17, 25, 33});
  const int64_t k = 8 * pick({1, 3, 5, 12, 13});
  const bool with_bias = coin(0.7), with_bias_up = gated && coin(0.7);
  const bool nn = epi == GemmEpilogue::kBwdAct;
  std::ostringstream w;
  w << "gemm case " << index << ": " << dtype_name(dt) << " epilogue " << static_cast<int>(epi)
    << (gated ? " gated" : " plain") << " " << act_name(act) << " m=" << m << " n=" << n << " k=" << k
    << " bias=" << with_bias << "/" << with_bias_up;
  emu::context() = w.str();

  const uint32_t nan = nan_bits(dt), sent = sentinel_bits(dt);
  Mat a(dt, m, k, padded(k), nan);
  a.fill_random(1.0);
  const double wscale = 1.5 / std::sqrt(static_cast<double>(k));
  Mat b = nn ? Mat(dt, k, n, padded(n), nan) : Mat(dt, n, k, padded(k), nan);
  b.fill_random(wscale);
  Mat b_up;
  if (epi == GemmEpilogue::kFwdAct && gated) {
    b_up = Mat(dt, n, k, b.stride, nan);
    b_up.fill_random(wscale);
  }
  Mat bias(dt, 1, n, n, nan), bias_up(dt, 1, n, n, nan);
  bias.fill_random(0.5);
  bias_up.fill_random(0.5);
  Mat residual, gate_in, up_in;
  if (epi == GemmEpilogue::kBiasResidual && coin()) {
    residual = Mat(dt, m, n, padded(n), nan);
    residual.fill_random(1.0);
  }
  if (nn) {
    gate_in = Mat(dt, m, n, padded(n), nan);
    gate_in.fill_random(2.0);
    if (gated) {
      up_in = Mat(dt, m, n, padded(n), nan);
      up_in.fill_random(1.5);
    }
  }
  Mat out(dt, m, n, padded(n), sent), out_up, out_h, pre_gate, pre_up;
  if (nn && gated) out_up = Mat(dt, m, n, padded(n), sent);
  if (nn && coin()) out_h = Mat(dt, m, n, padded(n), sent);
  if (epi == GemmEpilogue::kFwdAct && coin()) {
    pre_gate = Mat(dt, m, n, padded(n), sent);
    if (gated) pre_up = Mat(dt, m, n, padded(n), sent);
  }
  const int64_t prow = ffn::gemm_bias_partial_rows(m);
  const bool want_db = nn && coin(0.8), want_dbu = nn && gated && coin(0.8);
  std::vector<float> part(want_db ? prow * n : 0, std::nanf("")), part_up(want_dbu ? prow * n : 0, std::nanf(""));

  FfnGemmParams p{};
  p.epilogue = epi;
  p.a = a.data();
  p.a_row_stride = a.stride;
  p.b = b.data();
  p.b_up = b_up.rows ? b_up.data() : nullptr;
  p.b_row_stride = b.stride;
  p.m = m;
  p.n = n;
  p.k = k;
  p.bias = with_bias ? bias.data() : nullptr;
  p.bias_up = with_bias_up ? bias_up.data() : nullptr;
  p.residual = residual.rows ? residual.data() : nullptr;
  p.residual_row_stride = residual.stride;
  p.gate_in = gate_in.rows ? gate_in.data() : nullptr;
  p.gate_in_row_stride = gate_in.stride;
  p.up_in = up_in.rows ? up_in.data() : nullptr;
  p.up_in_row_stride = up_in.stride;
  p.out = out.data();
  p.out_row_stride = out.stride;
  p.out_up = out_up.rows ? out_up.data() : nullptr;
  p.out_up_row_stride = out_up.stride;
  p.out_h = out_h.rows ? out_h.data() : nullptr;
  p.out_h_row_stride = out_h.stride;
  p.pre_gate = pre_gate.rows ? pre_gate.data() : nullptr;
  p.pre_gate_row_stride = pre_gate.stride;
  p.pre_up = pre_up.rows ? pre_up.data() : nullptr;
  p.pre_up_row_stride = pre_up.stride;
  p.dbias_partial = want_db ? part.data() : nullptr;
  p.dbias_up_partial = want_dbu ? part_up.data() : nullptr;
  p.act = act;
  p.gated = gated;
  p.dtype = dt;

  emu::clear_ranges();
  for (const Mat* in : {&a, &b, &b_up, &bias, &bias_up, &residual, &gate_in, &up_in})
    if (in->rows) emu::add_range(in->data(), in->bytes(), false);
  for (Mat* o : {&out, &out_up, &out_h, &pre_gate, &pre_up})
    if (o->rows) emu::add_range(o->data(), o->bytes(), true);
  if (want_db) emu::add_range(part.data(), part.size() * 4, true);
  if (want_dbu) emu::add_range(part_up.data(), part_up.size() * 4, true);
  run_gemm(p);

  // float64 reference from the same (rounded) inputs.
  auto gemm_ref = [&](const Mat& bm, int64_t i, int64_t j) {
    double s = 0;
    for (int64_t kk = 0; kk < k; ++kk) s += a.at(i, kk) * (nn ? bm.at(kk, j) : bm.at(j, kk));
    return s;
  };
  std::vector<double> r_out(m * n), r_up(m * n), r_h(m * n), r_pg(m * n), r_pu(m * n);
  std::vector<double> db(n, 0), dbu(n, 0), db_abs(n, 0), dbu_abs(n, 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double c = gemm_ref(b, i, j);
      const double bj = with_bias ? bias.at(0, j) : 0, buj = with_bias_up ? bias_up.at(0, j) : 0;
      const int64_t e = i * n + j;
      if (epi == GemmEpilogue::kFwdAct) {
        const double av = c + bj, u = gated ? gemm_ref(b_up, i, j) + buj : 1;
        r_pg[e] = av;
        r_pu[e] = u;
        r_out[e] = act_ref(act, av) * u;
      } else if (epi == GemmEpilogue::kBiasResidual) {
        r_out[e] = c + bj + (residual.rows ? residual.at(i, j) : 0);
      } else {
        const double av = gate_in.at(i, j) + bj, u = gated ? up_in.at(i, j) + buj : 1;
        const double f = act_ref(act, av), df = act_grad_ref(act, av);
        r_out[e] = c * u * df;
        r_up[e] = c * f;
        r_h[e] = f * u;
        db[j] += r_out[e];
        db_abs[j] += std::fabs(r_out[e]);
        dbu[j] += r_up[e];
        dbu_abs[j] += std::fabs(r_up[e]);
      }
    }
  check_mat("out", out, r_out, w.str());
  if (out_up.rows) check_mat("dup", out_up, r_up, w.str());
  if (out_h.rows) check_mat("h", out_h, r_h, w.str());
  if (pre_gate.rows) check_mat("pre_gate", pre_gate, r_pg, w.str());
  if (pre_up.rows) check_mat("pre_up", pre_up, r_pu, w.str());
  for (int which = 0; which < 2; ++which) {
    const std::vector<float>& pp = which ? part_up : part;
    if (pp.empty()) continue;
    std::vector<float> sums(n, 0.f);
    for (int64_t r = 0; r < prow; ++r)
      for (int64_t j = 0; j < n; ++j) sums[j] += pp[r * n + j];
    check_sums(which ? "dbias_up" : "dbias", sums, which ? dbu : db, which ? dbu_abs : db_abs, w.str());
  }
}

// ---- the elementwise step -------------------------------------------------

template <typename T, int V>
void run_ew_fwd(const FfnActFwdParams& p) {
  const ffn::RowChunks rc = ffn::elementwise_row_chunks(p.rows, p.cols, V);
  const dim3 grid((p.cols + ffn::kEwThreads * V - 1) / (ffn::kEwThreads * V), rc.chunks);
  emu::launch(grid, ffn::kEwThreads, 0, [&] { ffn::act_fwd_cta<T, V>(p, rc.rows_per_chunk); });
}
template <typename T, int V>
void run_ew_bwd(const FfnActBwdParams& p, float* partial) {
  const ffn::RowChunks rc = ffn::elementwise_row_chunks(p.rows, p.cols, V);
  const dim3 grid((p.cols + ffn::kEwThreads * V - 1) / (ffn::kEwThreads * V), rc.chunks);
  emu::launch(grid, ffn::kEwThreads, 0, [&] { ffn::act_bwd_cta<T, V>(p, rc.rows_per_chunk, partial, rc.chunks); });
  if (p.dbias_gate)
    emu::launch(dim3((p.cols + 127) / 128), ffn::kEwThreads, 0,
                [&] { ffn::column_sums_cta(partial, rc.chunks, p.cols, p.dbias_gate); });
  if (p.dbias_up)
    emu::launch(dim3((p.cols + 127) / 128), ffn::kEwThreads, 0,
                [&] { ffn::column_sums_cta(partial + rc.chunks * p.cols, rc.chunks, p.cols, p.dbias_up); });
}

template <typename P, typename F>
void with_ew_type(const P& p, F&& f) {
  const int v = ffn::elementwise_vec(p);
  switch (p.dtype) {
    case DType::kFloat32: v == 1 ? f(float{}, std::integral_constant<int, 1>{}) : f(float{}, std::integral_constant<int, 4>{}); break;
    case DType::kFloat16: v == 1 ? f(__half{}, std::integral_constant<int, 1>{}) : f(__half{}, std::integral_constant<int, 8>{}); break;
    case DType::kBFloat16:
      v == 1 ? f(__nv_bfloat16{}, std::integral_constant<int, 1>{}) : f(__nv_bfloat16{}, std::integral_constant<int, 8>{});
      break;
  }
}

void elementwise_case(int index) {
  const DType dt = static_cast<DType>(pick({0, 1, 2}));
  const bool gated = coin(), backward = coin();
  const Activation act = static_cast<Activation>(pick({0, 1, 2, 3}));
  const int64_t rows = pick({1, 7, 9, 33, 100});
  const bool vec_cols = coin();
  const int64_t cols = vec_cols ? 8 * pick({1, 17, 40}) : pick({1, 5, 97, 130});
  const bool with_bias = coin(0.7), with_bias_up = gated && coin(0.7);
  const bool in_place = backward && coin(0.3);  // dgate over dout, dup over up, h over gate
  auto stride = [&] { return vec_cols ? cols + 8 * pick({0, 0, 1}) : cols + pick({0, 1, 3}); };
  std::ostringstream w;
  w << "elementwise case " << index << ": " << dtype_name(dt) << (backward ? " bwd" : " fwd")
    << (gated ? " gated " : " plain ") << act_name(act) << " rows=" << rows << " cols=" << cols
    << " in_place=" << in_place;
  emu::context() = w.str();
  const uint32_t nan = nan_bits(dt), sent = sentinel_bits(dt);
  Mat gate(dt, rows, cols, stride(), nan), up, dout, bias(dt, 1, cols, cols, nan), bias_up(dt, 1, cols, cols, nan);
  gate.fill_random(3.0);
  bias.fill_random(0.5);
  bias_up.fill_random(0.5);
  if (gated) {
    up = Mat(dt, rows, cols, stride(), nan);
    up.fill_random(1.5);
  }
  emu::clear_ranges();
  std::vector<double> a(rows * cols), u(rows * cols, 1.0), d(rows * cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      a[i * cols + j] = gate.at(i, j) + (with_bias ? bias.at(0, j) : 0);
      if (gated) u[i * cols + j] = up.at(i, j) + (with_bias_up ? bias_up.at(0, j) : 0);
    }
  if (!backward) {
    Mat out(dt, rows, cols, stride(), sent);
    FfnActFwdParams p{};
    p.gate = gate.data();
    p.up = gated ? up.data() : nullptr;
    p.bias_gate = with_bias ? bias.data() : nullptr;
    p.bias_up = with_bias_up ? bias_up.data() : nullptr;
    p.out = out.data();
    p.gate_row_stride = gate.stride;
    p.up_row_stride = up.stride;
    p.out_row_stride = out.stride;
    p.rows = rows;
    p.cols = cols;
    p.act = act;
    p.gated = gated;
    p.dtype = dt;
    for (const Mat* in : {&gate, &up, &bias, &bias_up})
      if (in->rows) emu::add_range(in->data(), in->bytes(), false);
    emu::add_range(out.data(), out.bytes(), true);
    with_ew_type(p, [&](auto t, auto v) { run_ew_fwd<decltype(t), decltype(v)::value>(p); });
    std::vector<double> ref(rows * cols);
    for (size_t e = 0; e < ref.size(); ++e) ref[e] = act_ref(act, a[e]) * u[e];
    check_mat("h", out, ref, w.str());
    return;
  }
  dout = Mat(dt, rows, cols, stride(), nan);
  dout.fill_random(1.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) d[i * cols + j] = dout.at(i, j);
  // In place: outputs share the inputs' buffers at the same index.
  Mat dgate_own(dt, rows, cols, stride(), sent), dup_own, h_own(dt, rows, cols, stride(), sent);
  if (gated) dup_own = Mat(dt, rows, cols, stride(), sent);
  Mat& dgate = in_place ? dout : dgate_own;
  Mat& dup = in_place && gated ? up : dup_own;
  Mat& h = in_place ? gate : h_own;
  const bool want_h = coin(0.7);
  const bool want_db = coin(0.7), want_dbu = gated && coin(0.7);
  std::vector<float> dbg(cols, std::nanf("")), dbu(cols, std::nanf(""));
  FfnActBwdParams p{};
  p.gate = gate.data();
  p.up = gated ? up.data() : nullptr;
  p.bias_gate = with_bias ? bias.data() : nullptr;
  p.bias_up = with_bias_up ? bias_up.data() : nullptr;
  p.dout = dout.data();
  p.gate_row_stride = gate.stride;
  p.up_row_stride = up.stride;
  p.dout_row_stride = dout.stride;
  p.dgate = dgate.data();
  p.dup = gated ? dup.data() : nullptr;
  p.out = want_h ? h.data() : nullptr;
  p.dbias_gate = want_db ? dbg.data() : nullptr;
  p.dbias_up = want_dbu ? dbu.data() : nullptr;
  p.dgate_row_stride = dgate.stride;
  p.dup_row_stride = dup.stride;
  p.out_row_stride = h.stride;
  p.rows = rows;
  p.cols = cols;
  p.act = act;
  p.gated = gated;
  p.dtype = dt;
  // In-place buffers are both input and output: register them writable.
  for (Mat* m : {&gate, &up, &dout, &dgate_own, &dup_own, &h_own})
    if (m->rows) emu::add_range(m->data(), m->bytes(), true);
  emu::add_range(bias.data(), bias.bytes(), false);
  emu::add_range(bias_up.data(), bias_up.bytes(), false);
  const int v = ffn::elementwise_vec(p);
  std::vector<float> partial(2 * ffn::elementwise_row_chunks(rows, cols, v).chunks * cols, std::nanf(""));
  emu::add_range(partial.data(), partial.size() * 4, true);
  if (want_db) emu::add_range(dbg.data(), cols * 4, true);
  if (want_dbu) emu::add_range(dbu.data(), cols * 4, true);
  with_ew_type(p, [&](auto t, auto vv) { run_ew_bwd<decltype(t), decltype(vv)::value>(p, partial.data()); });
  std::vector<double> rg(rows * cols), ru(rows * cols), rh(rows * cols), sg(cols, 0), su(cols, 0), ag(cols, 0), au(cols, 0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t e = i * cols + j;
      const double f = act_ref(act, a[e]), df = act_grad_ref(act, a[e]);
      rg[e] = d[e] * u[e] * df;
      ru[e] = d[e] * f;
      rh[e] = f * u[e];
      sg[j] += rg[e];
      ag[j] += std::fabs(rg[e]);
      su[j] += ru[e];
      au[j] += std::fabs(ru[e]);
    }
  // In place, the padding of the shared buffers holds NaN (they were inputs).
  auto check = [&](const char* name, Mat& m, const std::vector<double>& ref, bool shared) {
    if (shared) {
      Mat copy(m.dtype, m.rows, m.cols, m.stride, sentinel_bits(m.dtype));
      for (int64_t i = 0; i < m.rows; ++i)
        for (int64_t j = 0; j < m.cols; ++j) copy.set_bits(i, j, m.bits(i, j));
      if (!m.padding_intact(nan_bits(m.dtype))) {
        ++failures;
        std::fprintf(stderr, "FAIL %s: %s padding written\n", w.str().c_str(), name);
      }
      check_mat(name, copy, ref, w.str());
    } else {
      check_mat(name, m, ref, w.str());
    }
  };
  check("dgate", dgate, rg, in_place);
  if (gated) check("dup", dup, ru, in_place);
  if (want_h) check("h", h, rh, in_place);
  if (want_db) check_sums("dbias_gate", dbg, sg, ag, w.str());
  if (want_dbu) check_sums("dbias_up", dbu, su, au, w.str());
}

}  // namespace

int main(int argc, char** argv) {
  const int gemm_cases = argc > 1 ? std::atoi(argv[1]) : 60;
  const int ew_cases = argc > 2 ? std::atoi(argv[2]) : 60;
  const long long seed = argc > 3 ? std::atoll(argv[3]) : 1;
  rng.seed(seed);
  std::printf("ffn_gemm_emu_test: %d gemm + %d elementwise cases, seed %lld; %s\n", gemm_cases, ew_cases,
              seed, emu::cta_order_line().c_str());
  std::fflush(stdout);
  for (int i = 0; i < gemm_cases; ++i) gemm_case(i);
  const emu::Stats gs = emu::rt().stats;
  for (int i = 0; i < ew_cases; ++i) elementwise_case(i);
  std::printf("gemm: %d cases, %llu CTAs, %llu mma, %llu ldmatrix (%llu extra wavefronts), %llu cp.async\n",
              gemm_cases, (unsigned long long)gs.ctas, (unsigned long long)gs.mma, (unsigned long long)gs.ldmatrix,
              (unsigned long long)gs.ldmatrix_extra_wavefronts, (unsigned long long)gs.cp_async_16);
  std::printf("elementwise: %d cases\n", ew_cases);
  if (gs.ldmatrix_extra_wavefronts != 0) {
    std::fprintf(stderr, "FAIL: ldmatrix bank conflicts (%llu extra wavefronts)\n",
                 (unsigned long long)gs.ldmatrix_extra_wavefronts);
    ++failures;
  }
  if (failures) {
    std::printf("FAILED: %d checks\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
