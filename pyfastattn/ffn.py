"""The fused feed-forward network (FFN): public functions, fake kernels, autograd.

Two public functions, one per form (the gated form is a separate function so
that each signature says exactly which weights it takes)::

    feed_forward(x, w1, b1, w2, b2=None, *, activation="gelu", recompute=False)
        y = w2 act(w1 x + b1) + b2

    gated_feed_forward(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                       *, activation="silu", recompute=False)
        y = w_down (act(w_gate x + b_gate) * (w_up x + b_up)) + b_down
        (SwiGLU with silu, GeGLU with gelu; the LLaMA MLP)

Weights are in ``torch.nn.Linear`` layout ``[out_features, in_features]``;
every bias is optional; ``x`` has any leading dims. Both run
``torch.ops.pyfastattn.ffn_fwd`` / ``ffn_bwd`` (schemas and the CPU kernels in
``csrc/ffn/``) or, under the backend rule of :mod:`pyfastattn._backend`,
eager torch in the input dtype where the kernel can't run (``auto``) or the
pure-PyTorch ``reference.feed_forward`` / ``reference.gated_feed_forward``
(``reference``).
Both are differentiable and trace under ``torch.compile(fullgraph=True)``.

Memory. By default the forward saves, per token, only the pre-activations:
``d_ff`` values plain, ``2 d_ff`` gated (eager PyTorch saves ``2 d_ff`` and
``4 d_ff``); the backward's one fused pass recomputes ``h`` as it goes. It then
runs four GEMMs plain, six gated. ``recompute=True`` saves nothing of size
``tokens x d_ff`` (only ``x``, like Liger-Kernel): the backward recomputes the
first GEMM(s) from ``x``, one extra GEMM plain, two gated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _ffn_cuda, _ops, reference  # noqa: F401  (_ffn_cuda: loads the CUDA dispatch table)
from .functional import InvalidArgumentError, call_op

__all__ = ["feed_forward", "gated_feed_forward", "ffn_unsupported_reason", "ACTIVATIONS"]

ACTIVATIONS: tuple[str, ...] = tuple(reference.ACTIVATIONS)  # gelu (erf), gelu_tanh, relu, silu

# Storage dtypes with a fused kernel, per device type (compute is fp32). CUDA:
# fp16/bf16 on our fused GEMMs or cuBLAS + the fused elementwise kernel
# (pyfastattn/_ffn_cuda.py), fp32 on the latter only.
_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


# Devices (by CUDA capability) on which the CUDA FFN passed scripts/gpu_check.sh.
# Until a device is listed, backend "auto" runs eager torch (cuBLAS) there and
# backend "kernel" runs the unverified kernels on request.
FFN_CUDA_VERIFIED_CAPABILITIES: tuple[tuple[int, int], ...] = ()


def _op_has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfastattn::{op}", key)
    except RuntimeError:  # an older _C without the FFN ops
        return False


# (op, device type) pairs with a compiled implementation, read once at import
# so that torch.compile traces a plain set lookup.
KERNELS = frozenset(
    (op, dev)
    for op in ("ffn_fwd", "ffn_bwd")
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _ops.AVAILABLE and _op_has_kernel(op, key)
)
_OPS_DEFINED = _ops.AVAILABLE and hasattr(torch.ops.pyfastattn, "ffn_fwd")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------
# fake kernels and autograd for torch.ops.pyfastattn.ffn_fwd / ffn_bwd
# ---------------------------------------------------------------------------

# ffn_bwd's outputs and output_mask are in the order (x, w1, b1, w2, b2, w3, b3),
# the order of ffn_fwd's tensor inputs.
if _OPS_DEFINED:

    @torch.library.register_fake("pyfastattn::ffn_fwd")
    def _ffn_fwd_fake(x, w1, b1, w2, b2, w3, b3, activation, save_for_backward):
        tokens, d_ff, d_out = x.shape[0], w1.shape[0], w2.shape[0]
        out = x.new_empty((tokens, d_out))
        if not save_for_backward:
            return out, x.new_empty((0,))
        return out, x.new_empty((1 if w3 is None else 2, tokens, d_ff))

    @torch.library.register_fake("pyfastattn::ffn_bwd")
    def _ffn_bwd_fake(dout, x, w1, b1, w2, w3, b3, act_in, activation, recompute, output_mask):
        shapes = (
            x.shape,
            w1.shape,
            None if b1 is None else b1.shape,
            w2.shape,
            (w2.shape[0],),
            None if w3 is None else w3.shape,
            None if b3 is None else b3.shape,
        )
        return tuple(x.new_empty(s if (m and s is not None) else (0,)) for s, m in zip(shapes, output_mask))

    def _ffn_setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, w3, b3, activation, save_for_backward = inputs
        _, act_in = output
        ctx.save_for_backward(x, w1, b1, w2, w3, b3, act_in)
        ctx.activation = activation
        ctx.recompute = not save_for_backward
        ctx.mark_non_differentiable(act_in)
        # act_in never gets a gradient: don't let autograd allocate and zero
        # an [n, tokens, d_ff] tensor for it before every backward.
        ctx.set_materialize_grads(False)

    def _ffn_backward(ctx, dout, _d_act_in):
        x, w1, b1, w2, w3, b3, act_in = ctx.saved_tensors
        if dout is None:  # y took no part in the loss
            return (None,) * 9
        mask = list(ctx.needs_input_grad[:7])  # x, w1, b1, w2, b2, w3, b3
        if torch.is_grad_enabled():
            return _ffn_backward_differentiable(x, w1, b1, w2, w3, b3, ctx.activation, dout, mask)
        grads = torch.ops.pyfastattn.ffn_bwd(
            dout, x, w1, b1, w2, w3, b3, act_in, ctx.activation, ctx.recompute, mask
        )
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None)

    torch.library.register_autograd("pyfastattn::ffn_fwd", _ffn_backward, setup_context=_ffn_setup_context)


def _ffn_backward_differentiable(x, w1, b1, w2, w3, b3, activation, dout, mask):
    """The backward under create_graph=True (a gradient penalty, a
    Hessian-vector product): ffn_bwd is not differentiable (its GEMMs write
    into out= buffers, which autograd refuses), so the forward is recomputed
    in eager torch and differentiated with a graph; the gradients are the
    same function's, and twice differentiable.

    Each argument position gets its own alias (``view_as``), so that a tensor
    passed in two positions (gate and up tied to one weight, one bias for
    both, ``x`` also a weight) gets each position's partial gradient, as from
    the fused backward; differentiating by the tensor itself gave every
    position the total, and autograd then summed it once per position."""
    # b2 is not saved: its gradient is dout summed over tokens
    args = [None if t is None else t.view_as(t) for t in (x, w1, b1, w2, None, w3, b3)]
    out = [None] * 7
    pos = [i for i, (t, m) in enumerate(zip(args, mask)) if m and t is not None]
    if pos:
        y = _eager(*args, activation)
        got = torch.autograd.grad(y, [args[i] for i in pos], dout, create_graph=True, allow_unused=True)
        for i, g in zip(pos, got):
            out[i] = g if g is not None else torch.zeros_like(args[i])
    if mask[4]:
        out[4] = dout.sum(0)
    return tuple(out) + (None, None)


# ---------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------


def ffn_unsupported_reason(x: torch.Tensor, mode: str | None = None) -> str | None:
    """Why the fused FFN kernel can't run for input ``x`` (``None`` when it can).

    ``mode`` is the backend (default: the current one). It matters on CUDA
    only: under ``auto`` the CUDA FFN runs only on devices listed in
    ``FFN_CUDA_VERIFIED_CAPABILITIES``, as the CUDA attention kernel does.
    """
    if not _ops.AVAILABLE:
        return f"the compiled extension pyfastattn._C could not be imported ({_ops.EXTENSION_ERROR})"
    dev = x.device.type
    if dev not in _KERNEL_DTYPES or ("ffn_fwd", dev) not in KERNELS:
        return f"there is no fused FFN kernel for device type {dev!r}"
    if x.dtype not in _KERNEL_DTYPES[dev]:
        return f"the {dev.upper()} FFN kernel has no {x.dtype} variant (supported: {_KERNEL_DTYPES[dev]})"
    if dev == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (8, 0):
            return f"the CUDA FFN kernels need compute capability >= 8.0, got {cap[0]}.{cap[1]}"
        mode = _backend.get_backend() if mode is None else mode
        if mode == "auto" and cap not in FFN_CUDA_VERIFIED_CAPABILITIES:
            return (
                f"the CUDA FFN kernels are not yet verified on hardware of capability {cap[0]}.{cap[1]} "
                "(use backend 'kernel' to run them anyway)"
            )
    return None


# ---------------------------------------------------------------------------
# validation: every message names the argument, the expected and the actual value
# ---------------------------------------------------------------------------


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_like(t, name: str, x: torch.Tensor, shape: tuple[int, ...], shape_doc: str) -> None:
    _check_tensor(t, name)
    if t.dtype != x.dtype:
        raise InvalidArgumentError(f"{name}.dtype must equal x.dtype ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise InvalidArgumentError(f"{name}.device must equal x.device ({x.device}), got {t.device}")
    if tuple(t.shape) != shape:
        raise InvalidArgumentError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(t.shape)}")


def _validate(x, w_in, b_in, w_out, b_out, w_up, b_up, names, activation, recompute) -> None:
    """``names``: the public names of (w_in, b_in, w_out, b_out, w_up, b_up)."""
    n_w_in, n_b_in, n_w_out, n_b_out, n_w_up, n_b_up = names
    _check_tensor(x, "x")
    if not x.dtype.is_floating_point:
        raise InvalidArgumentError(f"x.dtype must be a floating-point dtype, got {x.dtype}")
    if x.dim() < 1:
        raise InvalidArgumentError("x must have at least 1 dim (..., d_model), got a 0-dim tensor")
    for t, name in ((w_in, n_w_in), (w_out, n_w_out)):
        _check_tensor(t, name)
        if t.dim() != 2:
            raise InvalidArgumentError(
                f"{name} must be 2-D [out_features, in_features] (nn.Linear layout), "
                f"got {t.dim()} dims (shape {tuple(t.shape)})"
            )
    d_model = x.shape[-1]
    d_ff, d_out = w_in.shape[0], w_out.shape[0]
    _check_like(w_in, n_w_in, x, (d_ff, d_model), "[d_ff, x.shape[-1]]")
    _check_like(w_out, n_w_out, x, (d_out, d_ff), f"[d_out, {n_w_in}.shape[0]]")
    if w_up is not None:
        _check_like(w_up, n_w_up, x, (d_ff, d_model), f"{n_w_in}.shape")
    for t, name, n in ((b_in, n_b_in, d_ff), (b_out, n_b_out, d_out), (b_up, n_b_up, d_ff)):
        if t is not None:
            _check_like(t, name, x, (n,), f"[{n_w_out if name == n_b_out else n_w_in}.shape[0]]")
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(recompute, bool):
        raise InvalidArgumentError(f"recompute must be a bool, got {recompute!r}")


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _autocast(*tensors):
    """Under autocast, the dtype torch.nn.functional.linear would compute in
    (the autocast dtype) for every floating tensor; otherwise unchanged."""
    x = tensors[0]
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return tensors
    dt = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _eager(x, w1, b1, w2, b2, w3, b3, activation: str) -> torch.Tensor:
    """The FFN as plain PyTorch computes it, in the input dtype (cuBLAS / MKL
    GEMMs): backend ``auto``'s choice where the fused kernel can't run, so that
    a model is never slower than it was without pyfastattn (the reference
    computes in fp32 and keeps more memory)."""
    h = reference.apply_activation(F.linear(x, w1, b1), activation)
    if w3 is not None:
        h = h * F.linear(x, w3, b3)
    return F.linear(h, w2, b2)


def _run(x, w1, b1, w2, b2, w3, b3, activation: str, recompute: bool) -> torch.Tensor:
    """Validated arguments in, ``y`` out, through the chosen backend."""
    mode = _backend.get_backend()
    reason = None if mode == "reference" else ffn_unsupported_reason(x, mode)
    if mode == "reference" or reason is not None:
        if mode == "kernel":
            raise RuntimeError(f"pyfastattn backend 'kernel' cannot run this FFN call: {reason}")
        if mode == "reference":
            if w3 is None:
                return reference.feed_forward(x, w1, b1, w2, b2, activation)
            return reference.gated_feed_forward(x, w1, w3, w2, b1, b3, b2, activation)
        if not _is_compiling():
            _backend.note_fallback(reason, target="eager torch (its own GEMMs, in the input dtype)")
        return _eager(x, w1, b1, w2, b2, w3, b3, activation)
    lead = x.shape[:-1]
    x2 = x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, w3, b3)
    )
    y, _ = call_op(
        torch.ops.pyfastattn.ffn_fwd, x2, w1, b1, w2, b2, w3, b3, activation, needs_grad and not recompute
    )
    return y.reshape(*lead, w2.shape[0])


def feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "gelu",
    recompute: bool = False,
) -> torch.Tensor:
    """``y = w2 act(w1 x + b1) + b2``, fused.

    Shapes (``torch.nn.Linear`` layout): ``x`` [..., d_model], ``w1``
    [d_ff, d_model], ``b1`` [d_ff] or None, ``w2`` [d_out, d_ff] (usually
    d_out = d_model), ``b2`` [d_out] or None -> ``y`` [..., d_out]. All of one
    floating dtype and device; the fused CPU kernel takes float32, bfloat16 and
    float16 (bias, activation and gradients computed in fp32; GEMMs by ATen,
    or by pyfastattn's own AVX-512 GEMM for fp32 on AMD and fp16, see README;
    a forward of at most 16 tokens in bf16, 32 in fp32/fp16, is one fused
    kernel that reads each weight once: see
    ``csrc/cpu/ffn_small_tokens.cpp``), other cases run eager torch (in the
    input dtype) under backend ``auto``. Under autocast,
    every tensor is first cast to the autocast dtype, as ``F.linear`` would.

    ``activation``: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu".
    ``recompute``: by default the forward keeps the pre-activation for the
    backward (``d_ff`` values per token, half of what eager PyTorch keeps);
    with ``True`` it keeps nothing of that size and the backward recomputes
    the first GEMM (one extra GEMM, about +17% forward+backward time).
    Twice differentiable: a backward with ``create_graph=True`` recomputes
    the forward in eager torch and differentiates that (the fused backward
    is not differentiable).
    """
    x, w1, b1, w2, b2 = _autocast(x, w1, b1, w2, b2)
    _validate(x, w1, b1, w2, b2, None, None, ("w1", "b1", "w2", "b2", "", ""), activation, recompute)
    return _run(x, w1, b1, w2, b2, None, None, activation, recompute)


def gated_feed_forward(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    recompute: bool = False,
) -> torch.Tensor:
    """``y = w_down (act(w_gate x + b_gate) * (w_up x + b_up)) + b_down``, fused.

    The gated FFN of LLaMA-style models (SwiGLU with "silu", GeGLU with
    "gelu"). Shapes (``torch.nn.Linear`` layout, the names of Hugging Face's
    ``LlamaMLP``: gate_proj, up_proj, down_proj): ``x`` [..., d_model],
    ``w_gate`` and ``w_up`` [d_ff, d_model], ``w_down`` [d_out, d_ff], biases
    [d_ff] / [d_out] or None -> ``y`` [..., d_out]. Dtypes, ``activation`` and
    ``recompute`` as in :func:`feed_forward`: by default the forward keeps
    ``2 d_ff`` values per token (eager keeps ``4 d_ff``); with ``recompute``
    nothing of that size, the backward recomputes both first GEMMs (about
    +20% forward+backward time) and its peak memory is below eager's.
    """
    x, w_gate, w_up, w_down, b_gate, b_up, b_down = _autocast(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    _validate(
        x,
        w_gate,
        b_gate,
        w_down,
        b_down,
        w_up,
        b_up,
        ("w_gate", "b_gate", "w_down", "b_down", "w_up", "b_up"),
        activation,
        recompute,
    )
    return _run(x, w_gate, b_gate, w_down, b_down, w_up, b_up, activation, recompute)
