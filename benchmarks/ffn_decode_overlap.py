"""Does the decode-size FFN kernel overlap its arithmetic with its weight
reads? (csrc/cpu/ffn_small_tokens.cpp, PERF_NOTES.md "CPU feed-forward at
decode sizes"). One thread, the thread's CPU time, gated D1024, per token
count T:

  streamed   F2816 with the weights rotated over sets >= 8x the L3 (read
             from memory on every call, as ffn_decode_bench.py does)
  L3-hot     one F2816 set, called again and again (17.3 MB bf16: in L3)
  compute    the arithmetic alone: the time of F256 minus that of F128 (both
             sets L2-resident, 1.5 / 0.75 MB bf16), scaled to F2816, so the
             fixed cost of a call cancels out
  memory     the weight bytes at the read probe's rate (one thread)

If the kernel overlaps the two, streamed ~ max(compute, memory); if it does
not, streamed ~ compute + memory.

    python benchmarks/ffn_decode_overlap.py [--dtype bfloat16] [--tokens 4,8,16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import pyfastattn
from pyfastattn import ffn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from bench_common import read_probe_times  # noqa: E402

D = 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = getattr(torch, args.dtype)

    def layers(f, n):
        return [
            [
                (torch.randn(f, D) / 32).to(dt),
                (torch.randn(f, D) / 32).to(dt),
                (torch.randn(D, f) / 53).to(dt),
            ]
            for _ in range(n)
        ]

    big = layers(2816, max(2, math.ceil(256e6 / (3 * D * 2816 * dt.itemsize))))
    f256, f128 = layers(256, 1), layers(128, 1)
    probe = torch.ones(16 << 20)

    def read_gbs():  # the faster of the probe without and with its prefetches
        return probe.numel() * 4 / min(min(ts) for ts in read_probe_times(probe, 5).values()) / 1e9

    def cpu_ms(x, sets, reps, inner=1):
        v = []
        with torch.no_grad(), pyfastattn.backend("kernel"):
            for i in range(reps):
                c = time.thread_time()
                for j in range(inner):
                    ffn.gated_feed_forward(x, *sets[(i * inner + j) % len(sets)])
                v.append((time.thread_time() - c) / inner)
        return statistics.median(v) * 1e3

    print(f"load {os.getloadavg()}, {dt}, one thread, median thread CPU ms")
    for _ in range(args.rounds):
        gbs = read_gbs()
        mem = 3 * D * 2816 * dt.itemsize / (gbs * 1e9) * 1e3
        for t in [int(s) for s in args.tokens.split(",")]:
            x = torch.randn(t, D).to(dt)
            cpu_ms(x, big, 5)
            streamed = cpu_ms(x, big, 60)
            cpu_ms(x, big[:1], 5)
            hot = cpu_ms(x, big[:1], 60)
            cpu_ms(x, f256, 20)
            cpu_ms(x, f128, 20)
            compute = (cpu_ms(x, f256, 200, 10) - cpu_ms(x, f128, 200, 10)) * 2816 / 128
            gflops = 2 * t * 3 * D * 2816 / (compute * 1e-3) / 1e9
            print(
                f"T{t}: streamed {streamed:.3f} | L3-hot {hot:.3f} | compute {compute:.3f} ({gflops:.0f} GFLOP/s)"
                f" | memory {mem:.3f} at {gbs:.1f} GB/s | sum {compute + mem:.3f} max {max(compute, mem):.3f}"
            )
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
