"""Decode benchmark: one generation step (append one token, attend over the
cache) through pyfastattn.attention_with_kvcache, against torch SDPA over
views of the same cache and the naive path (concatenate, then attend).

Measurement: for each (batch, context, dtype) every layout's cache is built
at once, and each of ``--reps`` rounds times one read of the same number of
bytes by each read probe and one step of each layout (contiguous, paged
16 / 64 / 256), the order rotated from round to round; so the probe and the
layouts see the same minutes of this machine's drifting speed. Two probes
read a float32 buffer of the cache's bytes: ``buf.sum()`` and the project's
``torch.ops.pyfastattn.cpu_read_probe`` (csrc/cpu/peak_probe.cpp); the
faster of the two by median is the read bandwidth (a fraction of bandwidth
is against the best reader), and the output names it. Each layout's cache
is copied into ``--allocs`` fresh allocations stepped in turn, round by
round: where a paged cache's memory lands moves its time by ~10 % on this VM
(PERF_NOTES.md), so one allocation is one sample of that, not the layout.
With more than one thread, each round also reads the bytes with
``cpu_read_probe`` on ONE thread: this VM's memory has two states (all
threads together reading ~40 GB/s, about what one thread reads, or ~75-80
GB/s, PERF_NOTES "Session 8"), and the ratio of the two probes
(``read_bw_gbps`` / ``read_bw_1thread_gbps``, printed as "threads add")
says which state a row ran in.
The rows and the header also say where the CPU kernel's row prefetches went
(``cpu_prefetch``: l1 / l2, chosen by CPU generation; ``PYFASTATTN_CPU_PREFETCH``
overrides it), which halves or doubles the step on a Zen 4 (PERF_NOTES, v18).

Reported per layout: ms per step (median, p20, p80), tokens/s (batch / step
time), GB/s of cache read (K and V of every attended key, once), the median
over rounds of probe time / step time (the fraction of the read bandwidth)
and of step time / contiguous step time (paged against contiguous). The
baselines run after the rounds, against the probe's median.

    python benchmarks/decode_kvcache.py                 # the target case
    python benchmarks/decode_kvcache.py --quick         # a small form (B1, 4k, bf16; < 10 s)
    python benchmarks/decode_kvcache.py --sweep         # B 1-32, 1k-64k, bf16/fp32, paged 16/64/256
    python benchmarks/decode_kvcache.py --max-gib 2     # skip cases whose cache is larger

Rows are appended to benchmarks/results/local/decode_kvcache.csv (git
ignores it), or with ``--record`` to the committed
benchmarks/results/decode_kvcache.csv, with the load average, since this
machine is shared.

From benchmarks/run.py: ``decode_kvcache.run(device, dtypes, quick, threads,
smoke=smoke)`` returns rows in run.py's format (suite "decode-kvcache", pass
"fwd", providers "pyfastattn", "torch sdpa (cache views)" and "naive (cat +
pyfastattn.attention)"; ``note`` holds the fraction of the read bandwidth and, for a paged layout,
its ratio to contiguous), so
``bench_common.summarize`` and the tables take them as they are.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pyfastattn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from bench_common import READ_PROBE_PREFETCH_BYTES as PROBE_PREFETCH_BYTES  # noqa: E402

HQ, HK, D = 32, 8, 128


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    """ms of one call (a synchronised host clock)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def timeit(fn, reps: int, warmup: int = 2, device: str = "cpu") -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    return _quantiles([_time_once(fn, device) for _ in range(reps)])


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80) of ts."""
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return q(0.2), statistics.median(ts), q(0.8)


# The scheduler's time quantum observed on this box. With two threads on two
# cores and one more busy process, a thread descheduled while it holds a task
# makes the other wait at the end, and the steps come out in whole quanta
# (PERF_NOTES.md: 24.0 ms for every layout in such runs, 5.8 ms when idle),
# which measures the box, not the kernel.
SCHEDULER_TICK_MS = 4.0


def _on_scheduler_tick(ts: list[float]) -> float:
    """The fraction of times in ts within 1 % of a whole number (>= 2) of
    scheduler ticks."""
    near = [t >= 1.5 * SCHEDULER_TICK_MS and abs(t / SCHEDULER_TICK_MS - round(t / SCHEDULER_TICK_MS)) < 0.01 * t / SCHEDULER_TICK_MS for t in ts]  # fmt: skip
    return sum(near) / max(1, len(near))


def read_probes(nbytes: int, device: str = "cpu") -> dict:
    """The readers of ``nbytes`` (float32 buffers far larger than the caches at
    the target case, one per reader so that neither reads the other's lines
    from L3), each a callable: ``buf.sum()`` (torch's reduction with torch's
    threads) and, on CPU where the extension has it, the project's own read
    probe ``torch.ops.pyfastattn.cpu_read_probe`` (csrc/cpu/peak_probe.cpp:
    every thread sums its own slice with four independent vector sums), plain
    and with software prefetches PROBE_PREFETCH_BYTES ahead (on Zen 4 the
    hardware prefetchers alone read 5-20 % less: PERF_NOTES.md "Session 13:
    the read probe")."""
    n = max(nbytes // 4, 1024)
    buf = torch.ones(n, dtype=torch.float32, device=device)
    probes = {"buf.sum()": lambda: buf.sum()}
    if device == "cpu" and hasattr(torch.ops.pyfastattn, "cpu_read_probe"):
        buf2 = torch.ones(n, dtype=torch.float32, device=device)
        buf3 = torch.ones(n, dtype=torch.float32, device=device)
        pf = PROBE_PREFETCH_BYTES
        probes["cpu_read_probe"] = lambda: torch.ops.pyfastattn.cpu_read_probe(buf2)
        probes[f"cpu_read_probe, prefetch {pf // 1024} KB"] = lambda: torch.ops.pyfastattn.cpu_read_probe(
            buf3, pf
        )
    return probes


def read_bandwidth_gbps(nbytes: int, reps: int, device: str = "cpu") -> float:
    """GB/s of the fastest reader of read_probes (median of reps calls each):
    the machine's read bandwidth with torch's threads, measured now."""
    best = 0.0
    for fn in read_probes(nbytes, device).values():
        _, med, _ = timeit(fn, reps, device=device)
        best = max(best, max(nbytes // 4, 1024) * 4 / med / 1e6)
    return best


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


def _block_of(layout: str) -> int | None:
    return None if layout == "contiguous" else int(layout.removeprefix("paged"))


def run_case(b, ctx, dtype, layouts, reps, baselines, check, device="cpu", allocs=1):
    """One (batch, context, dtype) case: the read probes and one decode step
    of every layout, interleaved round by round (the order rotated each
    round), ``reps`` rounds, after two warm-up rounds. Rows per layout: the
    step's median ms (p20, p80), the median over rounds of probe ms / step ms
    (``frac_read_bw``: against the faster of the probes, by median) and of
    step ms / contiguous step ms (``ratio_to_contiguous``). ``allocs`` > 1:
    each layout's cache is also copied into allocs - 1 fresh allocations
    (same data and block table) and round r steps copy r % allocs of every
    layout, since where a paged cache's memory lands moves its time by ~10 %
    on this VM while contiguous copies agree within 2 % (PERF_NOTES.md). The
    baselines (torch SDPA over views of the contiguous cache,
    concatenate-then-attend) are timed after the rounds, against the probe's
    median."""
    torch.manual_seed(0)
    q = torch.randn(b, 1, HQ, D, dtype=dtype, device=device)
    k = torch.randn(b, 1, HK, D, dtype=dtype, device=device)
    v = torch.randn(b, 1, HK, D, dtype=dtype, device=device)
    seqlens = torch.full((b,), ctx - 1, dtype=torch.int32, device=device)
    caches = {(lay, 0): make_cache(b, ctx, dtype, _block_of(lay), device) for lay in layouts}
    for a in range(1, allocs):
        for lay in layouts:
            kc, vc, table = caches[(lay, 0)]
            caches[(lay, a)] = (kc.clone(), vc.clone(), table)
    # K and V of every attended key
    nbytes = 2 * b * ctx * HK * D * torch.empty((), dtype=dtype).element_size()

    def stepper(key):
        kc, vc, table = caches[key]
        return lambda: pyfastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                                         causal=True)  # fmt: skip

    steps = {key: stepper(key) for key in caches}
    if check:
        for lay in layouts:
            kc, vc, table = caches[(lay, 0)]
            ref = pyfastattn.reference.attention_with_kvcache(
                q, kc.clone(), vc.clone(), k, v, cache_seqlens=seqlens, block_table=table, window_right=0,
            )[0]  # fmt: skip
            err = (steps[(lay, 0)]().float() - ref.float()).abs().max().item()
            assert err < (2e-2 if dtype != torch.float32 else 1e-4), f"kernel error {err} ({lay})"
    probes = read_probes(nbytes, device)
    # The same reader on one thread (not a candidate for the read bandwidth:
    # it tells the memory's state, see the module docstring).
    single = {}
    if "cpu_read_probe" in probes and torch.get_num_threads() > 1:

        def one_thread(fn=probes["cpu_read_probe"]):
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(n)

        single = {ONE_THREAD_PROBE: one_thread}
    ts: dict = {("probe", n): [] for n in {**probes, **single}} | {("step", lay): [] for lay in layouts}
    warmup = max(2, allocs)  # every allocation stepped at least once before timing
    for r in range(warmup + reps):
        a = r % allocs
        calls = [(("probe", n), f) for n, f in {**probes, **single}.items()] + [
            (("step", lay), steps[(lay, a)]) for lay in layouts
        ]
        for key, fn in calls[r % len(calls) :] + calls[: r % len(calls)]:
            t = _time_once(fn, device)
            if r >= warmup:
                ts[key].append(t)
    probe_med = {n: statistics.median(ts[("probe", n)]) for n in probes}
    probe = min(probe_med, key=probe_med.get)  # the faster reader
    bw = nbytes / probe_med[probe] / 1e6
    others = ", ".join(f"{n} {nbytes / m / 1e6:.2f} GB/s" for n, m in probe_med.items() if n != probe)
    probe_note = f"{probe}" + (f" (faster than {others})" if others else "")
    bw1 = nbytes / statistics.median(ts[("probe", ONE_THREAD_PROBE)]) / 1e6 if single else None

    rows = []

    def row(provider, layout, t, frac, ratio=None, on_tick=0.0):
        p20, p50, p80 = t
        rows.append(dict(provider=provider, batch=b, context=ctx, dtype=str(dtype).replace("torch.", ""),
                         layout=layout, p20_ms=round(p20, 3), p50_ms=round(p50, 3), p80_ms=round(p80, 3),
                         tokens_per_s=round(b / p50 * 1e3, 1), gbps=round(nbytes / p50 / 1e6, 2),
                         read_bw_gbps=round(bw, 2), frac_read_bw=round(frac, 3),
                         ratio_to_contiguous="" if ratio is None else round(ratio, 3), read_probe=probe,
                         probe_note=probe_note, on_tick=on_tick,
                         read_bw_1thread_gbps="" if bw1 is None else round(bw1, 2),
                         cpu_prefetch=prefetch_level()))  # fmt: skip

    pt = ts[("probe", probe)]
    for lay in layouts:
        st = ts[("step", lay)]
        frac = statistics.median(p / s for p, s in zip(pt, st))
        ratio = None
        if "contiguous" in layouts:
            ratio = statistics.median(s / c for s, c in zip(st, ts[("step", "contiguous")]))
        row("pyfastattn kvcache", lay, _quantiles(st), frac, ratio, _on_scheduler_tick(st))
    if baselines and "contiguous" in layouts:
        kc, vc, _ = caches[("contiguous", 0)]
        pos = ctx - 1

        def sdpa():  # the same append and the same cache, through views
            kc[:, pos] = k[:, 0]
            vc[:, pos] = v[:, 0]
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), kc[:, :ctx].transpose(1, 2), vc[:, :ctx].transpose(1, 2), enable_gqa=True
            )

        kp, vp = kc[:, : ctx - 1].clone(), vc[:, : ctx - 1].clone()

        def naive():  # concatenate every step, then attend
            kk = torch.cat([kp, k], 1)
            vv = torch.cat([vp, v], 1)
            return pyfastattn.attention(q, kk, vv, causal=True)

        for name, fn in (("torch SDPA (cache views)", sdpa), ("naive (cat + pyfastattn.attention)", naive)):
            t = timeit(fn, reps, device=device)
            row(name, "contiguous", t, probe_med[probe] / t[1])
    return rows


ONE_THREAD_PROBE = "cpu_read_probe, 1 thread"

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
    out = []
    for dtype in dtypes:
        for b in grid["batches"]:
            for ctx in grid["contexts"]:
                allocs = 1 if quick or smoke else 3
                for r in run_case(b, ctx, dtype, grid["layouts"], grid["reps"], True, True, device, allocs):
                    ratio = r["ratio_to_contiguous"]
                    out.append(dict(
                        provider=_RUN_PY_NAMES[r["provider"]], suite="decode-kvcache",
                        shape=f"B{b} Hq{HQ} Hk{HK} D{D} ctx{ctx} {r['layout']}", dtype=r["dtype"],
                        status="ok", p20_ms=r["p20_ms"], p50_ms=r["p50_ms"], p80_ms=r["p80_ms"],
                        gbps=r["gbps"], seqlen=ctx, causal=True, samples=grid["reps"],
                        spread=(r["p80_ms"] - r["p20_ms"]) / r["p50_ms"],
                        note=f"{100 * r['frac_read_bw']:.1f}% of the read bandwidth ({r['read_bw_gbps']} GB/s, "
                             f"{r['read_probe']}, interleaved rounds{_state_note(r)})"
                             + (f"; {ratio:.2f}x contiguous" if ratio != "" and r["layout"] != "contiguous"
                                and r["provider"] == "pyfastattn kvcache" else ""),
                    ))  # fmt: skip
                    out[-1]["pass"] = "fwd"
    return out


def prefetch_level() -> str:
    """Where the CPU KV-cache kernel's row prefetches go on this machine (l1 /
    l2: PYFASTATTN_CPU_PREFETCH, by default chosen by CPU generation)."""
    return torch.ops.pyfastattn.cpu_prefetch_level()


CSV_FIELDS = ["time", "threads", "load1", "provider", "batch", "context", "dtype", "layout", "p20_ms", "p50_ms",
              "p80_ms", "tokens_per_s", "gbps", "read_bw_gbps", "frac_read_bw", "ratio_to_contiguous",
              "read_probe", "read_bw_1thread_gbps", "cpu_prefetch"]  # fmt: skip


def _append_csv(path: str, rows: list[dict]) -> None:
    """Appends rows to the CSV at path; a file written before the last
    columns (ratio_to_contiguous, read_probe, read_bw_1thread_gbps,
    cpu_prefetch) existed
    is rewritten once with them (its old rows keep them empty)."""
    old = None
    if os.path.exists(path):
        with open(path, newline="") as f:
            rd = csv.DictReader(f)
            if rd.fieldnames != CSV_FIELDS:
                old = list(rd)
    mode = "w" if old is not None or not os.path.exists(path) else "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if mode == "w":
            w.writeheader()
        for r in (old or []) + rows:
            w.writerow(r)


def _state_note(r: dict) -> str:
    """The one-thread probe and what the threads add to it (the memory's
    state), for the case's header line."""
    one = r.get("read_bw_1thread_gbps", "")
    if one == "":
        return ""
    return f"; one thread {one:.2f} GB/s (threads add {r['read_bw_gbps'] / one:.2f}x)"


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
    ap.add_argument(
        "--reps",
        type=int,
        default=20,
        help="interleaved rounds per case, each one probe read and one step per layout (default: 20)",
    )
    ap.add_argument(
        "--allocs", type=int, default=3,
        help="fresh allocations of each layout's cache, stepped in turn round by round (default: 3)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument(
        "--max-gib",
        type=float,
        default=1.5,
        help="skip cases whose attended cache (one layout; all layouts of a case are held at once) is larger",
    )
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
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()
    print(f"# threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"Hq {HQ} Hk {HK} D {D}, CPU kernel's row prefetches to {prefetch_level()}")  # fmt: skip
    all_rows = []
    for dtype in dtypes:
        for b in batches:
            for ctx in contexts:
                gib = 2 * b * ctx * HK * D * (2 if dtype == "bf16" else 4) / 2**30
                if gib > a.max_gib:
                    print(f"skip B{b} ctx{ctx} {dtype}: cache {gib:.1f} GiB > --max-gib {a.max_gib}")
                    continue
                rows = run_case(
                    b,
                    ctx,
                    dt[dtype],
                    layouts,
                    a.reps,
                    not a.no_baselines,
                    not a.no_check,
                    allocs=max(1, a.allocs),
                )
                print(
                    f"# B{b} ctx {ctx} {dtype}: {a.reps} interleaved rounds (each probe and one step of each "
                    f"layout per round, {max(1, a.allocs)} allocations of each cache in turn); "
                    f"read probe {rows[0]['probe_note']}: {rows[0]['read_bw_gbps']:.2f} GB/s"
                    + _state_note(rows[0])
                )
                for r in rows:
                    ratio = r["ratio_to_contiguous"]
                    print(f"{r['provider']:36s} B{b:<3d} ctx {ctx:6d} {dtype:5s} {r['layout']:10s} "
                          f"{r['p50_ms']:9.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]  "
                          f"{r['tokens_per_s']:9.1f} tok/s  {r['gbps']:6.2f} GB/s  "
                          f"{100 * r['frac_read_bw']:5.1f}% of read"
                          + (f"  {ratio:.3f}x contiguous" if ratio != "" and r["provider"] == "pyfastattn kvcache"
                             else ""))  # fmt: skip
                all_rows += rows
    load_end = os.getloadavg()
    print(f"# load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    ticked = [r for r in all_rows if r.get("on_tick", 0) > 0.5]
    if ticked:
        print(f"# WARNING: over half the steps of {', '.join(sorted({r['layout'] for r in ticked}))} took whole "
              f"{SCHEDULER_TICK_MS:g} ms scheduler ticks: another process held a core, so these times are the "
              "scheduler's, not the kernel's; rerun on an idle box (or with --threads 1)")  # fmt: skip
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    _append_csv(a.out, [dict(time=stamp, threads=torch.get_num_threads(), load1=round(load[0], 2), **r)
                        for r in all_rows])  # fmt: skip
    print(f"appended {len(all_rows)} rows to {a.out}")
    return all_rows


if __name__ == "__main__":
    main()
