"""The attention op's own fixed cost: the CPU kernel reached straight from
Python (``attention_fwd.default.redispatch(DispatchKeySet(CPU), ...)``, no
autograd layer, no pyfastattn Python), B1 H8 Sq1 D64 fp32, one thread, at a
few key counts, next to torch SDPA on the same values.

One build (the installed pyfastattn), or an A/B of saved builds: one
subprocess per ``.so`` per round (``torch.ops.load_library``), rounds
interleaved, medians of thread CPU time (what a shared, loaded box still
measures). PERF_NOTES.md, "The fixed cost of a call", has what it measured.

    python benchmarks/op_fixed_cost.py                       # installed build, with SDPA
    python benchmarks/op_fixed_cost.py /tmp/a.so,/tmp/b.so 10  # A/B of saved builds, 10 rounds
"""

import json
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, json, torch
import torch.nn.functional as F
torch.set_num_threads(1)
if sys.argv[1] == "-":
    import pyfastattn  # noqa: F401  (loads the installed op library)
else:
    torch.ops.load_library(sys.argv[1])
op = torch.ops.pyfastattn.attention_fwd.default
ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

def per_call_us(f, n=3000):
    for _ in range(n // 2):
        f()
    r = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(n):
            f()
        r.append((time.thread_time() - t0) / n * 1e6)
    return sorted(r)[2]

res = {}
with torch.no_grad():
    for sk in (1, 16, 128, 512):
        q = torch.randn(1, 1, 8, 64); k = torch.randn(1, sk, 8, 64); v = torch.randn(1, sk, 8, 64)
        res[f"op Sk{sk}"] = per_call_us(
            lambda: op.redispatch(ks, q, k, v, None, None, None, None, 1, sk, 0.125, 0.0, -1, -1, True))
        if sys.argv[2] == "1":
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            res[f"sdpa Sk{sk}"] = per_call_us(lambda: F.scaled_dot_product_attention(qt, kt, vt))
print(json.dumps(res))
"""


def run(build: str, with_sdpa: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, build, "1" if with_sdpa else "0"], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"{build}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    builds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["-"]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    acc: dict = {}
    for _ in range(rounds):
        for b in builds:
            for key, us in run(b, with_sdpa=len(builds) == 1).items():
                acc.setdefault(key, {}).setdefault(b, []).append(us)
    names = ["installed" if b == "-" else b.split("/")[-1] for b in builds]
    print(f"us per call, thread CPU time, one thread, median of {rounds} rounds")
    print(f"{'':12s} " + " ".join(f"{n:>12s}" for n in names))
    for key, per_build in acc.items():
        print(f"{key:12s} " + " ".join(f"{statistics.median(per_build[b]):12.2f}" for b in builds))


if __name__ == "__main__":
    main()
