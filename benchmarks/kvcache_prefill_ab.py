"""A/B of builds: many query rows appended into a KV cache (prefill, long chunks).

The pattern of ``kvcache_build_ab.py``: two builds of the extension cannot
live in one process (same op names), so each case runs one subprocess per
saved ``.so`` (``torch.ops.load_library``, then the raw
``torch.ops.pyfastattn.attention_kvcache_fwd``), builds interleaved round by
round; medians per build. Each subprocess appends ``sq`` rows to every
sequence of a B2 Hq32 Hk8 D128 cache at position ``2048 - sq`` (causal, so
2048 keys attended) and reports one thread's CPU ms per call, which a shared,
loaded box still measures. Cases: 64 / 256 / 1024 query rows per kv head,
contiguous and paged (blocks of 16, shuffled block table), bf16 and fp32.

    cp pyfastattn/_C*.so /tmp/old.so   # before the change; rebuild; then
    cp pyfastattn/_C*.so /tmp/new.so
    python benchmarks/kvcache_prefill_ab.py /tmp/old.so,/tmp/new.so 3
    #                                       builds              rounds

PERF_NOTES.md, "Many query rows over a paged, batch-indexed or left-padded
cache", has the table this produced.
"""

import json
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, json, torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(1)
sq, block, dt = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)[dt]
B, HQ, HK, D, ctx = 2, 32, 8, 128, 2048
torch.manual_seed(0)
cap = ctx + 16
if block == 0:
    kc = torch.randn(B, cap, HK, D, dtype=dtype); vc = torch.randn(B, cap, HK, D, dtype=dtype); table = None
else:
    nblk = (cap + block - 1) // block
    kc = torch.randn(B * nblk, block, HK, D, dtype=dtype); vc = torch.randn(B * nblk, block, HK, D, dtype=dtype)
    table = torch.randperm(B * nblk).to(torch.int32).view(B, nblk)
q = torch.randn(B, sq, HQ, D, dtype=dtype)
k = torch.randn(B, sq, HK, D, dtype=dtype); v = torch.randn(B, sq, HK, D, dtype=dtype)
seqlens = torch.full((B,), ctx - sq, dtype=torch.int32)
op = torch.ops.pyfastattn.attention_kvcache_fwd
f = lambda: op(q, kc, vc, k, v, seqlens, None, None, table, None, None, True, D ** -0.5, 0.0, -1, 0, 0)
f()
reps = max(2, 200 // sq)
c0 = time.process_time()
for _ in range(reps):
    f()
print(json.dumps((time.process_time() - c0) / reps * 1e3))
"""


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    builds = sys.argv[1].split(",")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cases = [(sq, blk, dt) for dt in ("bf16", "fp32") for sq in (16, 64, 256) for blk in (0, 16)]
    res: dict = {}
    for _ in range(rounds):
        for case in cases:
            for build in builds:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, build, *map(str, case)], capture_output=True, text=True
                )
                if out.returncode:
                    sys.exit(f"{build} {case}: {out.stderr[-2000:]}")
                res.setdefault((case, build), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("one thread, CPU ms per call (median of", rounds, "rounds)")
    print("rows/kv head  layout   dtype | " + " | ".join(b.split("/")[-1] for b in builds))
    for case in cases:
        sq, blk, dt = case
        cells = " | ".join(f"{statistics.median(res[(case, b)]):8.2f}" for b in builds)
        print(f"{sq * 4:12d}  {'paged16' if blk else 'contig':7s}  {dt:5s} | {cells}")


if __name__ == "__main__":
    main()
