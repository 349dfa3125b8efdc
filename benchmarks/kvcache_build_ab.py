"""A/B of two (or more) builds of the KV-cache op in one run, for PERF_NOTES.

Two builds of the extension cannot live in one process (same op names), so
each round runs one subprocess per saved ``.so`` (``torch.ops.load_library``,
then the raw ``torch.ops.pyfastattn.attention_kvcache_fwd``), the builds
interleaved round by round; medians per build. Each subprocess times a decode
step (B, context, dtype of the target case, Hq 32 Hk 8 D 128, one token
appended) and the ``torch.ones(n).sum()`` read probe over the same bytes,
wall and CPU time (CPU time is what a shared, loaded box still measures).

    cp pyfastattn/_C*.so /tmp/old.so   # before the change; rebuild; then
    cp pyfastattn/_C*.so /tmp/new.so
    AB_THREADS=1 python benchmarks/kvcache_build_ab.py /tmp/old.so,/tmp/new.so 1 32768 bf16 0 5 3
    #                                                  builds     B  context dtype block reps rounds

block: 0 contiguous, N > 0 paged with blocks of N, -1 every sequence reads one
shared cache row (L2-resident: compute only). AB_THREADS: threads (default
2); AB_SPLITS: num_splits (default 0, the kernel's rule).
"""

import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, json, statistics, torch
torch.ops.load_library(sys.argv[1])
import os
torch.set_num_threads(int(os.environ.get('AB_THREADS', '2')))
b, ctx, dt, block, reps = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)[dt]
HQ, HK, D = 32, 8, 128
torch.manual_seed(0)
cap = ctx + 16
bidx = None
if block == -1:  # every sequence reads one shared cache row (L2-resident): compute only
    kc = torch.randn(1, cap, HK, D, dtype=dtype); vc = torch.randn(1, cap, HK, D, dtype=dtype); table = None
    bidx = torch.zeros(b, dtype=torch.int32)
elif block == 0:
    kc = torch.randn(b, cap, HK, D, dtype=dtype); vc = torch.randn(b, cap, HK, D, dtype=dtype); table = None
else:
    nblk = (cap + block - 1) // block
    kc = torch.randn(b * nblk, block, HK, D, dtype=dtype); vc = torch.randn(b * nblk, block, HK, D, dtype=dtype)
    table = torch.randperm(b * nblk).to(torch.int32).view(b, nblk)
q = torch.randn(b, 1, HQ, D, dtype=dtype); k = torch.randn(b, 1, HK, D, dtype=dtype); v = torch.randn(b, 1, HK, D, dtype=dtype)
sl = torch.full((b,), ctx - 1, dtype=torch.int32)
op = torch.ops.pyfastattn.attention_kvcache_fwd
f = lambda: op(q, kc, vc, None if bidx is not None else k, None if bidx is not None else v, sl, bidx, None, table, None, None, True, D ** -0.5, 0.0, -1, 0, int(os.environ.get('AB_SPLITS', '0')))
for _ in range(2): f()
ts = []
c0 = time.process_time()
for _ in range(reps):
    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
cpu = (time.process_time() - c0) / reps
buf = torch.ones(2 * b * ctx * HK * D * kc.element_size() // 4)
bw = []
c0 = time.process_time()
for _ in range(reps):
    t0 = time.perf_counter(); buf.sum(); bw.append(time.perf_counter() - t0)
pcpu = (time.process_time() - c0) / reps
nbytes = 2 * b * ctx * HK * D * kc.element_size()
print(json.dumps(dict(ms=statistics.median(ts) * 1e3, cpu_ms=cpu * 1e3, gbps=nbytes / statistics.median(ts) / 1e9,
                      probe_gbps=nbytes / statistics.median(bw) / 1e9, probe_cpu_ms=pcpu * 1e3)))
"""


def main():
    sos = sys.argv[1].split(",")
    b, ctx, dt, block, reps, rounds = sys.argv[2:8]
    res = {s: [] for s in sos}
    for _ in range(int(rounds)):
        for s in sos:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, s, b, ctx, dt, block, reps], capture_output=True, text=True
            )
            if out.returncode:
                print(out.stderr[-2000:])
                sys.exit(1)
            res[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"B{b} ctx{ctx} {dt} block{block} load {os.getloadavg()[0]:.1f}")
    for s, rs in res.items():

        def med(key, rs=rs):
            return statistics.median(x[key] for x in rs)

        rounds_ms = " ".join(format(x["ms"], ".1f") for x in rs)
        fr = statistics.median(x["gbps"] / x["probe_gbps"] for x in rs)
        print(
            f"  {os.path.basename(s):12s} ms {med('ms'):8.2f} (rounds {rounds_ms})  "
            f"cpu ms/step {med('cpu_ms'):7.2f} (probe {med('probe_cpu_ms'):6.2f})  {med('gbps'):6.2f} GB/s  probe {med('probe_gbps'):6.2f}  frac {100 * fr:5.1f}%"
        )


main()
