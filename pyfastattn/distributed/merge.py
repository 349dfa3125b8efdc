"""``merge_attention_states``: two partial attentions over disjoint key sets -> one.

Ring attention merges per-block results with it; split-KV decoding can too.
"""

from __future__ import annotations

import torch

from ..functional import InvalidArgumentError, call_op
from . import _merge_ops

__all__ = ["merge_attention_states", "merge_attention_states_reference"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def merge_attention_states_reference(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch merge in the canonical 4-D form (the truth for the tests and
    the fallback where the extension is missing). Differentiable; fp32 inside
    (fp64 for fp64 inputs); output in ``out_a.dtype``, lse in fp32 (fp64)."""
    cdt = torch.float64 if torch.float64 in (out_a.dtype, lse_a.dtype) else torch.float32
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    lse = torch.where(total > 0, m_safe + torch.log(total.clamp_min(torch.finfo(cdt).tiny)), m)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    ca = (wa / safe_total).transpose(1, 2).unsqueeze(-1)
    cb = (wb / safe_total).transpose(1, 2).unsqueeze(-1)
    zero = torch.zeros((), dtype=cdt, device=out_a.device)
    a = torch.where(ca > 0, out_a.to(cdt), zero)  # a part of weight 0 is never read
    b = torch.where(cb > 0, out_b.to(cdt), zero)
    out = ca * a + cb * b
    return out.to(out_a.dtype), lse.to(torch.float64 if cdt == torch.float64 else torch.float32)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets.

    Dense: ``out_a``/``out_b`` (B, S, H, D) with ``lse_a``/``lse_b`` (B, H, S)
    fp32, the layout ``pyfastattn.attention(..., return_lse=True)`` returns.
    Packed (varlen): ``out`` (total, H, D) with ``lse`` (H, total). The two
    outputs may differ in dtype (fp32, fp16, bf16; e.g. an fp32 accumulator
    and a bf16 block); the result has ``out_a.dtype`` and an fp32 lse:

        lse = log(exp(lse_a) + exp(lse_b))
        out = (exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b)

    computed in fp32. A row that neither part saw any key for (both lse -inf)
    gives 0 and -inf, never NaN; a part of weight 0 is never read. Differentiable
    in all four inputs; runs the compiled CPU/CUDA op (``torch.ops.pyfastattn.
    merge_attention_states``) where it exists, else the pure-PyTorch reference.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_a.dim() not in (3, 4):
        raise InvalidArgumentError(
            f"out_a must have 4 dims (B, S, H, D) or 3 dims (total, H, D), got {out_a.dim()} "
            f"(shape {tuple(out_a.shape)})"
        )
    if out_b.shape != out_a.shape:
        raise InvalidArgumentError(
            f"out_b.shape must equal out_a.shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}"
        )
    want_lse = (
        (out_a.shape[0], out_a.shape[2], out_a.shape[1])
        if out_a.dim() == 4
        else (out_a.shape[1], out_a.shape[0])
    )
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != want_lse:
            raise InvalidArgumentError(
                f"{name}.shape must be {want_lse} (lse layout of out_a), got {tuple(t.shape)}"
            )
    for name, t in (("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if t.device != out_a.device:
            raise InvalidArgumentError(
                f"{name}.device must equal out_a.device ({out_a.device}), got {t.device}"
            )
    fp64 = torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype)
    if not fp64:
        for name, t in (("out_a", out_a), ("out_b", out_b)):
            if t.dtype not in _DTYPES:
                raise InvalidArgumentError(
                    f"{name}.dtype must be one of {_DTYPES} (or float64), got {t.dtype}"
                )
        for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
            if t.dtype != torch.float32:
                raise InvalidArgumentError(f"{name}.dtype must be torch.float32, got {t.dtype}")
    packed = out_a.dim() == 3
    if packed:  # (total, H, D) + (H, total) -> (1, total, H, D) + (1, H, total)
        out_a, out_b, lse_a, lse_b = (t.unsqueeze(0) for t in (out_a, out_b, lse_a, lse_b))
    if fp64 or not _merge_ops.has_kernel(out_a.device.type):
        out, lse = merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    else:
        a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (out_a, out_b))
        out, lse = call_op(torch.ops.pyfastattn.merge_attention_states, a, lse_a, b, lse_b)
    return (out.squeeze(0), lse.squeeze(0)) if packed else (out, lse)
