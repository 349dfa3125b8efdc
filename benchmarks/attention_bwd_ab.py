"""A/B of saved builds of the CPU attention backward, one and two threads, for PERF_NOTES.

Two builds of the extension cannot live in one process (same op names), so
each round runs one subprocess per saved ``.so`` (``torch.ops.load_library``,
then the raw ``torch.ops.pyfastattn.attention_bwd`` on the output of the raw
forward), the builds interleaved round by round. Each subprocess times every
case on 1 thread, then on N threads (wall clock per call, after warm-up
calls), and reports per case the median, the 20th percentile and the number
of "stalled" calls (over 3x the case's fastest): on this 2-vCPU VM a
two-thread call whose second thread is not scheduled takes one 4-8 ms
scheduler slice per parallel region, so a few stalls move a median. The
summary per build: the median over rounds of each statistic, and the 1 -> N
scaling as (p20 on 1 thread) / (p20 on N threads).

    cp pyfastattn/_C*.so /tmp/old.so   # before the change; rebuild; then
    cp pyfastattn/_C*.so /tmp/new.so
    python benchmarks/attention_bwd_ab.py /tmp/old.so,/tmp/new.so --rounds 5 --quiet-wait 20
    python benchmarks/attention_bwd_ab.py A.so,B.so --seqlens 256,512 --headdims 64 \\
        --dtypes bf16 --causal 0 --reps 40

The raw op leaves out the Python side of a backward call (the autograd
kernel in pyfastattn/_ops.py, ~50-100 us), which is the same for every build.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time, torch
torch.ops.load_library(sys.argv[1])
cases, threads, reps = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {}
for S, D, dt, causal in cases:
    dtype = dict(bf16=torch.bfloat16, fp32=torch.float32)[dt]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, 8, D, dtype=dtype) for _ in range(3))
    wr = 0 if causal else -1
    o, lse = torch.ops.pyfastattn.attention_fwd(q, k, v, None, None, None, None, S, S, D ** -0.5, 0.0, -1, wr, False)
    do = torch.randn_like(o)
    f = lambda: torch.ops.pyfastattn.attention_bwd(do, q, k, v, o, lse, None, None, None, None, S, S, D ** -0.5,
                                                   0.0, -1, wr, False, False, 0.0, None, None)
    res = {}
    for t in (1, threads):
        torch.set_num_threads(t)
        for _ in range(3):
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); f(); ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        res[t] = dict(p50=statistics.median(ts), p20=ts[len(ts) // 5], stalls=sum(x > 3 * ts[0] for x in ts))
    out[f"S{S} D{D} {dt}{' causal' if causal else ''}"] = res
print(json.dumps(out))
"""


def busy_share(dt: float = 0.25) -> float:
    """Share of all CPUs busy over the next dt seconds (/proc/stat)."""

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    t0, i0 = read()
    time.sleep(dt)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit_s: float) -> float:
    """Waits (up to limit_s) until the CPUs are under 10% busy; returns the last share."""
    end = time.time() + limit_s
    share = busy_share()
    while share > 0.10 and time.time() < end:
        share = busy_share()
    return share


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", help="comma-separated saved .so files")
    ap.add_argument("--seqlens", default="256,512,1024")
    ap.add_argument("--headdims", default="64,128")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each subprocess, wait up to this many seconds for the CPUs to be under 10%% busy",
    )
    a = ap.parse_args()
    sos = a.builds.split(",")
    cases = [
        (s, d, dt, c == "1")
        for dt in a.dtypes.split(",")
        for c in a.causal.split(",")
        for d in map(int, a.headdims.split(","))
        for s in map(int, a.seqlens.split(","))
    ]
    res = {s: [] for s in sos}
    loads, busy = [], []
    for _ in range(a.rounds):
        for s in sos:
            if a.quiet_wait > 0:
                busy.append(wait_quiet(a.quiet_wait))
            loads.append(os.getloadavg()[0])
            p = subprocess.run(
                [sys.executable, "-c", CHILD, s, json.dumps(cases), str(a.threads), str(a.reps)],
                capture_output=True,
                text=True,
            )
            if p.returncode:
                print(p.stderr[-2000:])
                sys.exit(1)
            res[s].append(json.loads(p.stdout.strip().splitlines()[-1]))
    n = a.threads
    if busy:
        print(f"CPUs busy just before each subprocess: {min(busy):.0%}-{max(busy):.0%}")
    print(
        f"load (1 min) {min(loads):.2f}-{max(loads):.2f}; ms per call, median over {a.rounds} rounds of "
        f"p50 / p20 of {a.reps} calls; stalls: calls over 3x the fastest, summed over rounds"
    )
    names = [os.path.basename(s) for s in sos]
    print(f"{'case':24s}" + "".join(f" | {nm:>34s}" for nm in names))
    print(f"{'':24s}" + f" | {'1 thr p20':>9s} {f'{n} thr p50/p20':>15s} {f'1->{n}':>6s} st" * len(sos))
    for case in res[sos[0]][0]:
        line = f"{case:24s}"
        for s in sos:
            rs = [r[case] for r in res[s]]

            def med(t, key, rs=rs):
                return statistics.median(r[str(t)][key] for r in rs)

            st = sum(r[str(n)]["stalls"] for r in rs)
            line += (f" | {med(1, 'p20'):9.3f} {med(n, 'p50'):7.3f}/{med(n, 'p20'):7.3f} "
                     f"{med(1, 'p20') / med(n, 'p20'):6.2f} {st:2d}")  # fmt: skip
        print(line)


if __name__ == "__main__":
    main()
