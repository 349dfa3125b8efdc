"""A/B of the CPU kernel's dropout cost between two trees, each with its
extension built in place (``python setup.py build_ext --inplace``).

    python benchmarks/dropout_cost_ab.py TREE_A TREE_B [ROUNDS=2]

Each round runs one fresh process per tree (A B A B ...). A process times
``pyfastattn.attention`` forward + backward (B4 H8 S512 D64 causal) on one
thread with p = 0 and p = 0.1 interleaved call by call, fp32 and bf16, 15
calls each after a warm-up, in thread CPU time (``time.thread_time``: the
work of the one thread, steady to 1-2% on a loaded machine where wall time
and multi-threaded process time are not). Prints each process's min and
median per case, then per tree the dropout cost (p 0.1 / p 0, of the medians
over rounds of the per-process medians) and B/A per case."""

from __future__ import annotations

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
torch.set_num_threads(1)
b, s, h, d = 4, 512, 8, 64
res = {}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d).to(dtype).requires_grad_(True) for _ in range(3))
    g = torch.randn(b, s, h, d).to(dtype)
    def f(p):
        out = pyfastattn.attention(q, k, v, causal=True, dropout_p=p)
        torch.autograd.grad(out, (q, k, v), g)
    with pyfastattn.backend("kernel"):
        for p in (0.0, 0.1):
            f(p); f(p)
        cpu = {0.0: [], 0.1: []}
        for _ in range(15):
            for p in (0.0, 0.1):
                c0 = time.thread_time()
                f(p)
                cpu[p].append((time.thread_time() - c0) * 1e3)
    name = str(dtype).split(".")[-1]
    for p in (0.0, 0.1):
        res[f"{name} p={p}"] = (statistics.median(cpu[p]), min(cpu[p]))
print(json.dumps(res))
"""


def main() -> None:
    if len(sys.argv) < 3:
        print(__doc__)
        raise SystemExit(2)
    trees = [os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    env = dict(os.environ, PYTHONPATH="")
    for r in range(rounds):
        for tree in trees:
            out = subprocess.run([sys.executable, "-c", CHILD, tree], capture_output=True, text=True, check=True,
                                 env=env)  # fmt: skip
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {tree}: {runs[tree][-1]}  load {os.getloadavg()[0]:.1f}", flush=True)
    keys = list(runs[trees[0]][0])
    med = {
        t: {k: tuple(statistics.median(x[k][i] for x in runs[t]) for i in (0, 1)) for k in keys}
        for t in trees
    }
    a, b = trees
    print("\nthread CPU ms, median over rounds of the per-process median (min):")
    for k in keys:
        x, y = med[a][k], med[b][k]
        print(f"{k:16s} A {x[0]:8.1f} ({x[1]:7.1f})  B {y[0]:8.1f} ({y[1]:7.1f})  "
              f"B/A {y[0] / x[0]:.3f} ({y[1] / x[1]:.3f})")  # fmt: skip
    for t, label in ((a, "A"), (b, "B")):
        for dt in ("float32", "bfloat16"):
            c = med[t][f"{dt} p=0.1"][0] / med[t][f"{dt} p=0.0"][0]
            m = med[t][f"{dt} p=0.1"][1] / med[t][f"{dt} p=0.0"][1]
            print(f"{label} dropout cost {dt}: {c:.3f}x (of the mins: {m:.3f}x)")


if __name__ == "__main__":
    main()
