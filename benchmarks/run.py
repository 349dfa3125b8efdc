#!/usr/bin/env python
"""pyfastattn benchmarks: the fused kernel beside PyTorch's own attention.

    python benchmarks/run.py [--suite attention|attention-bwd|ffn|all] [--device auto|cpu|cuda]
                             [--dtype float32,bfloat16] [--quick|--full] [--threads N] [--out DIR]

Every provider runs in this process on the same inputs. Before any timing,
each provider's output is checked against the pyfastattn reference with the
tolerance rule (error <= 2x plain PyTorch's error in the same dtype, plus the
rounding floor); a wrong provider is reported as FAIL and never timed.

FLOPs: 4*B*H*Sq*Sk*D forward (half for causal), x2.5 for backward.
CPU timing: torch.utils.benchmark with an explicit thread count.
CUDA timing: CUDA events over rotated input sets larger than L2.
Reports the median with p20/p80. Writes results.csv and results.md to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import pyfastattn  # noqa: E402
from pyfastattn import reference  # noqa: E402
from pyfastattn.testing import tolerance_failure  # noqa: E402


@dataclass
class Shape:
    b: int
    h: int
    s: int
    d: int
    causal: bool

    def flops(self, backward: bool) -> float:
        f = 4.0 * self.b * self.h * self.s * self.s * self.d
        if self.causal:
            f /= 2
        return f * (2.5 if backward else 1.0)

    def __str__(self) -> str:
        return f"B{self.b} H{self.h} S{self.s} D{self.d}{' causal' if self.causal else ''}"


def shapes_for(
    device: str, quick: bool, seqs: list[int] | None = None, dims: list[int] | None = None
) -> list[Shape]:
    """The grid; ``seqs``/``dims`` replace the sequence lengths / head dims."""
    if device == "cpu":
        seqs = seqs or ([512, 1024] if quick else [512, 1024, 2048, 4096])
        dims = dims or ([64] if quick else [64, 128])
        return [Shape(1, 8, s, d, c) for d in dims for s in seqs for c in (False, True)]
    # CUDA: B*S = 16384, H*D = 2048 (the FlashAttention benchmark convention)
    seqs = seqs or ([1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384])
    dims = dims or ([128] if quick else [64, 128])
    return [
        Shape(max(1, 16384 // s), max(1, 2048 // d), s, d, c)
        for d in dims
        for s in seqs
        for c in (False, True)
    ]


# ---------------------------------------------------------------------------
# providers: name -> (callable(q, k, v, causal) -> out in (B, H, S, D), or a reason it can't run)
# inputs are (B, H, S, D) like SDPA
# ---------------------------------------------------------------------------


def _naive(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _pyfastattn(q, k, v, causal):
    with pyfastattn.backend("kernel"):
        return pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _pyfastattn_reference(q, k, v, causal):
    with pyfastattn.backend("reference"):
        return pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def providers(device: str) -> dict:
    from torch.nn.attention import SDPBackend

    p = {"pyfastattn": _pyfastattn}
    if device == "cpu":
        p["torch sdpa (flash)"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        p["torch sdpa (math)"] = _sdpa(SDPBackend.MATH)
    else:
        for name, be in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):
            p[f"torch sdpa ({name})"] = _sdpa(be)
    p["naive matmul-softmax-matmul"] = _naive
    p["pyfastattn reference"] = _pyfastattn_reference
    return p


# ---------------------------------------------------------------------------
# correctness gate
# ---------------------------------------------------------------------------


def check(out, q, k, v, causal) -> str | None:
    """None if `out` passes the tolerance rule, else a short failure string."""
    ref = reference.attention(
        q.double().transpose(1, 2),
        k.double().transpose(1, 2),
        v.double().transpose(1, 2),
        window_right=0 if causal else -1,
    )[0].transpose(1, 2)
    failure = tolerance_failure("out", out, ref, _naive(q, k, v, causal), q.dtype)
    return None if failure is None else f"FAIL ({failure})"


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def time_cpu(fn, threads: int, min_run_time: float) -> list[float]:
    from torch.utils import benchmark

    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return [x * 1e3 for x in m.times]


def time_cuda(fns, reps: int) -> list[float]:
    """fns: callables over rotated input sets; returns per-call ms."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def matmul_ceiling(device, dtype, threads) -> float:
    """TFLOP/s of a square matmul in this run: the roof for 'fraction of ceiling'."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if device == "cpu":
        ms = statistics.median(time_cpu(lambda: a @ b, threads, 0.5))
    else:
        ms = statistics.median(time_cuda([lambda: a @ b], 20))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except Exception:
        return "unknown"


def progress(i, n, label):
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:60s}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="all", choices=["attention", "attention-bwd", "ffn", "all"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="comma list, e.g. float32,bfloat16")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", default=True)
    g.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seqlens", default=None, help="comma list replacing the grid's sequence lengths")
    ap.add_argument("--headdims", default=None, help="comma list replacing the grid's head dims")
    ap.add_argument("--providers", default=None,
                    help='comma list of attention provider names to run, e.g. "pyfastattn,torch sdpa (flash)"')  # fmt: skip
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out"))
    args = ap.parse_args(argv)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    quick = not args.full
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    default_dtypes = "float32,bfloat16" if device == "cpu" else "bfloat16,float16"
    dtypes = [getattr(torch, n.strip()) for n in (args.dtype or default_dtypes).split(",")]
    suites = ["attention", "attention-bwd", "ffn"] if args.suite == "all" else [args.suite]
    run_ffn = "ffn" in suites
    suites = [x for x in suites if x != "ffn"]
    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
    shapes = shapes_for(device, quick, ints(args.seqlens), ints(args.headdims))
    provs = providers(device)
    if args.providers:
        wanted = [p.strip() for p in args.providers.split(",")]
        unknown = [p for p in wanted if p not in provs]
        if unknown:
            ap.error(f"unknown providers {unknown}; available: {list(provs)}")
        provs = {name: fn for name, fn in provs.items() if name in wanted}
    dev_name = (
        torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    )
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sha = git_sha()
    min_run = 0.2 if quick else 1.0

    ceilings = {dt: matmul_ceiling(device, dt, threads) for dt in dtypes}
    rows = []
    jobs = [(su, dt, sh) for su in suites for dt in dtypes for sh in shapes]
    for ji, (suite, dtype, shape) in enumerate(jobs):
        progress(ji, len(jobs), f"{suite} {dtype} {shape}")
        backward = suite == "attention-bwd"
        nsets = 1 if device == "cpu" else 4  # rotate > L2 on GPU
        sets = [
            tuple(
                torch.randn(
                    shape.b, shape.h, shape.s, shape.d, device=device, dtype=dtype, requires_grad=backward
                )
                for _ in range(3)
            )
            for _ in range(nsets)
        ]
        for name, fn in provs.items():
            if name == "pyfastattn reference" and device == "cpu" and shape.s > 2048:
                continue  # O(S^2) memory in fp32; slower than the naive row and adds nothing
            row = dict(
                provider=name,
                suite=suite,
                shape=str(shape),
                dtype=str(dtype).replace("torch.", ""),
                causal=shape.causal,
                device=dev_name,
                torch=torch.__version__,
                cuda=torch.version.cuda or "",
                sha=sha,
                timestamp=stamp,
                threads=threads if device == "cpu" else "",
            )
            q, k, v = sets[0]
            try:
                if name == "pyfastattn" and (
                    reason := pyfastattn.kernel_unsupported_reason(
                        q.transpose(1, 2), v.transpose(1, 2), mode="kernel"
                    )
                ):
                    raise RuntimeError(reason)
                with torch.no_grad():
                    out = fn(q, k, v, shape.causal)
                bad = check(out, q, k, v, shape.causal) if shape.s <= 2048 else None
            except Exception as e:  # unsupported on this shape/device: say why, keep going
                row.update(status=f"unsupported: {str(e).splitlines()[0][:100]}")
                rows.append(row)
                continue
            if bad:
                row.update(status=bad)
                rows.append(row)
                continue
            if backward:
                gs = [torch.randn_like(q) for _ in range(nsets)]

                def make(i, fn=fn, sets=sets, causal=shape.causal, gs=gs):
                    qi, ki, vi = sets[i]
                    return lambda: torch.autograd.grad(fn(qi, ki, vi, causal), (qi, ki, vi), gs[i])
            else:

                def make(i, fn=fn, sets=sets, causal=shape.causal):
                    qi, ki, vi = sets[i]

                    def call():
                        with torch.no_grad():
                            return fn(qi, ki, vi, causal)

                    return call

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                times = time_cuda([make(i) for i in range(nsets)], reps=30 if quick else 100)
                peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            else:
                times = time_cpu(make(0), threads, min_run)
                peak = float("nan")
            p50 = statistics.median(times)
            tflops = shape.flops(backward) / (p50 * 1e-3) / 1e12
            row.update(
                status="ok",
                p20_ms=pct(times, 20),
                p50_ms=p50,
                p80_ms=pct(times, 80),
                tflops=tflops,
                frac_ceiling=tflops / ceilings[dtype],
                peak_mem_mib=peak,
            )
            rows.append(row)
    progress(len(jobs), len(jobs), "done")

    ffn_rows = []
    if run_ffn:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import ffn_bench

        print("ffn suite ...", file=sys.stderr)
        ffn_rows = ffn_bench.run(device, dtypes, quick, threads)
        for r in ffn_rows:
            r.update(device=dev_name, torch=torch.__version__, cuda=torch.version.cuda or "", sha=sha,
                     timestamp=stamp, threads=threads if device == "cpu" else "")  # fmt: skip

    # ---- console table with the ratio to the first torch SDPA provider ----
    sdpa_name = "torch sdpa (flash)"
    print(f"\ndevice: {dev_name}; torch {torch.__version__}; threads {threads}; pyfastattn {sha}")
    for dt in dtypes:
        print(f"matmul ceiling {dt}: {ceilings[dt]:.3f} TFLOP/s")
    hdr = f"{'suite':13s} {'dtype':9s} {'shape':26s} {'provider':28s} {'p50 ms':>9s} {'p20-p80':>17s} {'TFLOP/s':>8s} {'%roof':>6s} {'vs sdpa':>7s}"
    print(hdr)
    print("-" * len(hdr))
    lookup = {(r["suite"], r["dtype"], r["shape"], r["provider"]): r for r in rows}
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['suite']:13s} {r['dtype']:9s} {r['shape']:26s} {r['provider']:28s} {r['status']}")
            continue
        base = lookup.get((r["suite"], r["dtype"], r["shape"], sdpa_name))
        ratio = (base["p50_ms"] / r["p50_ms"]) if base and base.get("status") == "ok" else float("nan")
        r["speedup_vs_sdpa"] = ratio
        print(
            f"{r['suite']:13s} {r['dtype']:9s} {r['shape']:26s} {r['provider']:28s} {r['p50_ms']:9.3f} "
            f"{r['p20_ms']:8.3f}-{r['p80_ms']:<8.3f} {r['tflops']:8.3f} {100 * r['frac_ceiling']:5.1f}% {ratio:6.2f}x"
        )

    if ffn_rows:
        print()
        ffn_bench.print_table(ffn_rows)
    rows += ffn_rows

    fields = [
        "provider",
        "suite",
        "shape",
        "dtype",
        "causal",
        "status",
        "p20_ms",
        "p50_ms",
        "p80_ms",
        "tflops",
        "frac_ceiling",
        "speedup_vs_sdpa",
        "vs_eager",
        "vs_floor",
        "peak_mem_mib",
        "device",
        "threads",
        "torch",
        "cuda",
        "sha",
        "timestamp",
    ]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(
            f"# pyfastattn benchmark\n\n`{' '.join(['python', 'benchmarks/run.py', *(argv or sys.argv[1:])])}`\n\n"
        )
        f.write(
            f"device {dev_name}, torch {torch.__version__}, threads {threads}, pyfastattn {sha}, {stamp}\n\n"
        )
        f.write(
            "| suite | dtype | shape | provider | p50 ms | p20 / p80 ms | TFLOP/s | vs sdpa |\n|---|---|---|---|---|---|---|---|\n"
        )
        for r in rows:
            if r["status"] != "ok":
                f.write(
                    f"| {r['suite']} | {r['dtype']} | {r['shape']} | {r['provider']} | {r['status']} | | | |\n"
                )
            else:
                f.write(
                    f"| {r['suite']} | {r['dtype']} | {r['shape']} | {r['provider']} | {r['p50_ms']:.3f} | "
                    f"{r['p20_ms']:.3f} / {r['p80_ms']:.3f} | {r['tflops']:.3f} | {r.get('speedup_vs_sdpa', float('nan')):.2f}x |\n"
                )
    print(f"\nwrote {args.out}/results.csv and results.md")
    return 1 if any(r["status"].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
