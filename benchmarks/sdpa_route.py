"""Is torch's SDPA with a materialised mask faster than pyfastattn's reference?

Backend ``auto`` sends what the fused kernel does not run (an unverified GPU,
float64, dropout, ...) to torch's ``scaled_dot_product_attention``. Top-left
causal maps onto ``is_causal``; bottom-right causal, sliding windows and key
lengths become a bool mask (broadcast over batch and heads). This script times
that route against the reference path (fp32 scores, materialised per batch and
head) on CPU tensors, where the same code runs, A/B interleaved in one process.

    python benchmarks/sdpa_route.py [--threads N] [--reps 5]

Prints one row per case: median ms of each path (p20-p80 in brackets) and the
ratio reference / SDPA route (> 1: the route is faster).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import torch

import pyfastattn
from pyfastattn import functional

CASES = [  # name, (b, sq, sk, h, hk, d), canonical kwargs
    ("bottom-right causal Sq<Sk", (2, 256, 1024, 8, 8, 64), {"window_right": 0, "bottom_right": True}),
    ("bottom-right causal Sq=Sk", (2, 1024, 1024, 8, 8, 64), {"window_right": 0, "bottom_right": True}),
    (
        "sliding window 128",
        (2, 1024, 1024, 8, 8, 64),
        {"window_left": 128, "window_right": 0, "bottom_right": True},
    ),
    ("key lengths + causal", (4, 512, 512, 8, 8, 64), {"window_right": 0, "seqused_k": [512, 300, 100, 17]}),
    (
        "GQA 8:2 window",
        (2, 1024, 1024, 8, 2, 64),
        {"window_left": 256, "window_right": 0, "bottom_right": True},
    ),
]


def _time(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per path and round (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds, interleaved (default 3)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="input dtype")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    real_reason = functional.kernel_unsupported_reason
    functional.kernel_unsupported_reason = lambda *a, **k: "declined for this measurement"
    warnings.simplefilter("ignore", UserWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"{'case':28s} {'SDPA route ms':>22s} {'reference ms':>22s} {'ref/route':>9s}")
    try:
        for name, (b, sq, sk, h, hk, d), kw in CASES:
            kw = dict(kw)
            if "seqused_k" in kw:
                kw["seqused_k"] = torch.tensor(kw["seqused_k"], dtype=torch.int32)
            q = torch.randn(b, sq, h, d, dtype=dtype)
            k, v = (torch.randn(b, sk, hk, d, dtype=dtype) for _ in range(2))
            call = functools.partial(pyfastattn.canonical_attention, q, k, v, **kw)
            route, ref = [], []
            for _ in range(args.rounds):
                route += _time(call, args.reps)
                with pyfastattn.backend("reference"):
                    ref += _time(call, args.reps)

            def fmt(xs):
                qs = statistics.quantiles(xs, n=5)
                return f"{statistics.median(xs):8.1f} [{qs[0]:.1f}-{qs[3]:.1f}]"

            ratio = statistics.median(ref) / statistics.median(route)
            print(f"{name:28s} {fmt(route):>22s} {fmt(ref):>22s} {ratio:8.2f}x")
    finally:
        functional.kernel_unsupported_reason = real_reason


if __name__ == "__main__":
    main()
