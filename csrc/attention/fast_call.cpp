// The small-call fast paths of pyfastattn.attention and
// pyfastattn.attention_with_kvcache: one C++ function each that makes, in one
// pass, every check the Python path makes for the common case (plain dense CPU
// tensors, no varlen / key lengths / dropout / ALiBi), then calls the op
// through the dispatcher with unboxed arguments.
//
// Why: at decode sizes the fixed cost of a call decides the speed. Measured
// (PERF_NOTES.md, "The fixed cost of a call"; B1 H8 Sq1 Sk128 D64 fp32, one
// thread) the Python path cost ~11 us of checks and routing, and the op's
// torch.library autograd layer (a Python kernel at the Autograd key, which
// also boxes every argument twice) ~5.7 us, around a ~14 us op.
//
// Each function returns None whenever anything is outside the common case
// (another device or dtype, a tensor subclass or a __torch_function__ mode,
// functorch wrappers, a dispatch mode, an argument of an unexpected type, any
// check that fails). Python then runs its full path, which raises the named
// pyfastattn.InvalidArgumentError or falls back exactly as before: this file
// never raises a validation error of its own, and never decides a route that
// the Python path would decide differently. Errors of the op itself (its
// memory-safety checks, csrc/attention/api.cpp) propagate as from torch.ops.
//
// The op is called through the dispatcher, so profiler records, dispatch
// modes and the CPU / CUDA / Meta kernels see the same call as from
// torch.ops. Only when no input requires grad (or grad mode is off), no
// dispatch key is pushed in thread-local state and the tensors are plain, the
// call goes below the Autograd key, as the torch.library autograd kernel
// itself does then (torch/_library/autograd.py, forward_no_grad).
#include "fast_call.h"
#include "op_handles.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace pyfastattn {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The dispatch keys of a plain dense CPU tensor, autograd keys aside (an
// inference tensor has none of those).
bool plain_cpu_keys(const at::Tensor& t) {
  static const c10::DispatchKeySet plain =
      at::empty({0}, at::TensorOptions().dtype(at::kFloat)).key_set() |
      c10::autograd_dispatch_keyset_with_ADInplaceOrView;
  return (t.key_set() | c10::autograd_dispatch_keyset_with_ADInplaceOrView) == plain;
}

// An exact torch.Tensor, plain dense CPU; nullptr otherwise.
const at::Tensor* plain_cpu(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || !plain_cpu_keys(t)) return nullptr;
  return &t;
}

