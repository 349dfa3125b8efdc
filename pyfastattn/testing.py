"""The tolerance rule, shared by the tests and the benchmarks' correctness gate.

A result in ``dtype`` passes against a float64 reference when its max error is
at most twice the error of plain PyTorch computing the same thing in ``dtype``
(the FlashAttention rule), plus twice the error of merely storing the exact
result in ``dtype``. In fp32/fp64 a different (blocked, online-softmax)
summation order alone can exceed twice torch's tiny error, so those also get a
relative floor: 1e-5 (fp32) and 1e-12 (fp64) of max|ref|. In fp16 and bf16
the floor is at least FlashAttention's own absolute term, its tests'
``2 * (ref + 0.3 - 0.3 - ref)`` in ``dtype`` at its largest, one step of
``dtype`` at max|ref| + 0.3 (`flash_attention_atol`): without
it a gradient that is exactly zero in the reference (a row that sees one key)
would allow no error at all, while an online-softmax backward computes it as
``P * (dP - rowsum(dO * O))``, two sums that agree only to rounding, and a
small gradient would allow less than FlashAttention itself is held to. NaN must
appear exactly where the reference has NaN; equal infinities count as exact.
Plain PyTorch's own error is taken over the elements it did not turn into NaN
(a row it masks completely is NaN in naive low-precision attention and
finite in the reference); those elements bound nothing.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flash_attention_atol", "max_error", "rounding_floor", "tolerance_failure"]

_RELATIVE_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
_LOW_PRECISION = tuple(_MANTISSA_BITS)


def flash_attention_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """FlashAttention's tests' absolute term, ``2 * (ref + 0.3 - 0.3 - ref)``
    in ``dtype``, at its largest: twice the largest rounding error (half a
    step) at magnitude max|ref| + 0.3, i.e. one step of ``dtype`` there.
    0 outside fp16 / bf16."""
    if dtype not in _LOW_PRECISION or ref.numel() == 0:
        return 0.0
    finite = ref[torch.isfinite(ref)]
    x = 0.3 + (finite.abs().max().item() if finite.numel() else 0.0)
    _, e = math.frexp(x)  # x = m * 2**e, 0.5 <= m < 1
    return 2.0 ** (e - 1 - _MANTISSA_BITS[dtype])


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the error of merely storing the exact result in ``dtype``."""
    if ref.numel() == 0:
        return 0.0
    err = (ref.to(dtype).to(ref.dtype) - ref).abs().max()
    if torch.isfinite(err):  # no NaN or infinity anywhere: one pass, no copy
        return 2.0 * err.item()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    r = ref[finite]
    return 2.0 * (r.to(dtype).to(r.dtype) - r).abs().max().item()


def max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |a - ref| over elements that are not NaN or equal infinities in both;
    ``nan`` when the NaN patterns differ."""
    a = a.double()
    if a.numel() and a.shape == ref.shape:
        # Fast path: a finite max means neither side holds a NaN or an infinity
        # (either would make the difference NaN or infinite), so the masked
        # answer below equals the plain one.
        err = (a - ref).abs().max()
        if torch.isfinite(err):
            return err.item()
    nan_a, nan_r = torch.isnan(a), torch.isnan(ref)
    if not torch.equal(nan_a, nan_r):
        return math.nan
    ok = ~(nan_a | (torch.isinf(a) & torch.isinf(ref) & (a == ref)))
    if not ok.any():
        return 0.0
    return (a[ok] - ref[ok]).abs().max().item()


def tolerance_failure(
    name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None, dtype: torch.dtype
) -> str | None:
    """``None`` when ``out`` passes the rule against ``ref``, else why not."""
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = max_error(out, ref)
    if math.isnan(err):
        return (f"{name}: NaN pattern differs: {torch.isnan(out).sum().item()} NaN vs "
                f"{torch.isnan(ref).sum().item()} in the reference")  # fmt: skip
    base = 0.0 if baseline is None else max_error(baseline, ref)
    if math.isnan(base) and baseline.shape == ref.shape:  # baseline NaN where the reference is not: the rest
        keep = ~(torch.isnan(baseline) & ~torch.isnan(ref))
        base = max_error(baseline[keep], ref[keep]) if keep.any() else 0.0
    base = 0.0 if math.isnan(base) else base
    floor = max(rounding_floor(ref, dtype), flash_attention_atol(ref, dtype))
    rel = _RELATIVE_FLOOR.get(dtype)
    if rel is not None and ref.numel() > 0:
        floor = max(floor, rel * (1.0 + ref.abs().nan_to_num(0.0).max().item()))
    tol = 2.0 * base + floor
    if err <= tol:
        return None
    mean = (out.double() - ref).abs().nan_to_num(0.0).mean().item()
    return (f"{name}: max error {err:.3e} > tolerance {tol:.3e} (plain torch error {base:.3e}, "
            f"rounding floor {floor:.3e}); mean error {mean:.3e}")  # fmt: skip
