// CUDA implementation of pyfastattn::attention_fwd: device guard, current
// stream, layout fix-ups the kernel needs, launch check. The kernels
// themselves (csrc/cuda/attention/*.cu) include no torch headers.
//
// attention_bwd_cuda does the same for the backward and allocates its fp32
// workspace (per-row lse * log2(e) and D, the dQ accumulator, and in
// deterministic mode the per-query-block semaphores).
// c10/cuda headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS and cuSPARSE
// headers, which a CUDA toolkit without those libraries (seen on the build
// machine) lacks, and which this file does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../attention/api.h"
#include "attention/attention_bwd.h"
#include "attention/attention_fwd.h"
#include "launch_check.h"

namespace pyfastattn {
namespace {

// The kernels move 16-byte vectors (cp.async, ld/st.global.v4): every q, k,
// v, out, dout, dq, dk, dv row starts 16-byte aligned, i.e. the base pointer
// (storage offset included) is 16-byte aligned and every stride but the last
// is a multiple of 8 elements; the head dim is a multiple of 8.
bool kernel_layout_ok(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || t.size(-1) % 8 != 0) return false;
  // Size-1 dims too: the kernels multiply every index by its stride, and
  // require_aligned checks the strides as the params carry them.
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % 8 != 0) return false;
  return true;
}

// `t` itself when kernel_layout_ok, else a fresh contiguous copy (the caching
// allocator's blocks start 512-byte aligned) with the head dim zero-padded to
// `padded_dim` (which changes no score or output column). Not t.contiguous():
// that returns a contiguous tensor unchanged whatever its storage offset, and
// a view such as buf.view(-1)[4:].view(b, s, h, d) then reached the 16-byte
// cp.async misaligned: a fault that loses the process's CUDA context.
at::Tensor kernel_layout(const at::Tensor& t, int64_t padded_dim) {
  if (padded_dim == t.size(-1) && kernel_layout_ok(t)) return t;
  at::Tensor r = padded_dim != t.size(-1)
                     ? at::constant_pad_nd(t, {0, padded_dim - t.size(-1)}, 0)
                     : t.clone(at::MemoryFormat::Contiguous);
  if (!kernel_layout_ok(r)) r = r.clone(at::MemoryFormat::Contiguous);
  return r;
}

// The last line of defence before a launch: every pointer a kernel reads or
// writes with vectors of `align` bytes is aligned, and every row stride keeps
// it so. An error that names the tensor, never a fault that loses the CUDA
// context.
void require_aligned(const char* name, const void* ptr, int64_t align,
                     std::initializer_list<int64_t> strides = {}, int64_t elem_bytes = 2) {
  TORCH_CHECK(ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % align == 0,
              "pyfastattn CUDA attention: ", name, " at address ", ptr, " is not ", align,
              "-byte aligned, which the kernel's vector loads and stores need (internal error: "
              "the glue should have copied it)");
  for (const int64_t st : strides)
    TORCH_CHECK((st * elem_bytes) % align == 0, "pyfastattn CUDA attention: a row stride of ", name,
                " (", st, " elements) breaks its ", align,
                "-byte alignment (internal error: the glue should have copied it)");
}

void check_fwd_pointers(const AttentionFwdParams& p) {
  require_aligned("q", p.q, 16, {p.q_batch_stride, p.q_row_stride, p.q_head_stride});
  require_aligned("k", p.k, 16, {p.k_batch_stride, p.k_row_stride, p.k_head_stride});
  require_aligned("v", p.v, 16, {p.v_batch_stride, p.v_row_stride, p.v_head_stride});
  require_aligned("out", p.o, 16, {p.o_batch_stride, p.o_row_stride, p.o_head_stride});
  require_aligned("lse", p.lse, 4);
}

int64_t round_up8(int64_t x) { return (x + 7) / 8 * 8; }

