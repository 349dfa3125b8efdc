"""register_fake / register_autograd for ``torch.ops.pyfastattn.merge_attention_states``.

Kept in its own module (not ``pyfastattn/_ops.py``) so the distributed work
touches no shared file; ``pyfastattn.distributed.merge`` imports it.
"""

from __future__ import annotations

import torch

from .. import _ops

AVAILABLE = _ops.AVAILABLE and hasattr(torch.ops.pyfastattn, "merge_attention_states")


def has_kernel(device_type: str) -> bool:
    """Whether the merge op has a compiled implementation for ``device_type``."""
    return device_type in _KERNELS


_KERNELS = frozenset(
    dev
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("pyfastattn::merge_attention_states", key)
)


def merge_backward_math(
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the merge, in fp32, from the saved inputs and outputs.

    With ``ca = exp(lse_a - lse)`` (0 where ``lse`` is -inf) and likewise cb:
    ``d out_a = ca * g``; ``d lse_a = ca * (sum_d g * (out_a - out) + g_lse)``.
    A part of weight 0 gets zero gradients (its values are never read).
    """

    def weight(la: torch.Tensor) -> torch.Tensor:
        w = torch.exp(la - lse)
        return torch.where(torch.isfinite(lse) & (la > float("-inf")), w, torch.zeros_like(w))

    ca, cb = weight(lse_a), weight(lse_b)  # [b, h, s]
    g = torch.zeros_like(out, dtype=torch.float32) if grad_out is None else grad_out.float()
    gl = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    o = out.float()
    ca_o, cb_o = ca.transpose(1, 2).unsqueeze(-1), cb.transpose(1, 2).unsqueeze(-1)  # [b, s, h, 1]

    def dlse(part: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        diff = torch.where(c.transpose(1, 2).unsqueeze(-1) > 0, part.float() - o, torch.zeros_like(o))
        return c * ((g * diff).sum(-1).transpose(1, 2) + gl)

    return (ca_o * g).to(out_a.dtype), dlse(out_a, ca), (cb_o * g).to(out_b.dtype), dlse(out_b, cb)


if AVAILABLE:

    @torch.library.register_fake("pyfastattn::merge_attention_states")
    def _merge_fake(out_a, lse_a, out_b, lse_b):
        return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)

    def _merge_setup_context(ctx, inputs, output):
        out_a, lse_a, out_b, lse_b = inputs
        out, lse = output
        ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out, lse)

    def _merge_backward(ctx, grad_out, grad_lse):
        return merge_backward_math(grad_out, grad_lse, *ctx.saved_tensors)

    torch.library.register_autograd(
        "pyfastattn::merge_attention_states", _merge_backward, setup_context=_merge_setup_context
    )
