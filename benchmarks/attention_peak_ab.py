"""The CPU attention kernel against the physical peak of ONE thread (issue 21),
for one tree or as an A/B between trees (saved builds of the package).

    python benchmarks/attention_peak_ab.py [--rounds R] [--cases fwd,fwdbwd] TREE [TREE ...]

A TREE is a directory holding a built ``pyfastattn`` package (a checkout
built in place, or a copy of its ``pyfastattn/`` folder with the ``_C*.so``,
saved before a kernel change). Each round runs one fresh process per tree (A
B A B ...). A process sets one thread, measures that thread's peak with
``torch.ops.pyfastattn.cpu_peak_probe`` (fp32 FMA, bf16 dot; best of 5 in
thread CPU time), then times ``pyfastattn.attention`` (backend "kernel",
B1 H8) in thread CPU time (``time.thread_time``: the work of the one thread,
steady on a shared machine where wall time is not): the forward at S1024 and
S2048, the forward + backward at S512 and S1024, D64 and D128, fp32 and bf16,
causal and not; median of --reps calls after a warm-up. FLOPs as
FlashAttention counts them: 4 S^2 D per head forward, 3.5x that forward +
backward, halved for causal. Prints per case the median over rounds of the
per-process fractions of the peak, and B/A of the times."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, pyfastattn
assert pyfastattn.__file__.startswith(sys.argv[1]), pyfastattn.__file__
passes, reps = sys.argv[2].split(","), int(sys.argv[3])
only = sys.argv[4].split(",") if len(sys.argv) > 4 and sys.argv[4] else None
torch.set_num_threads(1)
def peak(kind):
    probe = torch.ops.pyfastattn.cpu_peak_probe
    iters = 1 << 14
    while True:
        c0 = time.thread_time(); probe(kind, iters); dt = time.thread_time() - c0
        if dt > 0.02: break
        iters *= 4
    best = 0.0
    for _ in range(5):
        c0 = time.thread_time(); f = probe(kind, iters); best = max(best, f / (time.thread_time() - c0))
    return best
pk = {torch.float32: peak("fp32_fma"), torch.bfloat16: peak("bf16_dot")}
res = {"peak fp32": pk[torch.float32] / 1e9, "peak bf16": pk[torch.bfloat16] / 1e9}
grid = {"fwd": (1024, 2048), "fwdbwd": (512, 1024)}
for ps in passes:
    for s in grid[ps]:
        for d in (64, 128):
            for dtype in (torch.float32, torch.bfloat16):
                for causal in (False, True):
                    name = f"{ps} S{s} D{d} {str(dtype)[6:]}{' causal' if causal else ''}"
                    if only and not any(o == name for o in only):
                        continue
                    torch.manual_seed(0)
                    q, k, v = (torch.randn(1, s, 8, d).to(dtype) for _ in range(3))
                    if ps == "fwd":
                        def f():
                            with torch.no_grad():
                                pyfastattn.attention(q, k, v, causal=causal)
                    else:
                        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
                        g = torch.randn(1, s, 8, d).to(dtype)
                        def f():
                            out = pyfastattn.attention(q, k, v, causal=causal)
                            torch.autograd.grad(out, (q, k, v), g)
                    flops = 4.0 * s * s * d * 8 * (3.5 if ps == "fwdbwd" else 1.0) / (2 if causal else 1)
                    with pyfastattn.backend("kernel"):
                        f()
                        ts = []
                        for _ in range(reps):
                            c0 = time.thread_time(); f(); ts.append(time.thread_time() - c0)
                    t = statistics.median(ts)
                    res[name] = (t * 1e3, flops / t / pk[dtype], min(ts) * 1e3)
print(json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="directories holding a built pyfastattn package")
    ap.add_argument("--rounds", type=int, default=2, help="processes per tree, interleaved (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per case in a process (default 5)")
    ap.add_argument("--cases", default="fwd,fwdbwd", help="passes: fwd, fwdbwd or both (default both)")
    ap.add_argument(
        "--only", default="", help="comma list of case names, e.g. 'fwd S1024 D64 float32 causal'"
    )
    args = ap.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")
    for r in range(args.rounds):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tree, args.cases, str(args.reps), args.only],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
            x = runs[tree][-1]
            print(f"round {r} {tree}: peak fp32 {x['peak fp32']:.0f} bf16 {x['peak bf16']:.0f} GFLOP/s"
                  f"  load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    keys = [k for k in runs[trees[0]][0] if not k.startswith("peak")]
    print("\n1 thread, thread CPU time; median over rounds of the per-process median: ms, fraction of peak;"
          " B/A of those medians, and (in brackets) of the fastest call over all rounds")  # fmt: skip
    hdr = "".join(f" | {chr(65 + i)} ms  of pk" for i in range(len(trees)))
    print(f"{'case':34s}{hdr}" + ("" if len(trees) == 1 else "".join(
        f" | {chr(65 + i)}/A (best)" for i in range(1, len(trees)))))  # fmt: skip
    for k in keys:
        row = f"{k:34s}"
        ms, best = [], []
        for t in trees:
            m = statistics.median(x[k][0] for x in runs[t])
            f = statistics.median(x[k][1] for x in runs[t])
            ms.append(m)
            best.append(min(x[k][2] for x in runs[t]))
            row += f" | {m:7.1f} {100 * f:4.0f}%"
        for m, b in zip(ms[1:], best[1:]):
            row += f" | {m / ms[0]:.3f} ({b / best[0]:.3f})"
        print(row)
    for t in trees:
        pf = statistics.median(x["peak fp32"] for x in runs[t])
        pb = statistics.median(x["peak bf16"] for x in runs[t])
        print(f"{t}: 1-thread peak fp32 {pf:.0f}, bf16 {pb:.0f} GFLOP/s (median over rounds)")


if __name__ == "__main__":
    main()
