"""A/B of the SDPA drop-in (contiguous (B, H, S, D) inputs, the benchmark's
provider call) between two builds, selected by PYTHONPATH (a tree with its
extension built in place). Prints one line per case: median ms of the forward
(no grad) and of forward+backward, over REPS calls (default 7), one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/tree_a python benchmarks/sdpa_layout_ab.py 3
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/tree_b python benchmarks/sdpa_layout_ab.py 3

Alternate the two sides a few times and compare per case."""

import statistics
import sys
import time

import torch

import pyfastattn

torch.set_num_threads(1)
torch.manual_seed(0)
rows = []
for dtype in (torch.float32, torch.bfloat16):
    for s in (512, 1024, 2048):
        for causal in (False, True):
            q, k, v = (torch.randn(1, 8, s, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(1, 8, s, 64, dtype=dtype)

            def fwd(q=q, k=k, v=v, causal=causal):
                with torch.no_grad():
                    pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def fb(q=q, k=k, v=v, g=g, causal=causal):
                o = pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch.autograd.grad(o, (q, k, v), g)

            res = []
            for fn in (fwd, fb):
                fn()
                ts = []
                for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                res.append(statistics.median(ts))
            print(
                f"{str(dtype)[6:]:9s} S{s:5d} causal={causal!s:5s} fwd {res[0]:8.2f} ms  fwd+bwd {res[1]:8.2f} ms",
                flush=True,
            )
