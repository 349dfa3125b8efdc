// Op schemas (defined once), the CPU implementations, and the module init.
//
// torch.ops.pyfastattn.attention_fwd / attention_bwd take the canonical form
// described in csrc/attention/params.h. pyfastattn/_ops.py adds register_fake
// and register_autograd; pyfastattn/functional.py maps both public APIs here.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "attention/api.h"
#include "attention/fast_call.h"
#include "cpu/attention_cpu.h"
#include "cpu/attention_kvcache.h"
#include "env_switch.h"
#include "cpu/peak_probe.h"
#include "cpu/simd.h"

namespace pyfastattn {
namespace {

// Whether a dense forward goes to the KV-cache kernel (split-KV, every query
// head of a kv head in one pass over its keys, software prefetch;
// csrc/cpu/attention_kvcache.cpp) instead of the tiled one. That kernel reads
// each K/V row once per kv head for all its query rows; the tiled kernel's
// tasks hold one query head, so with few query rows per head (decode, short
// speculative or chunked steps) they re-read K/V once per query head with most
// of their 16 query lanes empty. Measured (one thread, CPU time, the two ops
// on the same tensors; PERF_NOTES.md, "Few query rows: plain `attention`
// forwards routed to the KV-cache kernel"):
// 0.25-0.7x the time with 2-32 query rows per kv head and Sq <= 8, 1.2-2x
// *slower* at Sq 16 (the tiled kernel's lanes are full there), and for one
// row per kv head (MHA decode) a win only once K and V no longer fit in the
// caches (0.5-0.75x from 16 MiB read, up to 1.5x slower below) -- measured
// with (B, S, H, D) K / V called again and again, i.e. read from L2 / L3.
// Session 6 (benchmarks/decode_route_cold_hot.py; PERF_NOTES.md "Session 6:
// MHA decode read from memory") measured the layouts and the way a decode
// step reads each layer's K / V (once, from memory): (1) when each head's
// rows are contiguous ((B, H, S, D) tensors passed as views, as the SDPA
// drop-in and Hugging Face's caches do) the KV-cache kernel's walk across
// every head of a key is 0.45-0.75x the speed of the decode path's per-head
// streams for MHA, so MHA decode routes only when the heads of a key are
// interleaved in its row; (2) there, bf16 MHA decode is 1.3-1.9x faster on
// the KV-cache kernel at every size read from memory (0.65-0.9x when the same
// K / V are called in a loop), so bf16 routes at any size; fp32 / fp16 gain
// only from ~1k keys and keep the 16 MiB rule. GQA (2-32 rows) routes in
// both layouts (1.15-4x). The KV-cache kernel has no mask, dropout or varlen
// path; it takes softcap, ALiBi, windows and both causal alignments. The rule
// reads shapes, dtype and strides only, so results do not depend on the
// thread count (the kernel's chunking is shape-only too); the same values in
// the two layouts may take different routes and differ by rounding.
// PYFASTATTN_CPU_FEW_ROWS=tiled (read once) keeps every dense forward on the
// tiled kernel, for A/B measurements (benchmarks/few_rows_route_ab.py).
bool few_rows_route_enabled() {
  static const bool on = !env_switch_is("PYFASTATTN_CPU_FEW_ROWS", "kvcache", "tiled");
  return on;
}

bool dense_forward_suits_kvcache_kernel(const AttentionFwdParams& p) {
  if (!few_rows_route_enabled()) return false;
  if (p.cu_seqlens_q || p.mask_kind != MaskKind::kNone || p.dropout_p > 0.0f) return false;
  if (p.num_heads_k <= 0 || p.seqlen_q <= 0 || p.seqlen_k <= 0) return false;
  const int64_t group = p.num_heads / p.num_heads_k;
  const int64_t rows = int64_t(p.seqlen_q) * group;  // query rows per kv head
  if (p.seqlen_q <= 8 && rows >= 2 && rows <= 32) return true;
  if (rows != 1) return false;
  if (p.num_heads_k > 1 && p.k_head_stride >= p.k_row_stride) return false;  // each head's rows contiguous
  if (p.dtype == DType::kBFloat16) return true;
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t kv_bytes =
      int64_t(p.batch) * p.seqlen_k * p.num_heads_k * (int64_t(p.head_dim) + p.head_dim_v) * elem;
  return kv_bytes >= (int64_t(16) << 20);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double softcap,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& dropout_rng, const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_attention_inputs(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                                  seqused_k, max_seqlen_q, max_seqlen_k);
  auto [out, lse] = empty_fwd_outputs(q, s);
  AttentionFwdParams p;
  fill_fwd_params(p, s, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  scale, softcap, window_left, window_right, bottom_right);
  fill_dropout_alibi(p, s, q, dropout_p, dropout_rng, alibi_slopes);
  if (dense_forward_suits_kvcache_kernel(p))
    cpu::attention_kvcache_fwd(p);
  else
    cpu::attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic, double dropout_p, const std::optional<at::Tensor>& dropout_rng,
    const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_attention_inputs(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                                  seqused_k, max_seqlen_q, max_seqlen_k);
  check_bwd_inputs(s, q, dout, out, lse);
  auto [dq, dk, dv] = empty_bwd_outputs(q, k, v, s);
  AttentionBwdParams p;
  fill_fwd_params(p, s, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  scale, softcap, window_left, window_right, bottom_right);
  fill_bwd_grads(p, dout, dq, dk, dv, deterministic);
  fill_dropout_alibi(p, s, q, dropout_p, dropout_rng, alibi_slopes);
  cpu::attention_bwd(p);
  return {dq, dk, dv};
}

// Debug only, O(b h sq sk): the keep pattern of dropout_keep (bool, True =
// kept) for every (sequence, head, row, key), the pattern the kernels apply
// for the same (seed, offset) and p. Rows and keys are those inside each
// sequence (varlen: relative to cu_seqlens, padded to max_seqlen).
at::Tensor dropout_mask_cpu(const at::Tensor& dropout_rng, double dropout_p, int64_t batch,
                            int64_t heads, int64_t seqlen_q, int64_t seqlen_k) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ",
                    dropout_p);
  TORCH_CHECK_VALUE(dropout_rng.scalar_type() == at::kLong && dropout_rng.dim() == 1 &&
                        dropout_rng.size(0) == 2,
                    "dropout_rng must be an int64 tensor of shape [2] (seed, offset), got ",
                    dropout_rng.scalar_type(), " of shape ", dropout_rng.sizes());
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
                    "sizes must be >= 0");
  const at::Tensor r = dropout_rng.contiguous();
  const DropoutKey key{static_cast<uint64_t>(r.data_ptr<int64_t>()[0]),
                       static_cast<uint64_t>(r.data_ptr<int64_t>()[1]), dropout_threshold(dropout_p)};
  at::Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, r.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, batch * heads * seqlen_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % seqlen_q, h = (row / seqlen_q) % heads, b = row / (seqlen_q * heads);
      bool* o = out + row * seqlen_k;
      for (int64_t j = 0; j < seqlen_k; ++j) o[j] = dropout_keep(key, b, h, i, j);
    }
  });
  return keep;
}

