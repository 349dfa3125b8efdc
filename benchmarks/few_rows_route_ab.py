"""A/B of the CPU forward's two kernels for calls with few query rows per kv
head (decode, short speculative or chunked steps): the tiled kernel against
the KV-cache kernel (split-KV, one pass over each kv head's keys for all its
query rows), which csrc/ops.cpp routes such dense calls to.

    python benchmarks/few_rows_route_ab.py [--threads 1] [--rounds 3] [--quick]

Each round runs one fresh process per route (``PYFASTATTN_CPU_FEW_ROWS=tiled``
and ``=kvcache``, read once per process), A B A B ...; a process times
``torch.ops.pyfastattn.attention_fwd`` (bottom-right causal) per shape in
process CPU time (steadier than wall time on a shared machine), median of its
calls. Prints per shape the median over rounds and kvcache / tiled. Shapes
the rule does not route (Sq 16 MHA; MHA decode below 16 MiB of K and V) run
the tiled kernel in both columns: their ratio is the run's noise."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, torch
import pyfastattn  # noqa: F401  (registers the ops)
torch.set_num_threads(int(sys.argv[1]))
shapes = json.loads(sys.argv[2])
fwd = torch.ops.pyfastattn.attention_fwd.default
res = {}
for dt, b, sq, hq, hk, d, sk in shapes:
    dtype = getattr(torch, dt)
    torch.manual_seed(0)
    q = torch.randn(b, sq, hq, d).to(dtype)
    k = torch.randn(b, sk, hk, d).to(dtype)
    v = torch.randn(b, sk, hk, d).to(dtype)
    f = lambda: fwd(q, k, v, None, None, None, None, sq, sk, d ** -0.5, 0.0, -1, 0, True)
    f(); f()
    n = max(5, min(200, int(4e6 / (b * sk * hk * d))))
    ts = []
    for _ in range(n):
        t0 = time.process_time(); f(); ts.append(time.process_time() - t0)
    res[f"{dt} B{b} Sq{sq} Hq{hq} Hk{hk} D{d} Sk{sk}"] = statistics.median(ts) * 1e6
print(json.dumps(res))
"""

FULL = [
    (dt, b, sq, hq, hk, d, sk)
    for dt in ("float32", "bfloat16")
    for b, sq, hq, hk, d in ((1, 1, 8, 8, 64), (1, 1, 32, 8, 128), (1, 1, 8, 2, 64), (1, 4, 32, 8, 128),
                             (1, 8, 32, 8, 128), (1, 2, 8, 8, 64), (1, 16, 8, 8, 64), (4, 1, 32, 8, 128))
    for sk in (512, 4096, 32768)
]
QUICK = [(dt, 1, sq, hq, 8, d, 4096) for dt in ("float32", "bfloat16") for sq, hq, d in ((1, 32, 128), (16, 8, 64))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="threads per process (default: 1)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds, one process per route each (default: 3)")
    ap.add_argument("--quick", action="store_true", help="4 shapes instead of 48")
    a = ap.parse_args()
    shapes = QUICK if a.quick else FULL
    routes = ("tiled", "kvcache")
    runs: dict[str, list[dict]] = {r: [] for r in routes}
    for rnd in range(a.rounds):
        for r in routes:
            env = dict(os.environ, PYFASTATTN_CPU_FEW_ROWS=r)
            out = subprocess.run([sys.executable, "-c", CHILD, str(a.threads), json.dumps(shapes)], env=env,
                                 capture_output=True, text=True, check=True)
            runs[r].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"round {rnd + 1} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"# {a.threads} thread(s), {a.rounds} rounds, process CPU us per call, median over rounds")
    for key in runs["tiled"][0]:
        t = statistics.median(x[key] for x in runs["tiled"])
        kv = statistics.median(x[key] for x in runs["kvcache"])
        print(f"{key:42s} tiled {t:10.1f}  kvcache {kv:10.1f}  kvcache/tiled {kv / t:5.2f}")


if __name__ == "__main__":
    main()
