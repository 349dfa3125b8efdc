"""The fixed cost of a small call: pyfastattn against torch's SDPA, side by side.

At decode and small-training sizes the time per call is mostly fixed cost
(argument checks, routing, the dispatcher, autograd bookkeeping), not the
kernel. This times, in one process and interleaved round by round (A B A B
...), the per-call time of:

* ``pyfastattn.attention`` and ``torch.nn.functional.scaled_dot_product_attention``
  (SDPA and pyfastattn's drop-in ``pyfastattn.scaled_dot_product_attention``
  on contiguous (B, H, S, D) tensors, ``attention`` on (B, S, H, D) ones of
  the same values), with the raw op ``torch.ops.pyfastattn.attention_fwd``;
  in ``no_grad`` and in grad mode with inputs that do not require grad;
  decode (Sq 1) MHA and GQA, and S64 forward and forward + backward;
* ``pyfastattn.attention_with_kvcache`` (one token appended to a 128-slot
  cache) against its raw op ``torch.ops.pyfastattn.attention_kvcache_fwd``
  and against plain PyTorch (write the cache, SDPA over its filled prefix).

Time is the calling thread's CPU time with one thread (the kernel then runs
on that thread; CPU time is what a shared, loaded box still measures), the
process's CPU time with more (``--clock wall`` for wall time). Prints the
median us per call over the rounds and the ratio pyfastattn / the
baseline (< 1: pyfastattn is faster), with ``uptime`` before and after.

    python benchmarks/call_overhead.py                # one thread (default)
    python benchmarks/call_overhead.py --threads 2 --rounds 9 --calls 2000
    python benchmarks/call_overhead.py --tree /tmp/before   # pyfastattn from another tree
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def _import_from_tree() -> None:
    """``--tree DIR``: import pyfastattn from DIR (a tree with its built
    ``_C*.so``, e.g. ``git archive <commit> pyfastattn | tar -x -C DIR`` plus
    the saved ``.so``) instead of the installed one, for before/after runs of
    two builds alternated process by process. An editable install's import
    hook would take precedence over ``sys.path``, so it is removed here."""
    if "--tree" not in sys.argv:
        return
    i = sys.argv.index("--tree")
    tree = sys.argv[i + 1]
    del sys.argv[i : i + 2]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, tree)


_import_from_tree()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pyfastattn  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "(uptime unavailable)"


def per_call_us(fn, calls: int, clock) -> float:
    t0 = clock()
    for _ in range(calls):
        fn()
    return (clock() - t0) / calls * 1e6


def attention_cases(dtype: torch.dtype):
    """(name, grad mode, {provider: callable}) for plain attention."""
    torch.manual_seed(0)
    cases = []
    op = torch.ops.pyfastattn.attention_fwd
    for label, b, sq, sk, hq, hk, d in (
        ("decode MHA B1 H8 Sq1 Sk128 D64", 1, 1, 128, 8, 8, 64),
        ("decode MHA B1 H8 Sq1 Sk512 D64", 1, 1, 512, 8, 8, 64),
        ("decode GQA B1 Hq32 Hk8 Sq1 Sk128 D64", 1, 1, 128, 32, 8, 64),
        ("fwd B1 H8 S64 D64", 1, 64, 64, 8, 8, 64),
    ):
        q = torch.randn(b, sq, hq, d, dtype=dtype)
        k = torch.randn(b, sk, hk, d, dtype=dtype)
        v = torch.randn(b, sk, hk, d, dtype=dtype)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        gqa = hq != hk
        scale = d**-0.5
        fns = {
            "pyfastattn": lambda q=q, k=k, v=v: pyfastattn.attention(q, k, v),
            "pyfastattn sdpa drop-in": lambda qt=qt, kt=kt, vt=vt, gqa=gqa: (
                pyfastattn.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
            ),
            "sdpa": lambda qt=qt, kt=kt, vt=vt, gqa=gqa: F.scaled_dot_product_attention(
                qt, kt, vt, enable_gqa=gqa
            ),
            "raw op": lambda q=q, k=k, v=v, sq=sq, sk=sk, scale=scale: op(
                q, k, v, None, None, None, None, sq, sk, scale, 0.0, -1, -1, True
            ),
        }
        for mode in ("no_grad", "grad"):
            cases.append((f"{label} {mode}", mode, fns))
    # forward + backward at S64 (a training step's attention)
    b, s, h, d = 1, 64, 8, 64
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, requires_grad=True) for _ in range(3))
    qt, kt, vt = (torch.randn(b, h, s, d, dtype=dtype, requires_grad=True) for _ in range(3))
    g, gt = torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, h, s, d, dtype=dtype)
    for causal in (False, True):

        def ours(causal=causal):
            torch.autograd.grad(pyfastattn.attention(q, k, v, causal=causal), (q, k, v), g)

        def dropin(causal=causal):
            out = pyfastattn.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            torch.autograd.grad(out, (qt, kt, vt), gt)

        def sdpa(causal=causal):
            torch.autograd.grad(
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), (qt, kt, vt), gt
            )

        name = f"fwd+bwd{' causal' if causal else ''} B1 H8 S64 D64"
        cases.append((name, "grad", {"pyfastattn": ours, "pyfastattn sdpa drop-in": dropin, "sdpa": sdpa}))
    return cases


def kvcache_cases(dtype: torch.dtype):
    """attention_with_kvcache decode: B4 H4 D32, a 128-slot cache, one token."""
    torch.manual_seed(0)
    b, h, d, cap, pos = 4, 4, 32, 128, 100
    q, k, v = (torch.randn(b, 1, h, d, dtype=dtype) for _ in range(3))
    kc, vc = (torch.randn(b, cap, h, d, dtype=dtype) for _ in range(2))
    seqlens = torch.full((b,), pos, dtype=torch.int32)
    op = torch.ops.pyfastattn.attention_kvcache_fwd

    def torch_path():  # what examples/generate_gpt.py's plain model does
        kc[:, pos : pos + 1] = k
        vc[:, pos : pos + 1] = v
        kk, vv = kc[:, : pos + 1], vc[:, : pos + 1]
        return F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))

    fns = {
        "pyfastattn": lambda: pyfastattn.attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=seqlens, causal=True
        ),
        "pyfastattn int seqlens": lambda: pyfastattn.attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=pos, causal=True
        ),
        "raw op": lambda: op(
            q, kc, vc, k, v, seqlens, None, None, None, None, None, True, d**-0.5, 0.0, -1, 0, 0
        ),
        "sdpa (write cache + SDPA)": torch_path,
    }
    return [(f"kvcache decode B4 H4 D32 cache128 {mode}", mode, fns) for mode in ("no_grad", "grad")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    args = ap.parse_args()
    if args.clock == "wall":
        clock, clock_name = time.perf_counter, "wall time"
    elif args.threads == 1:
        clock, clock_name = time.thread_time, "thread CPU time"
    else:
        clock, clock_name = time.process_time, "process CPU time"
    torch.set_num_threads(args.threads)
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[args.dtype]
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, {args.rounds} rounds x {args.calls} calls, {clock_name}"
    )
    print(f"# pyfastattn from {os.path.dirname(pyfastattn.__file__)}")
    print(f"# uptime: {uptime()}")
    cases = attention_cases(dtype) + kvcache_cases(dtype)
    for name, mode, fns in cases:
        ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
        times = {p: [] for p in fns}
        with ctx:
            for fn in fns.values():  # warm-up
                for _ in range(max(50, args.calls // 10)):
                    fn()
            for _ in range(args.rounds):
                for p, fn in fns.items():  # interleaved: A B C A B C ...
                    times[p].append(per_call_us(fn, args.calls, clock))
        med = {p: statistics.median(t) for p, t in times.items()}
        base = "sdpa" if "sdpa" in med else next(p for p in med if p.startswith("sdpa"))
        cols = "  ".join(f"{p} {m:6.1f}" for p, m in med.items())
        ratios = "  ".join(f"{p}/{base} {med[p] / med[base]:.2f}x" for p in med if p.startswith("pyfastattn"))
        extra = f"  pyfastattn-raw {med['pyfastattn'] - med['raw op']:+.1f}" if "raw op" in med else ""
        print(f"{name:48s} us/call: {cols}  | {ratios}{extra}")
    print(f"# uptime: {uptime()}")


if __name__ == "__main__":
    main()