// The peak probes (cpu/peak_probe.h) on every thread of torch's pool at once;
// the caller times the call. cpu_peak_probe returns the floating-point
// operations done by all threads together, cpu_read_probe the sum of the
// buffer (each thread reads one contiguous slice of it once; prefetch_bytes
// > 0: with software prefetches that far ahead, cpu/peak_probe.h).
double cpu_peak_probe(c10::string_view kind, int64_t iters) {
  const std::string k(kind);
  TORCH_CHECK_VALUE(cpu::peak_probe_isa(k.c_str()) != nullptr,
                    "kind must be 'fp32_fma' or 'bf16_dot', got '", k, "'");
  TORCH_CHECK_VALUE(iters >= 1, "iters must be >= 1, got ", iters);
  const int64_t threads = at::get_num_threads();
  std::vector<double> flops(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) flops[t] = cpu::peak_probe_run(k.c_str(), iters);
  });
  double total = 0.0;
  for (double f : flops) total += f;
  return total;
}

std::string cpu_peak_probe_isa(c10::string_view kind) {
  const std::string k(kind);
  const char* isa = cpu::peak_probe_isa(k.c_str());
  TORCH_CHECK_VALUE(isa != nullptr, "kind must be 'fp32_fma' or 'bf16_dot', got '", k, "'");
  return isa;
}

