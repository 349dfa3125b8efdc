#include "api.h"

#include "../attention/api.h"  // to_dtype

namespace pyfastattn {

namespace {

void check_out(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must have 4 dims [b, s, h, d], got ", t.dim());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ".shape must equal out_a.shape (", ref.sizes(),
                    "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ".device must equal out_a.device (",
                    ref.device(), "), got ", t.device());
  // A size-1 last dim may carry any stride (torch calls such a tensor
  // contiguous, and .contiguous() leaves it as is): the kernel reads only
  // its element 0.
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dimension, got stride ", t.stride(-1));
  (void)to_dtype(t.scalar_type());
}

void check_lse(const at::Tensor& t, const char* name, const at::Tensor& out) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, ".dtype must be torch.float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == out.device(), name, ".device must equal out_a.device (",
                    out.device(), "), got ", t.device());
  const std::vector<int64_t> want{out.size(0), out.size(2), out.size(1)};
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), name, ".shape must be [b, h, s] = ",
                    at::IntArrayRef(want), ", got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prepare_merge(MergeParams& p, const at::Tensor& out_a,
                                                 const at::Tensor& lse_a, const at::Tensor& out_b,
                                                 const at::Tensor& lse_b) {
  check_out(out_a, "out_a", out_a);
  check_out(out_b, "out_b", out_a);
  check_lse(lse_a, "lse_a", out_a);
  check_lse(lse_b, "lse_b", out_a);
  at::Tensor out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  p.out_a = out_a.data_ptr();
  p.out_b = out_b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = out_a.size(0);
  p.seqlen = out_a.size(1);
  p.heads = out_a.size(2);
  p.head_dim = out_a.size(3);
  p.a_batch_stride = out_a.stride(0);
  p.a_row_stride = out_a.stride(1);
  p.a_head_stride = out_a.stride(2);
  p.b_batch_stride = out_b.stride(0);
  p.b_row_stride = out_b.stride(1);
  p.b_head_stride = out_b.stride(2);
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.la_batch_stride = lse_a.stride(0);
  p.la_head_stride = lse_a.stride(1);
  p.la_row_stride = lse_a.stride(2);
  p.lb_batch_stride = lse_b.stride(0);
  p.lb_head_stride = lse_b.stride(1);
  p.lb_row_stride = lse_b.stride(2);
  p.lo_batch_stride = lse.stride(0);
  p.lo_head_stride = lse.stride(1);
  p.lo_row_stride = lse.stride(2);
  p.a_dtype = to_dtype(out_a.scalar_type());
  p.b_dtype = to_dtype(out_b.scalar_type());
  return {out, lse};
}

}  // namespace pyfastattn
