"""MHA / GQA decode (one query row per kv head or a few) on the two CPU
routes, with K / V read the way a decode step reads them.

A decode step reads every layer's K / V once, after the other layers (and
their FFN weights) have passed through the caches; a benchmark that calls the
same attention again and again reads them from L2 / L3 instead. This script
times both routes of a dense Sq = 1 forward -- the tiled kernel's decode path
(``pyfastattn.attention`` with ``PYFASTATTN_CPU_FEW_ROWS=tiled``, which the
script sets; the tiled kernel's decode tasks hold one query head) and the
KV-cache kernel (``pyfastattn.attention_with_kvcache`` over the same tensors) -- in three ways:

* cold: one call per "layer", rotating ~96 MiB of layers (K / V from memory);
* warm: rotating ~16 MiB of layers (K / V from L3 on a 32 MiB-L3 machine);
* hot: the same layer again and again.

    python benchmarks/decode_route_cold_hot.py [--threads 1] [--dtype bfloat16,float32]
        [--shapes 1x8x64,1x12x64] [--keys 128,512,2048]

Shapes are BxHxD (MHA: H query heads = H kv heads) or BxHqxHkxD (GQA). One thread: thread CPU
time per call; more threads: wall clock. Median of 7 rounds, microseconds;
"x" is tiled / kvcache (> 1: the KV-cache kernel is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["PYFASTATTN_CPU_FEW_ROWS"] = "tiled"  # read once, at the first routed call

import torch  # noqa: E402

import pyfastattn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import median_pass_us  # noqa: E402


def _make(layout: str, b: int, s: int, h: int, d: int, dt: torch.dtype) -> torch.Tensor:
    if layout == "bhsd":
        return torch.randn(b, h, s, d, dtype=dt).transpose(1, 2)
    return torch.randn(b, s, h, d, dtype=dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--shapes", default="1x8x64,1x12x64,1x32x128,4x12x64")
    ap.add_argument("--keys", default="128,512,2048")
    ap.add_argument(
        "--layout",
        default="bshd",
        help="bshd: (B, S, H, D) tensors (FlashAttention's layout); bhsd: (B, H, S, D) tensors passed as transposed "
        "views (what the SDPA drop-in and Hugging Face's caches hand over); or both, comma-separated",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timer = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"# threads {args.threads}, load {os.getloadavg()}")
    for layout, dt in [
        (lay, getattr(torch, x)) for lay in args.layout.split(",") for x in args.dtype.split(",")
    ]:
        for shape in args.shapes.split(","):
            dims = [int(x) for x in shape.split("x")]
            b, h, d = dims[0], dims[1], dims[-1]
            hk = dims[2] if len(dims) == 4 else h
            for sk in (int(x) for x in args.keys.split(",")):
                per = 2 * b * sk * hk * d * dt.itemsize
                layers = max(2, (96 << 20) // per)
                warm = max(2, (16 << 20) // per)

                qs = [_make(layout, b, 1, h, d, dt) for _ in range(layers)]
                ks = [_make(layout, b, sk, hk, d, dt) for _ in range(layers)]
                vs = [_make(layout, b, sk, hk, d, dt) for _ in range(layers)]
                res = {}
                with torch.no_grad():
                    for route, op in (
                        ("tiled", pyfastattn.attention),
                        ("kvcache", pyfastattn.attention_with_kvcache),
                    ):
                        calls = [lambda op=op, q=q, k=k, v=v: op(q, k, v) for q, k, v in zip(qs, ks, vs)]
                        res[route] = (
                            median_pass_us(calls, timer),
                            median_pass_us(calls[:warm] * (layers // warm), timer),
                            median_pass_us(calls[:1] * layers, timer),
                        )
                t, k = res["tiled"], res["kvcache"]
                cols = "  ".join(
                    f"{name} {t[i]:7.1f} / {k[i]:7.1f} ({t[i] / k[i]:.2f}x)"
                    for i, name in enumerate(("cold", "warm", "hot"))
                )
                print(
                    f"{layout} {str(dt)[6:]:8s} B{b} H{h:2d}/{hk:2d} D{d:3d} Sk{sk:5d} {per / 2**20:6.2f} MiB  tiled / kvcache us: {cols}"
                )


if __name__ == "__main__":
    main()