const char* dtype_name(DType t) {
  return t == DType::kFloat16 ? "float16" : t == DType::kBFloat16 ? "bfloat16" : "float32";
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double softcap,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& dropout_rng, const std::optional<at::Tensor>& alibi_slopes) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionShape s = check_attention_inputs(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                                  seqused_k, max_seqlen_q, max_seqlen_k);
  TORCH_CHECK_VALUE(s.head_dim == s.head_dim_v,
                    "CUDA attention kernel: v.shape[-1] must equal q.shape[-1] (", s.head_dim,
                    "), got ", s.head_dim_v);
  const int64_t dpad = round_up8(s.head_dim);
  const at::Tensor qk = kernel_layout(q, dpad), kk = kernel_layout(k, dpad),
                   vk = kernel_layout(v, dpad);
  AttentionShape sk = s;
  sk.head_dim = sk.head_dim_v = dpad;
  auto [out, lse] = empty_fwd_outputs(qk, sk);
  AttentionFwdParams p;
  fill_fwd_params(p, sk, qk, kk, vk, out, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  scale, softcap, window_left, window_right, bottom_right);
  // Dropout and ALiBi (issue 17); the (seed, offset) pair may live on the GPU.
  fill_dropout_alibi(p, sk, qk, dropout_p, dropout_rng, alibi_slopes);
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  const int sm = major * 10 + minor;
  const char* reason = cuda::attention_fwd_unsupported_reason(p, sm);
  TORCH_CHECK(reason == nullptr, "pyfastattn CUDA attention kernel does not support this case: ",
              reason);
  if (out.numel() > 0 || lse.numel() > 0) {
    check_fwd_pointers(p);
    check_launch(cuda::attention_fwd(p, c10::cuda::getCurrentCUDAStream(q.get_device()).stream()),
                 "attention_fwd_kernel (", dtype_name(p.dtype), ", head_dim ", p.head_dim,
                 ", batch ", p.batch, ", heads ", p.num_heads, ", seqlen_q ", p.seqlen_q,
                 ", seqlen_k ", p.seqlen_k, p.mask_kind != MaskKind::kNone ? ", attn_mask" : "",
                 ")");
  }
  // Contiguous, so the output's strides match the fake (meta) implementation.
  if (dpad != s.head_dim) out = out.narrow(-1, 0, s.head_dim).contiguous();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic, double dropout_p, const std::optional<at::Tensor>& dropout_rng,
    const std::optional<at::Tensor>& alibi_slopes) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionShape s = check_attention_inputs(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                                  seqused_k, max_seqlen_q, max_seqlen_k);
  check_bwd_inputs(s, q, dout, out, lse);
  TORCH_CHECK_VALUE(s.head_dim == s.head_dim_v,
                    "CUDA attention kernel: v.shape[-1] must equal q.shape[-1] (", s.head_dim,
                    "), got ", s.head_dim_v);
  const int64_t dpad = round_up8(s.head_dim);
  const at::Tensor qk = kernel_layout(q, dpad), kk = kernel_layout(k, dpad),
                   vk = kernel_layout(v, dpad), ok = kernel_layout(out, dpad),
                   dok = kernel_layout(dout, dpad);
  AttentionShape sk = s;
  sk.head_dim = sk.head_dim_v = dpad;
  auto [dq, dk, dv] = empty_bwd_outputs(qk, kk, vk, sk);
  cuda::AttentionBwdKernelParams p{};
  fill_fwd_params(p, sk, qk, kk, vk, ok, lse, attn_mask, cu_seqlens_q, cu_seqlens_k, seqused_k,
                  scale, softcap, window_left, window_right, bottom_right);
  fill_bwd_grads(p, dok, dq, dk, dv, deterministic);
  fill_dropout_alibi(p, sk, qk, dropout_p, dropout_rng, alibi_slopes);
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  const char* reason = cuda::attention_bwd_unsupported_reason(p, major * 10 + minor);
  TORCH_CHECK(reason == nullptr, "pyfastattn CUDA attention kernel does not support this case: ",
              reason);

  // Workspace, one allocation: [lse_log2 | dsum] per query row and head, then
  // (from a multiple of 4 floats: 16-byte aligned) the fp32 dQ accumulator
  // laid out like dq, [rows, hq, dpad] contiguous.
  const int64_t rows = s.varlen ? s.total_q : s.batch * s.seqlen_q;
  const int64_t stat = rows * s.heads;
  const int64_t acc_offset = (2 * stat + 3) / 4 * 4;
  const at::Tensor ws =
      at::empty({acc_offset + rows * s.heads * dpad}, q.options().dtype(at::kFloat));
  p.lse_log2 = ws.data_ptr<float>();
  p.dsum = p.lse_log2 + stat;
  p.ws_head_stride = s.varlen ? s.total_q : s.seqlen_q;
  p.ws_batch_stride = s.varlen ? 0 : s.heads * s.seqlen_q;
  p.dq_accum = p.lse_log2 + acc_offset;
  p.dqa_head_stride = dpad;
  p.dqa_row_stride = s.heads * dpad;
  p.dqa_batch_stride = s.varlen ? 0 : s.seqlen_q * s.heads * dpad;
  at::Tensor sem;
  p.m_blocks = 0;
  p.dq_semaphore = nullptr;
  p.cta_ticket = nullptr;
  if (deterministic) {
    // One zeroed allocation: the semaphores, then the main kernel's
    // start-ticket counter (AttentionBwdKernelParams).
    const int block_m = cuda::attention_bwd_block_m(p);
    p.m_blocks = static_cast<int32_t>((s.seqlen_q + block_m - 1) / block_m);
    const int64_t sems = std::max<int64_t>(1, s.batch * s.heads * p.m_blocks);
    sem = at::zeros({sems + 1}, q.options().dtype(at::kInt));
    p.dq_semaphore = sem.data_ptr<int32_t>();
    p.cta_ticket = reinterpret_cast<uint32_t*>(p.dq_semaphore + sems);
  }
  if (dq.numel() > 0 || dk.numel() > 0) {
    check_fwd_pointers(p);
    require_aligned("dout", p.dout, 16, {p.do_batch_stride, p.do_row_stride, p.do_head_stride});
    require_aligned("dq", p.dq, 16, {p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride});
    require_aligned("dk", p.dk, 16, {p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride});
    require_aligned("dv", p.dv, 16, {p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride});
    require_aligned("the dQ accumulator", p.dq_accum, 16,
                    {p.dqa_batch_stride, p.dqa_row_stride, p.dqa_head_stride}, 4);
    require_aligned("the lse / D workspace", p.lse_log2, 4);
    require_aligned("the dQ semaphores", p.dq_semaphore, 4);
    require_aligned("the CTA ticket counter", p.cta_ticket, 4);
    const char* failed = "attention_bwd";
    check_launch(
        cuda::attention_bwd(p, c10::cuda::getCurrentCUDAStream(q.get_device()).stream(), &failed),
        failed, " (", dtype_name(p.dtype), ", head_dim ", p.head_dim, ", batch ", p.batch,
        ", heads ", p.num_heads, "/", p.num_heads_k, ", seqlen_q ", p.seqlen_q, ", seqlen_k ",
        p.seqlen_k, p.mask_kind != MaskKind::kNone ? ", attn_mask" : "",
        deterministic ? ", deterministic" : "", ")");
  }
  if (dpad != s.head_dim) {
    dq = dq.narrow(-1, 0, s.head_dim).contiguous();
    dk = dk.narrow(-1, 0, s.head_dim).contiguous();
    dv = dv.narrow(-1, 0, s.head_dim).contiguous();
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastattn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace pyfastattn