bool kernel_dtype_cpu(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The first three arguments, when each is a plain dense CPU tensor (see
// plain_cpu), 4-D, of one kernel dtype, and no __torch_function__ mode is
// active; false otherwise (the caller returns None).
bool plain_cpu_triple(PyObject* const* args, const at::Tensor*& a, const at::Tensor*& b, const at::Tensor*& c) {
  a = plain_cpu(args[0]);
  b = plain_cpu(args[1]);
  c = plain_cpu(args[2]);
  if (!a || !b || !c || at::impl::torch_function_mode_enabled()) return false;
  if (a->dim() != 4 || b->dim() != 4 || c->dim() != 4) return false;
  const at::ScalarType dt = a->scalar_type();
  return kernel_dtype_cpu(dt) && b->scalar_type() == dt && c->scalar_type() == dt;
}

// A Python int (exact type, so not a bool) that fits int64; false otherwise.
bool exact_int(PyObject* o, int64_t& out) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  out = v;
  return true;
}

// A Python float or int (exact types); false otherwise.
bool exact_number(PyObject* o, double& out) {
  if (PyFloat_CheckExact(o)) {
    out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  int64_t i = 0;
  if (!exact_int(o, i)) return false;
  out = static_cast<double>(i);
  return true;
}

// Python truthiness; false (and no error) when the object has none.
bool truth(PyObject* o, bool& out) {
  const int r = PyObject_IsTrue(o);
  if (r < 0) {
    PyErr_Clear();
    return false;
  }
  out = r != 0;
  return true;
}

// window_size: a tuple or list of two ints (Python's isinstance(w, int), so a
// bool passes as there), as _check_window_softcap_scale accepts it.
bool window_pair(PyObject* o, int64_t& left, int64_t& right) {
  if (!(PyTuple_CheckExact(o) || PyList_CheckExact(o)) || PySequence_Fast_GET_SIZE(o) != 2) return false;
  PyObject* const* items = PySequence_Fast_ITEMS(o);
  int64_t w[2];
  for (int i = 0; i < 2; ++i) {
    if (!PyLong_Check(items[i])) return false;
    int overflow = 0;
    w[i] = PyLong_AsLongLongAndOverflow(items[i], &overflow);
    if (overflow != 0 || (w[i] == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
  }
  left = w[0];
  right = w[1];
  return true;
}

// softmax_scale / scale: None (1/sqrt(d)) or a finite number, as the Python
// path accepts it.
bool scale_arg(PyObject* scale_o, int64_t d, double& scale) {
  if (scale_o == Py_None) {
    if (d <= 0) return false;
    scale = 1.0 / std::sqrt(static_cast<double>(d));
    return true;
  }
  return exact_number(scale_o, scale) && std::isfinite(scale);
}

// softcap (finite, >= 0) and softmax_scale, as _check_window_softcap_scale.
bool softcap_scale(PyObject* softcap_o, PyObject* scale_o, int64_t d, double& softcap, double& scale) {
  if (!exact_number(softcap_o, softcap) || !(softcap >= 0.0 && std::isfinite(softcap))) return false;
  return scale_arg(scale_o, d, scale);
}

// Releases the GIL for the op (as torch.ops and torch's own functions do);
// taken back on every exit, exceptions included.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// Whether the call may go straight below the Autograd key: nothing needs a
// gradient, and nothing (a dispatch mode, functorch) pushed keys in
// thread-local state.
bool below_autograd_ok(std::initializer_list<const at::Tensor*> ts) {
  // (BackendSelect and ADInplaceOrView are always included.)
  if (!(c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty()) return false;
  if (!at::GradMode::is_enabled()) return true;
  for (const at::Tensor* t : ts)
    if (t->requires_grad()) return false;
  return true;
}

PyObject* wrap_result(std::tuple<at::Tensor, at::Tensor>&& r, bool return_lse) {
  if (!return_lse) return THPVariable_Wrap(std::move(std::get<0>(r)));
  PyObject* out = THPVariable_Wrap(std::move(std::get<0>(r)));
  if (out == nullptr) return nullptr;
  PyObject* lse = THPVariable_Wrap(std::move(std::get<1>(r)));
  if (lse == nullptr) {
    Py_DECREF(out);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, out, lse);
  Py_DECREF(out);
  Py_DECREF(lse);
  return pair;
}

// torch.ops.pyfastattn.attention_fwd(q, k, v, ...) for the dense call
// without mask, key lengths, dropout or ALiBi, through the dispatcher.
std::tuple<at::Tensor, at::Tensor> call_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, int64_t sq, int64_t sk,
                                                      double scale, double softcap, int64_t wl, int64_t wr,
                                                      bool bottom_right) {
  const auto& op = attention_fwd_op();
  const bool below = below_autograd_ok({&q, &k, &v});
  ReleaseGil nogil;
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  if (below) guard.emplace();
  return op.call(q, k, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt, sq, sk, scale, softcap, wl, wr,
                 bottom_right, 0.0, std::nullopt, std::nullopt);
}

// attention_fast(q, k, v, causal, window_size, softcap, softmax_scale,
//                return_lse, dropout_p) -> out | (out, lse) | None
// The dense call of pyfastattn.attention without cu_seqlens, seqused_k,
// alibi_slopes or return_dropout_mask (Python checks those are absent, the
// backend is not "reference" and torch.compile is not tracing).
PyObject* attention_fast(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9) {
    PyErr_SetString(PyExc_TypeError, "attention_fast takes 9 arguments");
    return nullptr;
  }
  const at::Tensor *qp, *kp, *vp;
  if (!plain_cpu_triple(args, qp, kp, vp)) Py_RETURN_NONE;
  const at::Tensor &q = *qp, &k = *kp, &v = *vp;
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t sk = k.size(1), hk = k.size(2);
  if (k.size(3) != d || v.size(2) != hk || hk <= 0 || hq % hk != 0) Py_RETURN_NONE;
  if (k.size(0) != b || v.size(0) != b || v.size(1) != sk) Py_RETURN_NONE;
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) Py_RETURN_NONE;  // the reference's case
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) Py_RETURN_NONE;
  bool causal = false, return_lse = false;
  int64_t wl = -1, wr = -1;
  double softcap = 0.0, scale = 0.0, dropout_p = 0.0;
  if (!truth(args[3], causal) || !window_pair(args[4], wl, wr) ||
      !softcap_scale(args[5], args[6], d, softcap, scale) || !truth(args[7], return_lse) ||
      !exact_number(args[8], dropout_p) || dropout_p != 0.0)
    Py_RETURN_NONE;
  if (causal) wr = 0;
  if (wl < 0) wl = -1;
  if (wr < 0) wr = -1;

  return wrap_result(call_attention_fwd(q, k, v, sq, sk, scale, softcap, wl, wr, /*bottom_right=*/true), return_lse);
  END_HANDLE_TH_ERRORS
}

// sdpa_fast(query, key, value, dropout_p, is_causal, scale, enable_gqa)
//     -> out | None
// pyfastattn.scaled_dot_product_attention with attn_mask None (Python checks
// that, the backend and torch.compile) on 4-D (B, H, L, E) tensors with equal
// batch sizes: the (B, L, H, E) views of the Python path, top-left causal.
PyObject* sdpa_fast(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "sdpa_fast takes 7 arguments");
    return nullptr;
  }
  const at::Tensor *qp, *kp, *vp;
  if (!plain_cpu_triple(args, qp, kp, vp)) Py_RETURN_NONE;
  const at::Tensor &query = *qp, &key = *kp, &value = *vp;
  const int64_t b = query.size(0), hq = query.size(1), lq = query.size(2), e = query.size(3);
  const int64_t hk = key.size(1), sk = key.size(2);
  if (key.size(0) != b || value.size(0) != b) Py_RETURN_NONE;  // broadcast batches: the Python path
  if (key.size(3) != e || value.size(2) != sk || value.size(1) != hk) Py_RETURN_NONE;
  if (query.numel() == 0 || key.numel() == 0 || value.numel() == 0) Py_RETURN_NONE;
  if (query.stride(3) != 1 || key.stride(3) != 1 || value.stride(3) != 1) Py_RETURN_NONE;
  bool causal = false, gqa = false;
  double dropout_p = 0.0, scale = 0.0;
  if (!exact_number(args[3], dropout_p) || dropout_p != 0.0 || !truth(args[4], causal) || !truth(args[6], gqa))
    Py_RETURN_NONE;
  // Heads: equal, or a multiple with enable_gqa (one key head without it is
  // broadcast by the Python path).
  if (hk <= 0 || (gqa ? hq % hk != 0 : hk != hq)) Py_RETURN_NONE;
  if (!scale_arg(args[5], e, scale)) Py_RETURN_NONE;
  auto r = call_attention_fwd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), lq, sk, scale,
                              0.0, -1, causal ? 0 : -1, /*bottom_right=*/false);
  // As the Python path: back to (B, H, L, Ev) by a transpose and a reshape
  // (which gives the strides of size-1 dims the same values as there).
  const at::Tensor& out = std::get<0>(r);
  return THPVariable_Wrap(out.transpose(1, 2).reshape({b, hq, lq, out.size(3)}));
  END_HANDLE_TH_ERRORS
}

