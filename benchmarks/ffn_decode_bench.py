"""The FFN forward at decode sizes (T <= 16 tokens, no grad) on CPU: the fused
small-token kernel (csrc/cpu/ffn_small_tokens.cpp) beside eager PyTorch
(F.linear -> act [* F.linear] -> F.linear) and the op's ATen path (the same
op with PYFASTATTN_CPU_FFN_SMALL_TOKENS=0: at::mm GEMMs + the fused
elementwise pass, what ran before the kernel), optionally torch.compile.

    python benchmarks/ffn_decode_bench.py                     # issue 21's grid, 1 and 2 threads
    python benchmarks/ffn_decode_bench.py --quick             # bf16 gated T16 D1024, 2 threads
    python benchmarks/ffn_decode_bench.py --big               # D4096 F11008 gated instead
    python benchmarks/ffn_decode_bench.py --tokens 16,24,32   # the crossover with ATen

At these sizes the FFN is bound by reading its weights, so a row also gives
the weight bytes per second and that rate as a fraction of the machine's read
bandwidth (torch.ops.pyfastattn.cpu_read_probe: every thread sums its slice of
a 256 MiB buffer), measured in the same run, before and after the timed
rounds (median of 7 reads each; the fraction uses the larger of the two). A decode step runs every
layer's FFN once, so by default each call takes the next of several weight
sets ("layers") whose total is at least 8x the last-level cache: each call
then reads its weights from memory, as in a model (with 2x, 69 MB at D1024
F2816 bf16, part of a set was still in the victim L3 when its turn came
back, and T1-T4 read 10-20 % "faster" than from memory: PERF_NOTES.md
"Session 13: the read probe"). --hot uses one set (it
stays in the 32 MiB L3 here: what benchmarks/run.py's FFN rows time).

Timing: the providers are called in turn, call by call, for --rounds rounds
(A B C A B C ...), so that a change in load hits all alike; median, p20, p80
of the host clock (and, at one thread, of the thread's CPU time, steadier on a
shared box: the column `cpu_ms`). Every provider's output is first checked
against the float64 reference with the tolerance rule (pyfastattn.testing).
Shapes: gated d_ff = 8/3 d_model rounded up to 256 (D1024: 2816; D4096:
11008, the LLaMA-7B MLP), plain d_ff = 4 d_model; gated silu, plain gelu; no
biases. Rows are appended to benchmarks/results/local/ffn_decode.csv (--out
to choose), with the load average and the commit.

The roof: a call can take no less than its weight bytes over the read
bandwidth, nor less than its FLOPs (2 T x the weights' elements) over the
vector units' peak on the same threads (bench_common.cpu_peak: vdpbf16ps for
bf16, the fp32 FMA otherwise, measured in the same run). ``roof_frac_read_bw``
is the largest fraction of the read bandwidth any kernel could reach: 1 while
the call is memory-bound at the peak, less where the arithmetic alone takes
longer than the read (bf16 gated D1024 F2816 T16: 277 MFLOP against 17.3 MB,
so at ~75 GB/s the read takes 0.23 ms and the FLOPs ~0.27 ms at a 2-thread
peak of ~1 TFLOP/s: roof 85 %, and 80 % of the read bandwidth would need the
arithmetic at 96 % of the peak; PERF_NOTES "Session 9: the roof of T16").
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import pyfastattn
from pyfastattn import ffn, reference
from pyfastattn.testing import tolerance_failure

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import bench_common  # noqa: E402

ENV = "PYFASTATTN_CPU_FFN_SMALL_TOKENS"
L3_BYTES = 32 << 20


def d_ff_for(d_model: int, gated: bool) -> int:
    return (8 * d_model // 3 + 255) // 256 * 256 if gated else 4 * d_model


def read_bandwidth(threads: int) -> float:
    """GB/s of every thread summing its slice of a 256 MiB float32 buffer,
    median of 7 (the best of a few jumped to 2x the box's rate now and then
    under load), with and without the probe's software prefetches
    (bench_common.READ_PROBE_PREFETCH_BYTES): the faster of the two."""
    torch.set_num_threads(threads)
    buf = torch.ones(64 << 20)
    times = bench_common.read_probe_times(buf, 7).values()
    return max(buf.numel() * 4 / statistics.median(ts) for ts in times) / 1e9


def roof_fraction(wbytes: float, flops: float, bw_gbps: float, peak_tflops: float) -> float:
    """The largest fraction of the read bandwidth a call of `wbytes` bytes and
    `flops` FLOPs can reach: read time over max(read time, compute time at
    the peak)."""
    read_s, compute_s = wbytes / (bw_gbps * 1e9), flops / (peak_tflops * 1e12)
    return read_s / max(read_s, compute_s)


def make_layers(d_model, d_ff, gated, dtype, hot):
    """Weight sets [w1, w3 or None, w2], enough that their total is >= 8x the L3."""
    per = (3 if gated else 2) * d_model * d_ff * dtype.itemsize
    n = 1 if hot else max(2, math.ceil(8 * L3_BYTES / per))
    layers = []
    for _ in range(n):
        w1 = (torch.rand(d_ff, d_model) * 2 - 1) * math.sqrt(3 / d_model)
        w3 = (torch.rand(d_ff, d_model) * 2 - 1) * math.sqrt(3 / d_model) if gated else None
        w2 = (torch.rand(d_model, d_ff) * 2 - 1) * math.sqrt(3 / d_ff)
        layers.append([None if w is None else w.to(dtype) for w in (w1, w3, w2)])
    return layers, per


def providers(gated, activation, compile_too):
    def eager(x, w1, w3, w2):
        h = reference.ACTIVATIONS[activation](F.linear(x, w1))
        if gated:
            h = h * F.linear(x, w3)
        return F.linear(h, w2)

    def fused(x, w1, w3, w2):
        with pyfastattn.backend("kernel"):
            if gated:
                return ffn.gated_feed_forward(x, w1, w3, w2, activation=activation)
            return ffn.feed_forward(x, w1, None, w2, activation=activation)

    def aten(x, w1, w3, w2):
        old = os.environ.get(ENV)
        os.environ[ENV] = "0"
        try:
            return fused(x, w1, w3, w2)
        finally:
            if old is None:
                del os.environ[ENV]
            else:
                os.environ[ENV] = old

    out = {"torch eager": eager, "pyfastattn": fused, "pyfastattn aten path": aten}
    if compile_too:
        out["torch.compile"] = torch.compile(eager, dynamic=False)
    return out


def check(provs, x, layer, gated, activation, dtype):
    w1, w3, w2 = layer
    xd, w1d, w2d = x.double(), w1.double(), w2.double()
    if gated:
        ref = reference.gated_feed_forward(xd, w1d, w3.double(), w2d, None, None, None, activation)
    else:
        ref = reference.feed_forward(xd, w1d, None, w2d, None, activation)
    base = provs["torch eager"](x, *layer)
    return {name: tolerance_failure(name, f(x, *layer), ref, base, dtype) for name, f in provs.items()}


def time_case(provs, x, layers, rounds, threads):
    torch.set_num_threads(threads)
    wall = {n: [] for n in provs}
    cpu = {n: [] for n in provs}
    li = 0
    with torch.no_grad():
        for f in provs.values():  # warm-up (and torch.compile's compile)
            for layer in layers[:2]:
                f(x, *layer)
        for _ in range(rounds):
            for name, f in provs.items():
                layer = layers[li % len(layers)]
                li += 1
                c0, t0 = time.thread_time(), time.perf_counter()
                f(x, *layer)
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.thread_time() - c0) * 1e3)
    return wall, cpu


def pct(v, q):
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--dtype", default="bfloat16,float32", help="dtypes (default bfloat16,float32)")
    ap.add_argument("--tokens", default="1,4,8,16", help="token counts (default 1,4,8,16)")
    ap.add_argument("--forms", default="gated,plain", help="gated and/or plain (default both)")
    ap.add_argument("--dmodel", type=int, default=1024, help="d_model (default 1024)")
    ap.add_argument("--big", action="store_true", help="D4096 F11008 gated, bf16 and fp32 (once)")
    ap.add_argument("--quick", action="store_true", help="bf16 gated T16 D1024, 2 threads, 20 rounds")
    ap.add_argument("--hot", action="store_true", help="one weight set (L3-resident) instead of rotating")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of the eager FFN")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds per case (default 40)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "local", "ffn_decode.csv"),
                    help="CSV to append to (default benchmarks/results/local/ffn_decode.csv)")  # fmt: skip
    a = ap.parse_args()
    if a.quick:
        a.threads, a.dtype, a.tokens, a.forms, a.rounds = "2", "bfloat16", "16", "gated", 20
    if a.big:
        a.dmodel, a.forms = 4096, "gated"
    threads = [int(t) for t in a.threads.split(",")]
    dtypes = [getattr(torch, d) for d in a.dtype.split(",")]
    tokens = [int(t) for t in a.tokens.split(",")]
    forms = a.forms.split(",")
    load = os.getloadavg()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    print(f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; commit {commit}; isa {torch.ops.pyfastattn.ffn_small_tokens_isa()}; "
          f"small-token limit (bf16/fp32/fp16) {'/'.join(str(torch.ops.pyfastattn.ffn_small_tokens_limit(d)) for d in (torch.bfloat16, torch.float32, torch.float16))}; weights {'hot (one set)' if a.hot else 'rotating'}; "
          f"prefetch {torch.ops.pyfastattn.cpu_prefetch_level()} (PYFASTATTN_CPU_PREFETCH)")  # fmt: skip
    rows = []
    torch.manual_seed(0)
    for form in forms:
        gated = form == "gated"
        act = "silu" if gated else "gelu"
        d_ff = d_ff_for(a.dmodel, gated)
        for dtype in dtypes:
            layers, wbytes = make_layers(a.dmodel, d_ff, gated, dtype, a.hot)
            provs = providers(gated, act, a.compile)
            for n_threads in threads:
                bw0 = read_bandwidth(n_threads)
                peak, peak_isa = bench_common.cpu_peak(dtype, n_threads, quick=True)
                for t in tokens:
                    x = torch.randn(t, a.dmodel).to(dtype)
                    torch.set_num_threads(n_threads)
                    fails = check(provs, x, layers[0], gated, act, dtype)
                    ok = {n: f for n, f in provs.items() if fails[n] is None}
                    wall, cpu = time_case(ok, x, layers, a.rounds, n_threads)
                    bw = max(bw0, read_bandwidth(n_threads))
                    roof = roof_fraction(wbytes, 2 * t * wbytes / dtype.itemsize, bw, peak)
                    eager_ms = statistics.median(wall["torch eager"]) if "torch eager" in wall else math.nan
                    for name in provs:
                        row = dict(form=form, dtype=str(dtype).split(".")[-1], d_model=a.dmodel, d_ff=d_ff, tokens=t,
                                   threads=n_threads, provider=name, layers=len(layers))  # fmt: skip
                        if fails[name] is not None:
                            row.update(status="FAIL", note=fails[name])
                        else:
                            p50 = statistics.median(wall[name])
                            row.update(status="ok", p50_ms=round(p50, 4), p20_ms=round(pct(wall[name], 0.2), 4),
                                       p80_ms=round(pct(wall[name], 0.8), 4), cpu_ms=round(statistics.median(cpu[name]), 4),
                                       speedup_vs_eager=round(eager_ms / p50, 3), weight_gbps=round(wbytes / p50 / 1e6, 2),
                                       read_bw_gbps=round(bw, 2), frac_read_bw=round(wbytes / p50 / 1e6 / bw, 3),
                                       peak_tflops=round(peak, 3), roof_frac_read_bw=round(roof, 3))  # fmt: skip
                        rows.append(row)
                        if row["status"] != "ok":
                            print(f"{form} {row['dtype']} T{t} {n_threads}thr {name}: FAIL {row['note']}")
                            continue
                        print(f"{form:5} {row['dtype']:8} D{a.dmodel} F{d_ff} T{t:<2} {n_threads}thr {name:21} "
                              f"{row['p50_ms']:7.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] cpu {row['cpu_ms']:7.3f}  "
                              f"{row['speedup_vs_eager']:5.2f}x eager  {row['weight_gbps']:5.1f} GB/s = "
                              f"{100 * row['frac_read_bw']:3.0f}% of {bw:.1f} (roof {100 * roof:3.0f}% at "
                              f"{1e3 * peak:.0f} GFLOP/s {peak_isa})")  # fmt: skip
    load = os.getloadavg()
    print(f"load after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fields = ["date", "commit", "load1", "hot", "form", "dtype", "d_model", "d_ff", "tokens", "threads", "provider",
              "layers", "status", "p50_ms", "p20_ms", "p80_ms", "cpu_ms", "speedup_vs_eager", "weight_gbps",
              "read_bw_gbps", "frac_read_bw", "peak_tflops", "roof_frac_read_bw", "note"]  # fmt: skip
    new = not os.path.exists(a.out)
    with open(a.out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for r in rows:
            w.writerow(dict(date=stamp, commit=commit, load1=round(load[0], 2), hot=a.hot, **r))
    print(f"rows appended to {a.out}")


if __name__ == "__main__":
    main()
