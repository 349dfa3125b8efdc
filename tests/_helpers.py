"""Test helpers: the tolerance rule, input factories, a low-precision baseline."""

from __future__ import annotations

import math

import torch

from pyfastattn import reference

HAS_CUDA = torch.cuda.is_available()


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the error of merely storing the exact result in `dtype`."""
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    r = ref[finite]
    return 2.0 * (r.to(dtype).to(r.dtype) - r).abs().max().item()


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.double()
    nan_a, nan_r = torch.isnan(a), torch.isnan(ref)
    assert torch.equal(nan_a, nan_r), (
        f"NaN pattern differs: {nan_a.sum().item()} NaN vs {nan_r.sum().item()} in reference"
    )
    both_inf = torch.isinf(a) & torch.isinf(ref) & (a == ref)
    ok = ~(nan_a | both_inf)
    if not ok.any():
        return 0.0
    return (a[ok] - ref[ok]).abs().max().item()


def assert_tolerance(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None, dtype):
    """The FlashAttention rule: error vs the float64 reference at most twice the
    error of plain PyTorch computing the same thing in `dtype` (`baseline`),
    plus twice the error of rounding the exact result to `dtype`."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = max_err(out, ref)
    base = 0.0 if baseline is None else max_err(baseline, ref)
    floor = rounding_floor(ref, dtype)
    # The 2x rule is meant for low precision. In fp32/fp64 a different (blocked,
    # online-softmax) summation order alone can exceed twice torch's tiny error,
    # so those get a relative floor: 1e-5 (fp32) and 1e-12 (fp64) of max|ref|.
    rel = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype)
    if rel is not None and ref.numel() > 0:
        floor = max(floor, rel * (1.0 + ref.abs().nan_to_num(0.0).max().item()))
    tol = 2.0 * base + floor
    mean = (out.double() - ref).abs().nan_to_num(0.0).mean().item() if out.numel() else 0.0
    assert err <= tol, (
        f"{name}: max error {err:.3e} > tolerance {tol:.3e} (plain torch error {base:.3e}, "
        f"rounding floor {floor:.3e}); mean error {mean:.3e}"
    )


def naive_attention(
    q,
    k,
    v,
    *,
    scale,
    attn_mask=None,
    seqused_k=None,
    softcap=0.0,
    window_left=-1,
    window_right=-1,
    bottom_right=False,
):
    """Plain PyTorch attention in the inputs' own precision (no upcast), dense
    canonical layout: the 'plain PyTorch error' of the tolerance rule."""
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hk != hq:
        kt = kt.repeat_interleave(hq // hk, 1)
        vt = vt.repeat_interleave(hq // hk, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    len_k = torch.full((b,), sk, device=q.device) if seqused_k is None else seqused_k.long()
    vis = reference._visible(sq, sk, len_k, window_left, window_right, bottom_right, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vt).transpose(1, 2)


def make_qkv(b, sq, sk, hq, hk, d, dv=None, dtype=torch.float32, device="cpu", strided=False):
    dv = d if dv is None else dv
    if strided:  # non-contiguous views with a contiguous last dim
        q = torch.randn(b, hq, sq, d + 3, dtype=dtype, device=device)[..., :d].transpose(1, 2)
        k = torch.randn(b, sk, 2 * hk, d, dtype=dtype, device=device)[:, :, ::2]
        v = torch.randn(b, hk, sk, dv, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = torch.randn(b, sq, hq, d, dtype=dtype, device=device)
        k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
        v = torch.randn(b, sk, hk, dv, dtype=dtype, device=device)
    return q, k, v


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
