"""Thin Python layer over ``torch.ops.pyfastattn.*``: loading, fake (meta)
implementations for torch.compile, and autograd registration."""

from __future__ import annotations

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (importing registers the ops)

    EXTENSION_ERROR: str | None = None
except ImportError as e:  # the package still works through the reference path
    _C = None
    EXTENSION_ERROR = f"{type(e).__name__}: {e}"

AVAILABLE = _C is not None
WITH_CUDA = bool(AVAILABLE and _C.with_cuda)
CUDA_ARCHS = _C.cuda_archs if AVAILABLE else ""


# (op, device type) pairs with a compiled implementation, read once at import
# so that torch.compile traces a plain set lookup.
KERNELS = frozenset(
    (op, dev)
    for op in ("attention_fwd", "attention_bwd", "attention_kvcache_fwd")
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfastattn::{op}", key)
)


def empty_like_layout(q: torch.Tensor, sizes) -> torch.Tensor:
    """An uninitialised 4-D tensor of ``sizes`` whose first three dims lie in
    memory in the order of ``q``'s (largest stride outermost, ties in natural
    order), the last dim innermost: the forward op's output layout, mirrored
    from ``empty_fwd_outputs`` in csrc/attention/api.cpp (torch's SDPA returns
    its output in its query's layout)."""
    order = sorted(range(3), key=lambda d: -q.stride(d))  # stable: ties keep natural order
    buf = q.new_empty([sizes[d] for d in order] + [sizes[3]])
    inverse = [0, 0, 0, 3]
    for i, d in enumerate(order):
        inverse[d] = i
    return buf.permute(inverse)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``pyfastattn::<op>`` has a compiled implementation for a device type."""
    return (op, device_type) in KERNELS


if AVAILABLE:

    @torch.library.register_fake("pyfastattn::attention_fwd")
    def _attention_fwd_fake(
        q,
        k,
        v,
        attn_mask,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        softcap,
        window_left,
        window_right,
        bottom_right,
        dropout_p=0.0,
        dropout_rng=None,
        alibi_slopes=None,
    ):
        if cu_seqlens_q is None:
            out = empty_like_layout(q, (*q.shape[:-1], v.shape[-1]))
            lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
            lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("pyfastattn::attention_bwd")
    def _attention_bwd_fake(
        dout,
        q,
        k,
        v,
        out,
        lse,
        attn_mask,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        softcap,
        window_left,
        window_right,
        bottom_right,
        deterministic,
        dropout_p=0.0,
        dropout_rng=None,
        alibi_slopes=None,
    ):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("pyfastattn::attention_kvcache_fwd")
    def _attention_kvcache_fwd_fake(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
        rotary_sin, rotary_interleaved, scale, softcap, window_left, window_right, num_splits, alibi_slopes=None,
    ):  # fmt: skip
        b, sq, hq, _ = q.shape
        out = q.new_empty((b, sq, hq, v_cache.shape[-1]))
        lse = q.new_empty((b, hq, sq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("pyfastattn::dropout_mask")
    def _dropout_mask_fake(dropout_rng, dropout_p, batch, heads, seqlen_q, seqlen_k):
        return dropout_rng.new_empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.bool)

    def _fwd_setup_context(ctx, inputs, output):
        q, k, v, attn_mask, cu_q, cu_k, used = inputs[:7]
        out, lse = output
        # Appended arguments (issue 17): dropout_p, dropout_rng (int64 [2], seed
        # and offset: the backward regenerates the keep pattern from it), alibi_slopes.
        extra = inputs[14:] + (0.0, None, None)[len(inputs) - 14 :]
        dropout_p, rng, slopes = extra
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, cu_q, cu_k, used, rng, slopes)
        ctx.args = inputs[7:14]
        ctx.dropout_p = dropout_p
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(lse)

    def _fwd_backward(ctx, dout, _dlse):
        q, k, v, out, lse, attn_mask, cu_q, cu_k, used, rng, slopes = ctx.saved_tensors
        max_q, max_k, scale, softcap, wl, wr, br = ctx.args
        dropout_p = ctx.dropout_p
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        grads = None
        if has_kernel("attention_bwd", q.device.type):
            grads = _kernel_backward(
                dout, q, k, v, out, lse, attn_mask, cu_q, cu_k, used, ctx.args, (dropout_p, rng, slopes)
            )
        if grads is not None:
            dq, dk, dv = grads
        else:
            # No backward kernel on this device, or the CUDA kernel declines
            # this case (e.g. too little shared memory for d = 256 on a GPU
            # with 99 KB per block): recompute through the reference (same
            # canonical semantics), as a vjp so torch.compile can trace it.
            def f(q_, k_, v_):
                return reference.attention(
                    q_,
                    k_,
                    v_,
                    scale=scale,
                    attn_mask=attn_mask,
                    cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k,
                    seqused_k=used,
                    softcap=softcap,
                    window_left=wl,
                    window_right=wr,
                    bottom_right=br,
                    dropout_p=dropout_p,
                    dropout_rng=rng,
                    alibi_slopes=slopes,
                )[0]

            _, vjp = torch.func.vjp(f, q, k, v)
            dq, dk, dv = vjp(dout)
        return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)

    def _kernel_backward(dout, q, k, v, out, lse, attn_mask, cu_q, cu_k, used, args, extra=(0.0, None, None)):
        """The compiled backward, or ``None`` when the CUDA kernel declines the case."""
        max_q, max_k, scale, softcap, wl, wr, br = args
        dropout_p, rng, slopes = extra
        try:
            return torch.ops.pyfastattn.attention_bwd(
                dout,
                q,
                k,
                v,
                out,
                lse,
                attn_mask,
                cu_q,
                cu_k,
                used,
                max_q,
                max_k,
                scale,
                softcap,
                wl,
                wr,
                br,
                torch.are_deterministic_algorithms_enabled(),
                dropout_p,
                rng,
                slopes,
            )
        except RuntimeError as e:
            from . import _backend  # here: _backend imports nothing of ours, but keep _ops light

            declined = q.device.type == "cuda" and "does not support this case" in str(e)
            if not declined or _backend.get_backend() == "kernel":  # the backend rule: kernel raises
                raise
            _backend.note_fallback(str(e).split(": ", 1)[-1])
            return None

    torch.library.register_autograd(
        "pyfastattn::attention_fwd", _fwd_backward, setup_context=_fwd_setup_context
    )