// Where the streaming CPU kernels' software prefetches go on this machine
// (cpu/simd.h, cpu_stream_prefetch_to_l2; PYFASTATTN_CPU_PREFETCH): "l1" or
// "l2", "none" off x86. For benchmark records and tests.
std::string cpu_prefetch_level() {
#if PFA_X86
  return cpu::cpu_stream_prefetch_to_l2() ? "l2" : "l1";
#else
  return "none";
#endif
}

double cpu_read_probe(const at::Tensor& buf, int64_t prefetch_bytes) {
  TORCH_CHECK_VALUE(buf.device().is_cpu() && buf.layout() == at::kStrided && buf.has_storage() &&
                        buf.scalar_type() == at::kFloat && buf.is_contiguous(),
                    "buf must be a contiguous float32 CPU tensor, got ", buf.scalar_type(), " on ",
                    buf.device(), buf.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK_VALUE(prefetch_bytes >= 0 && prefetch_bytes % 64 == 0 && prefetch_bytes <= (1 << 20),
                    "prefetch_bytes must be a multiple of 64 in [0, 1048576], got ", prefetch_bytes);
  const size_t pf = static_cast<size_t>(prefetch_bytes / 4);
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel(), threads = at::get_num_threads();
  std::vector<double> sums(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      sums[t] = cpu::read_probe_run(p + lo, static_cast<size_t>(hi - lo), pf);
    }
  });
  double total = 0.0;
  for (double s : sums) total += s;
  return total;
}

}  // namespace

TORCH_LIBRARY(pyfastattn, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float scale, "
      "float softcap, int window_left, int window_right, bool bottom_right, float dropout_p=0., "
      "Tensor? dropout_rng=None, Tensor? alibi_slopes=None) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, float softcap, int window_left, "
      "int window_right, bool bottom_right, bool deterministic, float dropout_p=0., "
      "Tensor? dropout_rng=None, Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dropout_mask(Tensor dropout_rng, float dropout_p, int batch, int heads, int seqlen_q, "
      "int seqlen_k) -> Tensor");
  // Combines two partial attentions over disjoint key sets by their LSE
  // (csrc/merge/params.h); CPU and CUDA implementations register in their own files.
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor, Tensor)");
  // The machine's limits for the benchmarks (cpu/peak_probe.h); not for models.
  m.def("cpu_peak_probe(str kind, int iters) -> float", &cpu_peak_probe);
  m.def("cpu_peak_probe_isa(str kind) -> str", &cpu_peak_probe_isa);
  m.def("cpu_read_probe(Tensor buf, int prefetch_bytes=0) -> float", &cpu_read_probe);
  m.def("cpu_prefetch_level() -> str", &cpu_prefetch_level);
}

TORCH_LIBRARY_IMPL(pyfastattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace pyfastattn

// A plain CPython module: importing pyfastattn._C runs the registrations above.
// Build facts come from setup.py as macros, so `python -m pyfastattn.info`
// reports what was really compiled.
#ifndef PYFASTATTN_CUDA_ARCHS
#define PYFASTATTN_CUDA_ARCHS ""
#endif

static PyModuleDef pyfastattn_module = {PyModuleDef_HEAD_INIT, "_C",
                                        "pyfastattn compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  // The small-call fast paths (attention/fast_call.cpp).
  pyfastattn_module.m_methods = pyfastattn::fast_call_methods();
  PyObject* m = PyModule_Create(&pyfastattn_module);
  if (m == nullptr) return nullptr;
#ifdef PYFASTATTN_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", PYFASTATTN_CUDA_ARCHS) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
