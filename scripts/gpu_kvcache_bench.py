"""Times one decode step with append on CUDA (issue 18's target case: B 1,
Hq 32, Hk 8, D 128, bf16, context 32k) through pyfastattn.attention_with_kvcache
with backend "kernel", contiguous and paged (blocks 16, 64, 256), beside torch
SDPA on views of the same cache, and the device's read bandwidth measured in
the same run by summing a buffer of the cache's size. One line per layout and
num_splits (--splits):
median us (p20-p80), GB/s of cache read, the fraction of the measured read
bandwidth, SDPA's median and the speedup over it, and the device time of the
KV-cache kernels alone (torch.profiler; the op's host work excluded). --kernels times each
split-KV kernel (PYFASTATTN_KVCACHE_CUDA_KERNEL: simt, the default, and mma,
the tensor-core one) on the same caches.

    python scripts/gpu_kvcache_bench.py [--batch 1] [--context 32768] [--reps 50] [--splits 0,64,128]
        [--kernels simt,mma] [--out FILE.csv]
    python scripts/gpu_kvcache_bench.py --check-args
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch
import torch.nn.functional as F

import pyfastattn


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(p20, median, p80) in microseconds, CUDA events around each call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 5], statistics.median(times), times[(4 * len(times)) // 5]


def kernel_us(fn, reps: int) -> float | None:
    """Device time per call of the KV-cache kernels fn launches (append, split,
    combine), from torch.profiler's CUDA activity: the step without the op's
    host work (the metadata's device-to-host copy for the bounds checks, the
    workspace, the launches), which the event timing of `timed` includes.
    None when the profiler records no such kernel (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.key_averages():
        if "kvcache_" in e.key and "_kernel" in e.key:  # kvcache_{append,split,split_mma,combine}_kernel
            total += getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
    return total / reps if total > 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument(
        "--splits", default="0",
        help="comma list of num_splits to time for each layout (0: the kernel's own choice); e.g. 0,16,64,128 "
        "times the split count that the first H200 run suggested was too low (21%% of the read bandwidth)",
    )  # fmt: skip
    ap.add_argument(
        "--kernels", default="simt",
        help="comma list of split-KV kernels to time (PYFASTATTN_KVCACHE_CUDA_KERNEL): simt, mma",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="also write the rows as CSV")
    ap.add_argument("--check-args", action="store_true", help="parse the arguments and exit")
    args = ap.parse_args()
    splits = [int(x) for x in args.splits.split(",") if x.strip()]
    if not splits or min(splits) < 0:
        ap.error(f"--splits must be a comma list of ints >= 0, got {args.splits!r}")
    kernels = [x.strip() for x in args.kernels.split(",") if x.strip()]
    if not kernels or any(x not in ("simt", "mma") for x in kernels):
        ap.error(f"--kernels must be a comma list of simt / mma, got {args.kernels!r}")
    if args.check_args:
        print(f"gpu_kvcache_bench: {args}")
        return
    torch.manual_seed(0)
    b, ctx, hq, hk, d, dt = args.batch, args.context, args.heads, args.kv_heads, args.head_dim, torch.bfloat16
    dev = "cuda"
    cache_bytes = 2 * b * ctx * hk * d * dt.itemsize  # K and V attended per step
    probe = torch.randn(cache_bytes // 4, device=dev)  # fp32 buffer of the same bytes
    _, probe_us, _ = timed(lambda: probe.sum(), args.reps)
    peak = cache_bytes / probe_us / 1e3  # GB/s
    print(f"read bandwidth (sum of {cache_bytes / 2**20:.0f} MiB): {peak:.0f} GB/s")
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dt)
    k = torch.randn(b, 1, hk, d, device=dev, dtype=dt)
    v = torch.randn(b, 1, hk, d, device=dev, dtype=dt)
    seqlens = torch.full((b,), ctx - 1, dtype=torch.int32, device=dev)  # the step appends key ctx - 1
    rows = []
    sdpa_us = None
    for layout, block in (("contiguous", None), ("paged16", 16), ("paged64", 64), ("paged256", 256)):
        if block is None:
            kc = torch.randn(b, ctx, hk, d, device=dev, dtype=dt)
            table = None
        else:
            nblk = (ctx + block - 1) // block
            kc = torch.randn(b * nblk, block, hk, d, device=dev, dtype=dt)
            table = torch.randperm(b * nblk, device=dev).to(torch.int32).view(b, nblk)
        vc = torch.randn_like(kc)

        for kernel, ns in [(kn, ns) for kn in kernels for ns in splits]:

            def step(kc=kc, vc=vc, table=table, ns=ns):
                pyfastattn.attention_with_kvcache(
                    q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table, causal=True, num_splits=ns
                )

            os.environ["PYFASTATTN_KVCACHE_CUDA_KERNEL"] = kernel  # read by the op on every call
            with pyfastattn.backend("kernel"):
                p20, med, p80 = timed(step, args.reps)
                try:
                    kus = kernel_us(step, args.reps)
                except Exception as e:  # the profiler is a diagnostic: its failure must not end the run
                    print(f"# kernel time not measured: {type(e).__name__}: {e}")
                    kus = None
            if sdpa_us is None:  # SDPA on views of the same cache (it reads them strided)
                qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                _, sdpa_us, _ = timed(
                    lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
                    args.reps,
                )
            gbs = cache_bytes / med / 1e3
            row = dict(
                layout=layout, kernel=kernel, num_splits=ns, batch=b, context=ctx, us_p20=round(p20, 1), us=round(med, 1),
                us_p80=round(p80, 1), gb_s=round(gbs), of_read_bw=round(gbs / peak, 3), sdpa_us=round(sdpa_us, 1),
                speedup_vs_sdpa=round(sdpa_us / med, 2), kernel_us=None if kus is None else round(kus, 1),
                kernel_of_read_bw=None if kus is None else round(cache_bytes / kus / 1e3 / peak, 3),
            )  # fmt: skip
            rows.append(row)
            print(
                f"{layout:10s} {kernel:4s} splits {ns:3d} {med:8.1f} us ({p20:.1f}-{p80:.1f})  {gbs:6.0f} GB/s"
                f"  {gbs / peak:5.1%} of read bw  sdpa {sdpa_us:.1f} us  {sdpa_us / med:.2f}x"
                + (
                    ""
                    if kus is None
                    else f"  kernels alone {kus:.1f} us ({cache_bytes / kus / 1e3 / peak:.1%})"
                )
            )
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
