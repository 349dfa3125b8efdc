"""A/B of saved builds on decode calls in both K/V layouts, read cold and hot.

Each round runs one fresh process per TREE (a directory holding a built
``pyfastattn`` package, e.g. a copy of ``pyfastattn/`` with its ``_C*.so``
saved before a change), rounds interleaved (A B A B ...). A process times a
fixed list of decode calls -- ``attention_with_kvcache`` and plain
``attention`` with one query row, GQA and MHA, over (B, S, H, D) tensors and
over (B, H, S, D) tensors passed as views (what the SDPA drop-in and Hugging
Face hand over) -- cold (one call per "layer", ~96 MiB of layers rotated, so
K / V come from memory as in a decode step) and hot (one layer in a loop).

    python benchmarks/decode_layouts_ab.py [--threads 2] [--rounds 2] TREE [TREE ...]

One thread: thread CPU time; more: wall clock (a busy box shows as
multi-millisecond outliers: rerun). Median of 9 passes, microseconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import sys, time
tree, threads, bench_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, tree)
import torch, pyfastattn
assert pyfastattn.__file__.startswith(tree), pyfastattn.__file__
sys.path.append(bench_dir)
from bench_common import median_pass_us
torch.set_num_threads(threads)
timer = time.thread_time if threads == 1 else time.perf_counter
def med(fns):
    return median_pass_us(fns, timer, reps=9)
CASES = [  # api, layout, b, hq, hk, d, sk, dtype
    ("kvcache", "bshd", 1, 32, 8, 128, 256, torch.bfloat16),
    ("kvcache", "bshd", 1, 32, 8, 128, 512, torch.bfloat16),
    ("kvcache", "bshd", 1, 32, 8, 128, 1024, torch.bfloat16),
    ("attention", "bshd", 1, 32, 8, 128, 512, torch.bfloat16),
    ("attention", "bshd", 1, 8, 8, 64, 512, torch.bfloat16),
    ("attention", "bshd", 1, 12, 12, 64, 2048, torch.bfloat16),
    ("attention", "bhsd", 1, 32, 32, 128, 4096, torch.bfloat16),
    ("attention", "bhsd", 1, 8, 8, 64, 16384, torch.float32),
    ("kvcache", "bhsd", 1, 32, 32, 128, 2048, torch.bfloat16),
]
for api, lay, b, hq, hk, d, sk, dt in CASES:
    per = 2 * b * sk * hk * d * dt.itemsize
    layers = max(2, (96 << 20) // per)
    def mk(h, s):
        if lay == "bhsd":
            return torch.randn(b, h, s, d, dtype=dt).transpose(1, 2)
        return torch.randn(b, s, h, d, dtype=dt)
    qs = [mk(hq, 1) for _ in range(layers)]
    ks = [mk(hk, sk) for _ in range(layers)]
    vs = [mk(hk, sk) for _ in range(layers)]
    op = pyfastattn.attention if api == "attention" else pyfastattn.attention_with_kvcache
    with torch.no_grad():
        calls = [lambda q=q, k=k, v=v: op(q, k, v) for q, k, v in zip(qs, ks, vs)]
        cold, hot = med(calls), med(calls[:1] * layers)
    print(f"{api:9s} {lay} B{b} Hq{hq} Hk{hk} D{d} Sk{sk} {str(dt)[6:]}: cold {cold:8.1f} hot {hot:8.1f}", flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for r in range(args.rounds):
        for tree in args.trees:
            tree = os.path.abspath(tree)
            print(f"== round {r + 1} {tree} load {os.getloadavg()[0]:.2f}", flush=True)
            subprocess.run([sys.executable, "-c", CHILD, tree, str(args.threads), BENCH_DIR], check=True)


if __name__ == "__main__":
    main()