// An optional int32 (batch,) metadata tensor: None, or plain CPU of that shape.
bool int32_vector(PyObject* o, int64_t batch, OptTensor& out) {
  if (o == Py_None) return true;
  const at::Tensor* t = plain_cpu(o);
  if (!t || t->scalar_type() != at::kInt || t->dim() != 1 || t->size(0) != batch) return false;
  out = *t;
  return true;
}

// attention_kvcache_fast(q, k_cache, v_cache, k, v, cache_seqlens,
//     cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin,
//     rotary_interleaved, causal, window_size, softcap, softmax_scale,
//     alibi_slopes, return_lse, num_splits) -> out | (out, lse) | None
// pyfastattn.attention_with_kvcache on plain CPU tensors without ALiBi (Python
// checks the backend is not "reference" and torch.compile is not tracing).
PyObject* attention_kvcache_fast(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 19) {
    PyErr_SetString(PyExc_TypeError, "attention_kvcache_fast takes 19 arguments");
    return nullptr;
  }
  if (args[16] != Py_None) Py_RETURN_NONE;  // alibi_slopes: the Python path
  const at::Tensor *qp, *kcp, *vcp;
  if (!plain_cpu_triple(args, qp, kcp, vcp)) Py_RETURN_NONE;
  const at::Tensor &q = *qp, &k_cache = *kcp, &v_cache = *vcp;
  const at::ScalarType dt = q.scalar_type();
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t hk = k_cache.size(2);
  if (k_cache.size(3) != d || v_cache.size(0) != k_cache.size(0) || v_cache.size(1) != k_cache.size(1) ||
      v_cache.size(2) != hk || hk <= 0 || hq % hk != 0)
    Py_RETURN_NONE;
  if (q.stride(3) != 1) Py_RETURN_NONE;
  OptTensor k, v;
  if ((args[3] == Py_None) != (args[4] == Py_None)) Py_RETURN_NONE;
  if (args[3] != Py_None) {
    const at::Tensor* kp = plain_cpu(args[3]);
    const at::Tensor* vp = plain_cpu(args[4]);
    if (!kp || !vp || kp->scalar_type() != dt || vp->scalar_type() != dt) Py_RETURN_NONE;
    if (kp->dim() != 4 || kp->size(0) != b || kp->size(2) != hk || kp->size(3) != d) Py_RETURN_NONE;
    if (vp->dim() != 4 || vp->size(0) != b || vp->size(1) != kp->size(1) || vp->size(2) != hk ||
        vp->size(3) != v_cache.size(3))
      Py_RETURN_NONE;
    if (kp->stride(3) != 1 || vp->stride(3) != 1) Py_RETURN_NONE;
    k = *kp;
    v = *vp;
  }
  OptTensor block_table, cache_batch_idx, cache_leftpad;
  int64_t capacity = k_cache.size(1);
  if (args[8] != Py_None) {
    const at::Tensor* bt = plain_cpu(args[8]);
    if (!bt || bt->scalar_type() != at::kInt || bt->dim() != 2 || bt->size(0) != b || args[6] != Py_None)
      Py_RETURN_NONE;
    block_table = *bt;
    capacity = bt->size(1) * k_cache.size(1);
  } else if (args[6] == Py_None && k_cache.size(0) != b) {
    Py_RETURN_NONE;
  }
  if (!int32_vector(args[6], b, cache_batch_idx) || !int32_vector(args[7], b, cache_leftpad)) Py_RETURN_NONE;
  // cache_seqlens: an int (every sequence), an int32 (batch,) tensor, or None
  // (the whole cache; only without new keys).
  at::Tensor cache_seqlens;
  int64_t seqlen_all = 0;
  if (args[5] == Py_None) {
    if (k.has_value()) Py_RETURN_NONE;
    seqlen_all = capacity;
  } else if (!exact_int(args[5], seqlen_all)) {
    OptTensor t;
    if (!int32_vector(args[5], b, t) || !t.has_value()) Py_RETURN_NONE;
    cache_seqlens = *t;
  }
  if (!cache_seqlens.defined() && (seqlen_all < INT32_MIN || seqlen_all > INT32_MAX)) Py_RETURN_NONE;
  OptTensor rotary_cos, rotary_sin;
  if ((args[9] == Py_None) != (args[10] == Py_None)) Py_RETURN_NONE;
  if (args[9] != Py_None) {
    const at::Tensor* cs = plain_cpu(args[9]);
    const at::Tensor* sn = plain_cpu(args[10]);
    if (!cs || !sn || !k.has_value() || cs->dim() != 2 || sn->sizes() != cs->sizes() ||
        sn->scalar_type() != cs->scalar_type() || (cs->scalar_type() != dt && cs->scalar_type() != at::kFloat) ||
        !(0 < 2 * cs->size(1) && 2 * cs->size(1) <= d))
      Py_RETURN_NONE;
    rotary_cos = *cs;
    rotary_sin = *sn;
  }
  bool rotary_interleaved = true, causal = false, return_lse = false;
  int64_t wl = -1, wr = -1, num_splits = 0;
  double softcap = 0.0, scale = 0.0;
  if (!truth(args[11], rotary_interleaved) || !truth(args[12], causal) || !window_pair(args[13], wl, wr) ||
      !softcap_scale(args[14], args[15], d, softcap, scale) || !truth(args[17], return_lse) ||
      !exact_int(args[18], num_splits) || num_splits < 0)
    Py_RETURN_NONE;
  // FlashAttention 2's window rules, as kvcache.py applies them: windows wider
  // than the cache are no window; without causal a left-only window gets the
  // right bound capacity (it cuts keys only when Sq > capacity + 1).
  wl = (0 <= wl && wl < capacity) ? wl : -1;
  wr = (0 <= wr && wr < capacity) ? wr : -1;
  if (causal)
    wr = 0;
  else if (wl >= 0 && wr < 0 && sq > capacity + 1)
    wr = capacity;

  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyfastattn::attention_kvcache_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
              const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, bool, double, double, int64_t, int64_t, int64_t, const OptTensor&)>();
  std::tuple<at::Tensor, at::Tensor> r;
  {
    ReleaseGil nogil;
    if (!cache_seqlens.defined())
      cache_seqlens = at::full({b}, seqlen_all, at::TensorOptions().dtype(at::kInt));
    // Through the full dispatch: the op writes the cache in place and has no
    // autograd formula, so the Autograd / ADInplaceOrView keys do what they
    // do for torch.ops.
    r = op.call(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
                rotary_sin, rotary_interleaved, scale, softcap, wl, wr, num_splits, std::nullopt);
  }
  return wrap_result(std::move(r), return_lse);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"attention_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_fast)), METH_FASTCALL,
     "The small-call fast path of pyfastattn.attention (None: take the Python path)."},
    {"sdpa_fast", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sdpa_fast)), METH_FASTCALL,
     "The small-call fast path of pyfastattn.scaled_dot_product_attention (None: take the Python path)."},
    {"attention_kvcache_fast",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention_kvcache_fast)), METH_FASTCALL,
     "The small-call fast path of pyfastattn.attention_with_kvcache (None: take the Python path)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* fast_call_methods() { return methods; }

}  // namespace pyfastattn
