"""Fit and check the polynomial behind the CPU kernels' exponential.

csrc/cpu/simd.h computes 2^x as 2^n * p(f), n = round(x), f in [-0.5, 0.5].
This script fits p of a given degree with p(0) = 1 for the least maximum
*relative* error of p(f) against 2^f (Lawson's iteratively reweighted least
squares over a dense grid), then reports, for the fit and for the polynomial
in simd.h, the error in exact arithmetic and when evaluated as the kernels
do: Horner steps of fp32 FMAs (one rounding per step).

    python scripts/fit_exp2_poly.py [--degree 5]

Prints the coefficients, highest power first, as simd.h lists them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

SIMD_H = Path(__file__).resolve().parent.parent / "csrc" / "cpu" / "simd.h"


def fit(degree: int, points: int = 20001, iterations: int = 200) -> list[float]:
    f = np.linspace(-0.5, 0.5, points)
    t = 2.0**f
    # p(f) = 1 + sum_k c_k f^k; relative error (p - t) / t, linear in c.
    a = np.stack([f**k for k in range(1, degree + 1)], 1) / t[:, None]
    b = (t - 1.0) / t
    w = np.full_like(f, 1.0 / points)
    c = np.zeros(degree)
    for _ in range(iterations):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)
        e = np.abs(a @ c - b)
        w = w * e
        w /= w.sum()
    return [float(np.float32(x)) for x in c[::-1]] + [1.0]


def max_rel_error(coeffs: list[float], fp32_fma: bool, points: int = 2000001) -> float:
    f32 = np.linspace(-0.5, 0.5, points).astype(np.float32)
    f = f32.astype(np.float64)
    p = np.full_like(f, float(np.float32(coeffs[0])))
    for c in coeffs[1:]:
        p = p * f + float(np.float32(c))
        if fp32_fma:  # the exact product-sum, rounded once to fp32 (an FMA)
            p = p.astype(np.float32).astype(np.float64)
    return float(np.max(np.abs(p / 2.0**f - 1.0)))


def simd_h_poly() -> list[float]:
    text = SIMD_H.read_text()
    body = re.search(r"kExp2Poly\[kExp2Degree \+ 1\] = \{(.*?)\};", text, re.S)
    if body is None:
        raise SystemExit(f"kExp2Poly not found in {SIMD_H}")
    body_text = re.sub(r"//[^\n]*", "", body.group(1))
    return [float(x.rstrip("f")) for x in re.findall(r"[-+0-9.eE]+f", body_text)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--degree", type=int, default=5)
    args = ap.parse_args()
    rows = [(f"fit, degree {args.degree}", fit(args.degree)), ("simd.h kExp2Poly", simd_h_poly())]
    for name, co in rows:
        print(f"{name}: {', '.join(f'{x:.9e}f' for x in co)}")
        exact, fma = max_rel_error(co, False), max_rel_error(co, True)
        print(
            f"  max relative error of 2^f on [-0.5, 0.5]: exact arithmetic {exact:.3g}, fp32 FMA Horner {fma:.3g}"
        )


if __name__ == "__main__":
    main()
