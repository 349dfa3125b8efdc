"""Decode benchmark: one generation step (append one token, attend over the
cache) through pyfastattn.attention_with_kvcache, against torch SDPA over
views of the same cache and the naive path (concatenate, then attend).

Reported per case: ms per step (median, p20, p80), tokens/s (batch / step
time), GB/s of cache read (K and V of every attended key, once), and that
rate as a fraction of the machine's read bandwidth, measured in the same run
by summing a buffer of the same number of bytes with the same threads.

    python benchmarks/decode_kvcache.py                 # the target case
    python benchmarks/decode_kvcache.py --quick         # a small form (B1, 4k, bf16; < 10 s)
    python benchmarks/decode_kvcache.py --sweep         # B 1-32, 1k-64k, bf16/fp32, paged 16/64/256
    python benchmarks/decode_kvcache.py --max-gib 2     # skip cases whose cache is larger

Rows are appended to benchmarks/results/decode_kvcache.csv (with the load
average, since this machine is shared).

From benchmarks/run.py: ``decode_kvcache.run(device, dtypes, quick, threads,
smoke=smoke)`` returns rows in run.py's format (suite "decode-kvcache", pass
"fwd", providers "pyfastattn", "torch sdpa (cache views)" and "naive (cat +
pyfastattn.attention)"; ``note`` holds the fraction of the read bandwidth), so
``bench_common.summarize`` and the tables take them as they are.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

import pyfastattn

HERE = os.path.dirname(os.path.abspath(__file__))
HQ, HK, D = 32, 8, 128


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps: int, warmup: int = 2, device: str = "cpu") -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return q(0.2), statistics.median(ts), q(0.8)


def read_bandwidth_gbps(nbytes: int, reps: int, device: str = "cpu") -> float:
    """Bytes / time of summing an fp32 buffer of ``nbytes`` (median): the
    machine's read bandwidth with torch's threads, measured now."""
    buf = torch.ones(max(nbytes // 4, 1024), dtype=torch.float32, device=device)
    _, med, _ = timeit(lambda: buf.sum(), reps, device=device)
    return buf.numel() * 4 / med / 1e6


def make_cache(b, ctx, dtype, block, device="cpu"):
    """Cache of capacity ctx + 16 per sequence, filled to ctx - 1 keys (the
    step appends the ctx-th). Paged: blocks in a shuffled order."""
    cap = ctx + 16
    if block is None:
        kc = torch.randn(b, cap, HK, D, dtype=dtype, device=device)
        vc = torch.randn(b, cap, HK, D, dtype=dtype, device=device)
        return kc, vc, None
    nblk = (cap + block - 1) // block
    kc = torch.randn(b * nblk, block, HK, D, dtype=dtype, device=device)
    vc = torch.randn(b * nblk, block, HK, D, dtype=dtype, device=device)
    table = torch.randperm(b * nblk).to(device=device, dtype=torch.int32).view(b, nblk)
    return kc, vc, table


def run_case(b, ctx, dtype, block, reps, bw_cache, baselines, check, device="cpu"):
    torch.manual_seed(0)
    kc, vc, table = make_cache(b, ctx, dtype, block, device)
    q = torch.randn(b, 1, HQ, D, dtype=dtype, device=device)
    k = torch.randn(b, 1, HK, D, dtype=dtype, device=device)
    v = torch.randn(b, 1, HK, D, dtype=dtype, device=device)
    seqlens = torch.full((b,), ctx - 1, dtype=torch.int32, device=device)
    nbytes = 2 * b * ctx * HK * D * kc.element_size()  # K and V of every attended key

    def step():
        return pyfastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                                 causal=True)  # fmt: skip

    rows = []
    if nbytes not in bw_cache:
        bw_cache[nbytes] = read_bandwidth_gbps(nbytes, reps, device)
    bw = bw_cache[nbytes]
    layout = "contiguous" if block is None else f"paged{block}"

    def row(provider, t):
        p20, p50, p80 = t
        gbps = nbytes / p50 / 1e6
        rows.append(dict(provider=provider, batch=b, context=ctx, dtype=str(dtype).replace("torch.", ""),
                         layout=layout, p20_ms=round(p20, 3), p50_ms=round(p50, 3), p80_ms=round(p80, 3),
                         tokens_per_s=round(b / p50 * 1e3, 1), gbps=round(gbps, 2), read_bw_gbps=round(bw, 2),
                         frac_read_bw=round(gbps / bw, 3)))  # fmt: skip

    if check:
        ref = pyfastattn.reference.attention_with_kvcache(
            q, kc.clone(), vc.clone(), k, v, cache_seqlens=seqlens, block_table=table, window_right=0,
        )[0]  # fmt: skip
        err = (step().float() - ref.float()).abs().max().item()
        assert err < (2e-2 if dtype != torch.float32 else 1e-4), f"kernel error {err}"
    row("pyfastattn kvcache", timeit(step, reps, device=device))
    if baselines and block is None:
        pos = ctx - 1

        def sdpa():  # the same append and the same cache, through views
            kc[:, pos] = k[:, 0]
            vc[:, pos] = v[:, 0]
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), kc[:, :ctx].transpose(1, 2), vc[:, :ctx].transpose(1, 2), enable_gqa=True
            )

        row("torch SDPA (cache views)", timeit(sdpa, reps, device=device))
        kp, vp = kc[:, : ctx - 1].clone(), vc[:, : ctx - 1].clone()

        def naive():  # concatenate every step, then attend
            kk = torch.cat([kp, k], 1)
            vv = torch.cat([vp, v], 1)
            return pyfastattn.attention(q, kk, vv, causal=True)

        row("naive (cat + pyfastattn.attention)", timeit(naive, reps, device=device))
    return rows


# The quick grid: the target case's shape at a context that keeps the
# baselines (SDPA over cache views is ~20x slower) within a few seconds.
QUICK_GRID = dict(batches=[1], contexts=[4096], layouts=["contiguous", "paged64"], reps=5)
SMOKE_GRID = dict(batches=[1], contexts=[256], layouts=["contiguous", "paged16"], reps=1)

_RUN_PY_NAMES = {
    "pyfastattn kvcache": "pyfastattn",
    "torch SDPA (cache views)": "torch sdpa (cache views)",
    "naive (cat + pyfastattn.attention)": "naive (cat + pyfastattn.attention)",
}


def run(
    device: str = "cpu", dtypes=None, quick: bool = True, threads: int | None = None, smoke: bool = False
):
    """The decode benchmark as rows of benchmarks/run.py (suite "decode-kvcache").

    ``quick``/``smoke``: the small grid (B1, context 4096, contiguous and paged
    64; a few seconds on 2 cores) or a tiny one; otherwise the target case
    (context 32768, contiguous and paged 16/64/256). ``dtypes``: torch dtypes
    or names (default bf16). Each row: provider, suite, shape, pass "fwd",
    dtype, status "ok", p20/p50/p80_ms, gbps (cache bytes read per second),
    note (the fraction of the read bandwidth measured in the same run)."""
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    grid = SMOKE_GRID if smoke else QUICK_GRID if quick else dict(
        batches=[1], contexts=[32768], layouts=["contiguous", "paged16", "paged64", "paged256"], reps=10
    )  # fmt: skip
    dtypes = (
        [torch.bfloat16] if not dtypes else [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
    )
    bw_cache: dict[int, float] = {}
    out = []
    for dtype in dtypes:
        for b in grid["batches"]:
            for ctx in grid["contexts"]:
                for lay in grid["layouts"]:
                    block = None if lay == "contiguous" else int(lay.removeprefix("paged"))
                    for r in run_case(b, ctx, dtype, block, grid["reps"], bw_cache, True, True, device):
                        out.append(dict(
                            provider=_RUN_PY_NAMES[r["provider"]], suite="decode-kvcache",
                            shape=f"B{b} Hq{HQ} Hk{HK} D{D} ctx{ctx} {lay}", dtype=r["dtype"],
                            status="ok", p20_ms=r["p20_ms"], p50_ms=r["p50_ms"], p80_ms=r["p80_ms"],
                            gbps=r["gbps"], seqlen=ctx, causal=True, samples=grid["reps"],
                            spread=(r["p80_ms"] - r["p20_ms"]) / r["p50_ms"],
                            note=f"{100 * r['frac_read_bw']:.1f}% of the read bandwidth ({r['read_bw_gbps']} GB/s)",
                        ))  # fmt: skip
                        out[-1]["pass"] = "fwd"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="the full case grid")
    ap.add_argument("--quick", action="store_true", help="the small grid of run(quick=True) (< 10 s)")
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default: 1)")
    ap.add_argument("--context", type=int, nargs="*", default=None, help="context lengths (default: 32768)")
    ap.add_argument(
        "--dtype", nargs="*", default=None, choices=["bf16", "fp32"], help="cache dtypes (default: bf16)"
    )
    ap.add_argument("--layout", nargs="*", default=None, help="contiguous paged16 paged64 paged256")
    ap.add_argument("--reps", type=int, default=20, help="timed steps per case (default: 20)")
    ap.add_argument("--max-gib", type=float, default=1.5, help="skip cases whose attended cache is larger")
    ap.add_argument("--no-baselines", action="store_true", help="time pyfastattn only")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the reference")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--out", default=None,
                     help="CSV to append the rows to (default: benchmarks/results/local/decode_kvcache.csv, "
                          "which git ignores)")  # fmt: skip
    out.add_argument("--record", action="store_true",
                     help="append to the committed results of record, benchmarks/results/decode_kvcache.csv")  # fmt: skip
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = os.path.join(HERE, "results", *(() if a.record else ("local",)), "decode_kvcache.csv")
    if a.sweep:
        batches, contexts = [1, 4, 32], [1024, 8192, 32768, 65536]
        dtypes, layouts = ["bf16", "fp32"], ["contiguous", "paged16", "paged64", "paged256"]
    elif a.quick:
        batches, contexts, dtypes, layouts = (
            QUICK_GRID["batches"],
            QUICK_GRID["contexts"],
            ["bf16"],
            QUICK_GRID["layouts"],
        )
        a.reps = QUICK_GRID["reps"]
    else:
        batches, contexts, dtypes, layouts = (
            [1],
            [32768],
            ["bf16"],
            ["contiguous", "paged16", "paged64", "paged256"],
        )
    batches = a.batch or batches
    contexts = a.context or contexts
    dtypes = a.dtype or dtypes
    layouts = a.layout or layouts
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}
    load = os.getloadavg()
    print(f"# threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"Hq {HQ} Hk {HK} D {D}")  # fmt: skip
    bw_cache: dict[int, float] = {}
    all_rows = []
    for dtype in dtypes:
        for b in batches:
            for ctx in contexts:
                gib = 2 * b * ctx * HK * D * (2 if dtype == "bf16" else 4) / 2**30
                if gib > a.max_gib:
                    print(f"skip B{b} ctx{ctx} {dtype}: cache {gib:.1f} GiB > --max-gib {a.max_gib}")
                    continue
                for lay in layouts:
                    block = None if lay == "contiguous" else int(lay.removeprefix("paged"))
                    rows = run_case(
                        b, ctx, dt[dtype], block, a.reps, bw_cache, not a.no_baselines, not a.no_check
                    )
                    for r in rows:
                        print(f"{r['provider']:36s} B{b:<3d} ctx {ctx:6d} {dtype:5s} {lay:10s} "
                              f"{r['p50_ms']:9.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]  "
                              f"{r['tokens_per_s']:9.1f} tok/s  {r['gbps']:6.2f} GB/s  "
                              f"{100 * r['frac_read_bw']:5.1f}% of {r['read_bw_gbps']:.2f} GB/s read")  # fmt: skip
                    all_rows += rows
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    new = not os.path.exists(a.out)
    with open(a.out, "a", newline="") as f:
        fields = ["time", "threads", "load1", "provider", "batch", "context", "dtype", "layout", "p20_ms", "p50_ms",
                  "p80_ms", "tokens_per_s", "gbps", "read_bw_gbps", "frac_read_bw"]  # fmt: skip
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in all_rows:
            w.writerow(dict(time=stamp, threads=torch.get_num_threads(), load1=round(load[0], 2), **r))
    print(f"appended {len(all_rows)} rows to {a.out}")
    return all_rows


if __name__ == "__main__":
    main()
