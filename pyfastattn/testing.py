"""The tolerance rule, shared by the tests and the benchmarks' correctness gate.

A result in ``dtype`` passes against a float64 reference when its max error is
at most twice the error of plain PyTorch computing the same thing in ``dtype``
(the FlashAttention rule), plus twice the error of merely storing the exact
result in ``dtype``. In fp32/fp64 a different (blocked, online-softmax)
summation order alone can exceed twice torch's tiny error, so those also get a
relative floor: 1e-5 (fp32) and 1e-12 (fp64) of max|ref|. NaN must appear
exactly where the reference has NaN; equal infinities count as exact.
"""

from __future__ import annotations

import math

import torch

__all__ = ["max_error", "rounding_floor", "tolerance_failure"]

_RELATIVE_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}


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
    base = 0.0 if math.isnan(base) else base
    floor = rounding_floor(ref, dtype)
    rel = _RELATIVE_FLOOR.get(dtype)
    if rel is not None and ref.numel() > 0:
        floor = max(floor, rel * (1.0 + ref.abs().nan_to_num(0.0).max().item()))
    tol = 2.0 * base + floor
    if err <= tol:
        return None
    mean = (out.double() - ref).abs().nan_to_num(0.0).mean().item()
    return (f"{name}: max error {err:.3e} > tolerance {tol:.3e} (plain torch error {base:.3e}, "
            f"rounding floor {floor:.3e}); mean error {mean:.3e}")  # fmt: skip
