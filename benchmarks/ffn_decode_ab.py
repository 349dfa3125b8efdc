"""A/B of saved builds of the extension for the decode-size CPU FFN
(csrc/cpu/ffn_small_tokens.cpp): one fresh process per build per round,
rounds interleaved (A B A B ...), as benchmarks/dropout_cost_ab.py.

    python benchmarks/ffn_decode_ab.py ROUNDS THREADS name=path/to/_C.so[:VAR=value...] [name=path ...]
    AB_DT=bfloat16,float32,float16 AB_T=1,4,8,16 AB_N=40 AB_D=1024 AB_F=2816 taskset -c 0 \\
        python benchmarks/ffn_decode_ab.py 3 1 before=/tmp/before.so after=pyfastattn/_C.cpython-311-x86_64-linux-gnu.so

Save the "before" build's .so first (cp pyfastattn/_C*.so /tmp/...);
`:VAR=value` after a path runs that build's processes with those
environment variables (one build, two settings:
`off=B.so:PYFASTATTN_X=0 on=B.so:PYFASTATTN_X=1`). Each
build runs from a copy of this tree's pyfastattn/ package (in a temporary
folder) with that .so in it. A process times gated_feed_forward (no grad,
backend "kernel") at each dtype and token count, AB_N calls after a warm-up,
each call taking the next of several weight sets (>= 256 MB in all: read from
memory, as ffn_decode_bench.py does), and prints the median thread CPU time
and wall time in ms; the parent prints, per case, the medians over rounds.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, math, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, pyfastattn
from pyfastattn import ffn
assert pyfastattn.__file__.startswith(sys.argv[1]), pyfastattn.__file__
assert pyfastattn._C.__file__.startswith(sys.argv[1]), pyfastattn._C.__file__
torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
res = {}
D, F = int(os.environ.get("AB_D", "1024")), int(os.environ.get("AB_F", "2816"))
for dt in [getattr(torch, d) for d in os.environ.get("AB_DT", "bfloat16,float32").split(",")]:
    n = max(2, math.ceil(256e6 / (3 * D * F * dt.itemsize)))
    sets = [[(torch.randn(F, D) / 32).to(dt), (torch.randn(F, D) / 32).to(dt), (torch.randn(D, F) / 53).to(dt)]
            for _ in range(n)]
    for t in [int(s) for s in os.environ.get("AB_T", "1,4,16").split(",")]:
        x = torch.randn(t, D).to(dt)
        cpu, wall = [], []
        with torch.no_grad(), pyfastattn.backend("kernel"):
            for i in range(4):
                ffn.gated_feed_forward(x, *sets[i % n])
            for i in range(int(os.environ.get("AB_N", "60"))):
                c, w = time.thread_time(), time.perf_counter()
                ffn.gated_feed_forward(x, *sets[i % n])
                cpu.append(time.thread_time() - c)
                wall.append(time.perf_counter() - w)
        res[f"{str(dt)[6:]} T{t}"] = (statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3)
print(json.dumps(res))
"""


def main() -> None:
    rounds, threads = int(sys.argv[1]), sys.argv[2]
    builds = [a.split("=", 1) for a in sys.argv[3:]]
    envs = {}
    for b in builds:
        b[1], *assigns = b[1].split(":")
        envs[b[0]] = dict(kv.split("=", 1) for kv in assigns)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyfastattn")
    with tempfile.TemporaryDirectory(prefix="ffn_decode_ab_") as tmp:
        trees = {}
        for name, so in builds:
            pkg = os.path.join(tmp, name, "pyfastattn")
            shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
            shutil.copy(so, os.path.join(pkg, "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]))
            trees[name] = os.path.join(tmp, name)
        out = {name: [] for name, _ in builds}
        for _ in range(rounds):
            for name, _ in builds:
                p = subprocess.run(
                    [sys.executable, "-c", CHILD, trees[name], threads],
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, PYTHONPATH="", **envs[name]),
                )
                if p.returncode:
                    sys.exit(p.stderr[-3000:])
                out[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print("load", os.getloadavg())
    for key in out[builds[0][0]][0]:
        cells = []
        for name, _ in builds:
            cpu = statistics.median(r[key][0] for r in out[name])
            wall = statistics.median(r[key][1] for r in out[name])
            cells.append(f"{name}: cpu {cpu:.3f} wall {wall:.3f}")
        print(key.ljust(12), "  ".join(cells))


if __name__ == "__main__":
    main()
