"""The KV-cache kernel against benchmarks/kvcache_overlap_micro.cpp on the same memory.

The microbenchmark runs the kernel's loops (v9's tiles, passes and prefetches)
standalone; this script compiles it as a shared library and times one decode
step of each over the *same* K / V tensors in one process, one thread, CPU
time, interleaved rounds, medians (issue 18; PERF_NOTES.md, "The memory
structure, measured outside the kernel"). Micro variants: a (v9's structure),
a-mask (V loaded through masks, as the kernel's P V does), b-head (no
prefetch), b-head-mask (no prefetch, masked V loads); the kernel with its
prefetches (the op as built).

    python benchmarks/kvcache_overlap_vs_kernel.py [rounds]
"""

import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import pyfastattn  # noqa: F401  (loads the op library)

HERE = os.path.dirname(os.path.abspath(__file__))


def build_micro():
    so = os.path.join(tempfile.gettempdir(), f"kvcache_overlap_micro_{os.getpid()}.so")
    src = os.path.join(HERE, "kvcache_overlap_micro.cpp")
    subprocess.run(
        ["g++", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-DKV_MICRO_LIB", "-o", so, src],
        check=True,
    )
    lib = ctypes.CDLL(so)
    lib.kv_micro_step.restype = ctypes.c_double
    lib.kv_micro_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_char_p]
    return lib


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    torch.set_num_threads(1)
    lib = build_micro()
    hq, hk, d, ctx = 32, 8, 128, 32768
    dt = torch.bfloat16
    torch.manual_seed(0)
    kc = torch.randn(1, ctx + 16, hk, d, dtype=dt)
    vc = torch.randn(1, ctx + 16, hk, d, dtype=dt)
    q = torch.randn(1, 1, hq, d, dtype=dt)
    k = torch.randn(1, 1, hk, d, dtype=dt)
    v = torch.randn(1, 1, hk, d, dtype=dt)
    sl = torch.full((1,), ctx - 1, dtype=torch.int32)
    op = torch.ops.pyfastattn.attention_kvcache_fwd

    def kernel():
        c0 = time.thread_time()
        op(q, kc, vc, k, v, sl, None, None, None, None, None, True, d**-0.5, 0.0, -1, 0, 0)
        return (time.thread_time() - c0) * 1e3

    buf = torch.ones(2 * ctx * hk * d * 2 // 4)

    def probe():
        c0 = time.thread_time()
        buf.sum()
        return (time.thread_time() - c0) * 1e3

    runs = {"kernel": kernel, "probe buf.sum()": probe}
    # The micro's row prefetches at the level the kernel uses on this CPU (v18).
    l2 = torch.ops.pyfastattn.cpu_prefetch_level() == "l2"
    for vid in (*(("a-t2", "a-t2-mask") if l2 else ("a", "a-mask")), "b-head", "b-head-mask"):
        runs["micro " + vid] = lambda vid=vid: lib.kv_micro_step(
            kc.data_ptr(), vc.data_ptr(), ctx, vid.encode()
        )
    res = {name: [] for name in runs}
    for f in runs.values():
        f()  # warm-up
    for _ in range(rounds):
        for name, f in runs.items():
            res[name].append(statistics.mean(f() for _ in range(3)))
    print(
        f"B1 Hq{hq} Hk{hk} D{d} ctx {ctx} bf16, one thread, CPU ms per step, {rounds} rounds, load {os.getloadavg()[0]:.1f}"
    )
    for name, xs in res.items():
        print(f"  {name:20s} {statistics.median(xs):7.2f}")


main()
