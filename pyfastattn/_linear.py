"""``pyfastattn.linear``: ``F.linear`` on the FFN's CPU GEMM where that GEMM
is the faster one, for the projections of the drop-in attention layers.

On AMD CPUs with AVX-512, PyTorch's MKL sgemm runs its AVX2 code at ~40 % of
the FMA peak, and ATen's fp16 CPU product at ~10 % on any CPU without native
fp16 arithmetic; ``torch.ops.pyfastattn.cpu_matmul_fp32``
(csrc/cpu/matmul_fp32.cpp: fp32 arithmetic on the attention's AVX-512
micro-kernels, fp32 or fp16 data) runs at 85-97 % (PERF_NOTES.md, "The fp32
FFN's GEMMs on AMD"). :func:`linear` takes it, forward and backward, for fp32
and fp16 CPU tensors large enough that the call's fixed cost does not matter,
when the extension says it is preferred here for the dtype
(``PYFASTATTN_CPU_FFN_GEMM``, the same switch as the FFN's GEMMs); everything
else -- bf16 and other dtypes, other devices,
autocast, ``torch.compile`` tracing, ``torch.func`` transforms, small
products, the "reference" backend -- is ``F.linear`` itself. Twice
differentiable: a backward with ``create_graph=True`` computes its products
in eager torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _backend

__all__ = ["linear"]

# Multiply-adds below which F.linear is kept: the autograd.Function and the
# op call cost ~10-20 us, which a 2x faster product repays from ~2M of them
# (one Zen 5 core, fp32, no_grad / fwd + bwd: 1M 28.9 / 84.4 us F.linear
# against 35.9 / 92.5 ours; 2M 48.1 / 122.7 against 45.6 / 107.1; 8M 169.9 /
# 373.1 against 112.1 / 239.1).
_MIN_MACS = 1 << 21
# Rows (tokens) below which F.linear is kept: the own GEMM packs all of W per
# call, which ATen's matrix-vector paths do not (csrc/ffn/ffn_ops.cpp,
# own_gemm: W 4096 x 4096, fp32 parity at 16 rows, fp16 at 4).
_MIN_ROWS = {torch.float32: 32, torch.float16: 8}


@functools.cache
def _own_gemm(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the extension's CPU GEMM is the preferred one here for this
    dtype (read once: the C++ side reads its environment once too)."""
    try:
        return torch.ops.pyfastattn.ffn_cpu_gemm(dtype) == "own"
    except (AttributeError, RuntimeError, ValueError):
        return False


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running:
    the own GEMM's op has no batching rule, so F.linear runs there."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # no functorch in this torch
        return False


def _use_own(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.dtype not in (torch.float32, torch.float16) or weight.dtype != x.dtype or x.device.type != "cpu":
        return False
    if weight.device.type != "cpu" or weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return False  # F.linear raises its own error for a mismatch
    if bias is not None and (
        bias.dtype != x.dtype or bias.device.type != "cpu" or bias.shape != (weight.shape[0],)
    ):
        return False  # e.g. a bias of shape (1,), which F.linear broadcasts
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _autocast_cpu() or _functorch_active():
        return False
    if _backend.get_backend() == "reference":
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows < _MIN_ROWS[x.dtype] or rows * weight.shape[0] * weight.shape[1] < _MIN_MACS:
        return False
    return _own_gemm(x.dtype)


class _LinearFp32(torch.autograd.Function):
    """y = x W^T + b on cpu_matmul_fp32 (fp32 arithmetic) for a 2-D ``x``; the
    backward's dx = dy W and dW = dy^T x on it too, db = the column sums of dy.
    The output is a fresh tensor, not a view (callers reshape it outside), so
    that it can be modified in place like F.linear's (``nn.ReLU(inplace=True)``)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.ops.pyfastattn.cpu_matmul_fp32(x2, weight.t(), bias=bias)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        dx = dw = db = None
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty): the same products in eager
            # torch, so that the gradients are themselves differentiable
            mm = torch.matmul
        else:
            mm = torch.ops.pyfastattn.cpu_matmul_fp32
        if ctx.needs_input_grad[0]:
            dx = mm(dy, weight)
        if ctx.needs_input_grad[1]:
            dw = mm(dy.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x`` [..., in], ``weight`` [out, in]
    (``nn.Linear`` layout), ``bias`` [out] or None. fp32 and fp16 CPU products
    of at least ~2M multiply-adds run on pyfastattn's own GEMM where it is preferred
    (see the module docstring); all else is ``F.linear``."""
    if _use_own(x, weight, bias):
        if x.dim() == 2:
            return _LinearFp32.apply(x, weight, bias)
        y = _LinearFp32.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
