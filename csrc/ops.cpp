// Op schemas (defined once), the CPU implementations, and the module init.
//
// torch.ops.pyfastattn.attention_fwd / attention_bwd take the canonical form
// described in csrc/attention/params.h. pyfastattn/_ops.py adds register_fake
// and register_autograd; pyfastattn/functional.py maps both public APIs here.
#include <Python.h>
#include <torch/library.h>

#include "attention/api.h"
#include "cpu/attention_cpu.h"

namespace pyfastattn {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double softcap,
    int64_t window_left, int64_t window_right, bool bottom_right) {
  const AttentionShape s = check_attention_inputs(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                                  seqused_k, max_seqlen_q, max_seqlen_k);
  auto [out, lse] = empty_fwd_outputs(q, s);
  AttentionFwdParams p;
  fill_fwd_params(p, s, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  scale, softcap, window_left, window_right, bottom_right);
  cpu::attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic) {
  const AttentionShape s = check_attention_inputs(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                                  seqused_k, max_seqlen_q, max_seqlen_k);
  check_bwd_inputs(s, q, dout, out, lse);
  auto [dq, dk, dv] = empty_bwd_outputs(q, k, v, s);
  AttentionBwdParams p;
  fill_fwd_params(p, s, q, k, v, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  scale, softcap, window_left, window_right, bottom_right);
  fill_bwd_grads(p, dout, dq, dk, dv, deterministic);
  cpu::attention_bwd(p);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(pyfastattn, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float scale, "
      "float softcap, int window_left, int window_right, bool bottom_right) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, float softcap, int window_left, "
      "int window_right, bool bottom_right, bool deterministic) -> (Tensor, Tensor, Tensor)");
  // Combines two partial attentions over disjoint key sets by their LSE
  // (csrc/merge/params.h); CPU and CUDA implementations register in their own files.
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyfastattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
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
