"""Saved builds of the KV-cache op, every cache layout interleaved in one process per build.

For the paged-within-1.1x-of-contiguous target on a shared box: each build
runs in its own subprocess (two builds cannot share a process: same op names),
which times one decode step of every layout (contiguous, paged 16 / 64 / 256
with shuffled blocks) in interleaved rounds, one thread, thread CPU time, and
reports the contiguous step and each paged layout's median per-round ratio to
it; the builds alternate `alternations` times. Target case of issue 18: B1
Hq32 Hk8 D128, 32k keys, bf16, one token appended.

    cp pyfastattn/_C*.so /tmp/old.so   # before the change; rebuild; then
    cp pyfastattn/_C*.so /tmp/new.so
    python benchmarks/kvcache_layouts_ab.py /tmp/old.so,/tmp/new.so [alternations] [rounds] [reps]

A build may carry environment settings for its child after a colon, so that
one build's run-time choices are compared in one run, e.g. the prefetch level:

    python benchmarks/kvcache_layouts_ab.py \
        /tmp/new.so:PYFASTATTN_CPU_PREFETCH=l1,/tmp/new.so:PYFASTATTN_CPU_PREFETCH=l2
"""

import os
import subprocess
import sys

CHILD = r"""
import os, sys, time, statistics, torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(1)
rounds, reps = int(sys.argv[2]), int(sys.argv[3])
layouts = [0, 16, 64, 256]
HQ, HK, D, ctx = 32, 8, 128, 32768
dt = torch.bfloat16
cap = ctx + 16
torch.manual_seed(0)
caches = {}
for blk in layouts:
    if blk == 0:
        caches[blk] = (torch.randn(1, cap, HK, D, dtype=dt), torch.randn(1, cap, HK, D, dtype=dt), None)
    else:
        nb = (cap + blk - 1) // blk
        caches[blk] = (torch.randn(nb, blk, HK, D, dtype=dt), torch.randn(nb, blk, HK, D, dtype=dt),
                       torch.randperm(nb).to(torch.int32).view(1, nb))
q = torch.randn(1, 1, HQ, D, dtype=dt); k = torch.randn(1, 1, HK, D, dtype=dt); v = torch.randn(1, 1, HK, D, dtype=dt)
sl = torch.full((1,), ctx - 1, dtype=torch.int32)
op = torch.ops.pyfastattn.attention_kvcache_fwd
buf = torch.ones(2 * ctx * HK * D * 2 // 4)
res = {bl: [] for bl in layouts}
probe = []
for r in range(rounds):
    c0 = time.thread_time()
    for _ in range(reps): buf.sum()
    probe.append((time.thread_time() - c0) / reps * 1e3)
    for i in range(len(layouts)):
        bl = layouts[(i + r) % len(layouts)]
        kc, vc, tb = caches[bl]
        f = lambda: op(q, kc, vc, k, v, sl, None, None, tb, None, None, True, D ** -0.5, 0.0, -1, 0, 0)
        f()
        c0 = time.thread_time()
        for _ in range(reps): f()
        res[bl].append((time.thread_time() - c0) / reps * 1e3)
c = res[0]
pm = statistics.median(probe)
line = f"contiguous {statistics.median(c):6.2f} ms ({100 * pm / statistics.median(c):3.0f}% of buf.sum() {pm:.2f} ms)"
for bl in layouts[1:]:
    ratio = statistics.median(a / b for a, b in zip(res[bl], c))
    line += f" | paged {bl}: {statistics.median(res[bl]):6.2f} ({ratio:.3f}x)"
print(line)
"""


def main():
    sos = sys.argv[1].split(",")
    alternations = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    rounds = sys.argv[3] if len(sys.argv) > 3 else "12"
    reps = sys.argv[4] if len(sys.argv) > 4 else "3"
    print(f"B1 Hq32 Hk8 D128 32k bf16, one thread, CPU ms per step; load {os.getloadavg()[0]:.1f}")
    for _ in range(alternations):
        for spec in sos:
            so, *settings = spec.split(":")
            env = dict(os.environ, **dict(kv.split("=", 1) for kv in settings))
            out = subprocess.run(
                [sys.executable, "-c", CHILD, so, rounds, reps], capture_output=True, text=True, env=env
            )
            if out.returncode:
                print(out.stderr[-2000:])
                sys.exit(1)
            name = os.path.basename(so) + "".join(":" + kv.split("=", 1)[1] for kv in settings)
            print(f"  {name:10s} {out.stdout.strip()}")
    print(f"load at the end {os.getloadavg()[0]:.1f}")


main()
