"""The CPU attention forward's thread scaling, 1 -> N threads, measured with
the two thread counts interleaved in one process (issue 21 item 5).

    python benchmarks/attention_thread_scaling.py [--threads N] [--rounds R] [--reps K]
        [--seqlens 1024,2048] [--headdims 64,128] [--dtypes float32,bfloat16]

This VM's speed drifts by up to ~45% within minutes, so a 1-thread time taken
after the N-thread one (benchmarks/run.py's `1->N` column) carries the drift
between the two into the ratio. Here each round times K calls on N threads,
then K calls on 1 thread, of the same inputs, back to back; a case's scaling is
the median over R rounds of (1-thread median / N-thread median) of its round,
so drift slower than a round cancels. Also printed: the N-thread median over
rounds as ms and as a share of the N-thread peak (csrc/cpu/peak_probe.cpp,
measured at the start like benchmarks/run.py does), and the 1-minute load
average before and after (a load above ~N - 0.5 on an N-core box means other
work shared the cores: the N-thread times are then not valid).

B1 H8 dense inputs [B, S, H, D], backend "kernel", causal and not; FLOPs
4 S^2 D H forward, halved for causal (FlashAttention's count)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

import pyfastattn  # noqa: E402


def median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="the N of 1 -> N (default 2)")
    ap.add_argument("--rounds", type=int, default=7, help="N / 1 thread pairs per case (default 7)")
    ap.add_argument("--reps", type=int, default=9, help="timed calls per thread count and round (default 9)")
    ap.add_argument(
        "--seqlens", default="1024,2048", help="sequence lengths, comma-separated (default 1024,2048)"
    )
    ap.add_argument("--headdims", default="64,128", help="head dims, comma-separated (default 64,128)")
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="torch dtype names, comma-separated (default float32,bfloat16)",
    )
    args = ap.parse_args()

    n = args.threads
    load0 = os.getloadavg()[0]
    peaks = {dt: bc.cpu_peak(getattr(torch, dt), n, quick=True)[0] * 1e12 for dt in args.dtypes.split(",")}
    print(
        f"1-minute load {load0:.2f}; {n}-thread peak: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    )
    lines = []  # printed at the end, against the better of the two peak probes
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        for s in (int(x) for x in args.seqlens.split(",")):
            for d in (int(x) for x in args.headdims.split(",")):
                for causal in (False, True):
                    torch.manual_seed(0)
                    q, k, v = (torch.randn(1, s, 8, d).to(dtype) for _ in range(3))

                    def call(q=q, k=k, v=v, causal=causal):
                        with torch.no_grad():
                            pyfastattn.attention(q, k, v, causal=causal)

                    flops = 4.0 * s * s * d * 8 / (2 if causal else 1)
                    tn, t1, ratio = [], [], []
                    with pyfastattn.backend("kernel"):
                        for threads in (n, 1):  # warm-up on both thread counts
                            torch.set_num_threads(threads)
                            call()
                            call()
                        for _ in range(args.rounds):
                            torch.set_num_threads(n)
                            a = median_ms(call, args.reps)
                            torch.set_num_threads(1)
                            b = median_ms(call, args.reps)
                            tn.append(a)
                            t1.append(b)
                            ratio.append(b / a)
                    torch.set_num_threads(n)
                    ms = statistics.median(tn)
                    cuts = statistics.quantiles(ratio, n=5)  # p20, p40, p60, p80
                    q20, q80 = cuts[0], cuts[3]
                    name = f"fwd S{s} D{d} {dt_name}{' causal' if causal else ''}"
                    lines.append(
                        (name, dt_name, ms, flops, statistics.median(t1), statistics.median(ratio), q20, q80)
                    )
                    print(f"{name:34s} | {ms:7.3f} | {lines[-1][4]:7.3f} | {lines[-1][5]:.2f}", flush=True)
    # The peak again: a probe taken while the hypervisor lent a thread's core
    # elsewhere reads low (half, once, at load 1.2). The better of the two.
    for dt in peaks:
        peaks[dt] = max(peaks[dt], bc.cpu_peak(getattr(torch, dt), n, quick=True)[0] * 1e12)
    print(
        f"\n{n}-thread peak, the better of a probe before and one after: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
    )
    print(f"{'case (B1 H8)':34s} | {n}T ms  of peak | 1T ms | 1->{n} (p20-p80 of rounds)")
    for name, dt_name, ms, flops, t1ms, ratio_med, q20, q80 in lines:
        print(
            f"{name:34s} | {ms:7.3f} {flops / (ms * 1e-3) / peaks[dt_name]:6.1%} | "
            f"{t1ms:7.3f} | {ratio_med:.2f} ({q20:.2f}-{q80:.2f})"
        )
    load1 = os.getloadavg()[0]
    print(f"1-minute load before {load0:.2f}, after {load1:.2f}")
    if max(load0, load1) > n - 0.5:
        print(
            f"WARNING: a load above {n - 0.5:.1f} means other work shared the {n} cores: the {n}-thread "
            "times (and the peak they are divided by) are not valid; run again on a quiet machine"
        )


if __name__ == "__main__":
    main()
