"""Context-parallel attention on CPU over gloo: ring and Ulysses, fwd+bwd.

For each sequence length S and process count P (gloo, one thread per process),
times ``ring_attention`` and ``ulysses_attention`` forward+backward on the
ranks' shards, and the single-process kernel (``pyfastattn.attention``) on the
full sequence with 1 and with P threads as the baselines. It reports:

* ``total``: wall time of one fwd+bwd (median, p20, p80 over the repeats; the
  slowest rank of each repeat);
* ``compute``: time inside the local kernels and merges (the ring's own
  timers); for Ulysses, the same run's wall time minus its time inside the
  all-to-alls and the cross-rank input check (per rank, then the slowest);
* ``comm``: the same transfers run alone, without compute (ring: the K/V and
  dK/dV hops of one fwd+bwd; Ulysses: its four all-to-alls forward, four back);
* ``waited``: time the ring spent blocked in ``wait``, Ulysses inside its
  all-to-alls and input check, during the timed runs (includes waiting for a
  slower rank: load imbalance, here mostly other processes on the machine);
* ``exposed``: the part of ``waited`` the wire caused: per transfer, the wait
  after both this rank started waiting and the sender had posted (one host
  clock, so this split needs all ranks on one machine);
* ``overlap``: 1 - exposed / comm, the fraction of communication hidden
  behind compute (Ulysses: 0 by construction, its all-to-alls are not overlapped);
* ``vs_1proc``: total / single-process time with P threads (the target of
  issue 19: ring at P = 2, S = 16k <= 1.15).

usage: python benchmarks/context_parallel_bench.py [--seqlens 4096,8192,16384,32768]
       [--procs 1,2] [--methods ring,ulysses] [--dtype bfloat16] [--heads 4] [--head-dim 64]
       [--causal] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyfastattn  # noqa: E402
from pyfastattn.distributed import (  # noqa: E402
    RingTimers,
    ring_attention,
    shard_sequence,
    ulysses_attention,
)
from pyfastattn.distributed import _comm as _cp_comm  # noqa: E402
from pyfastattn.distributed import ulysses as _ulysses  # noqa: E402
from pyfastattn.distributed.ulysses import _head_to_seq, _seq_to_head  # noqa: E402


def _inputs(cfg, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, cfg["dtype"])
    shape = (cfg["batch"], s, cfg["heads"], cfg["head_dim"])
    return [torch.randn(shape, generator=g).to(dt) for _ in range(4)]  # q, k, v, dout


def _pcts(xs):
    xs = sorted(xs)

    def at(f):
        return xs[min(len(xs) - 1, int(round(f * (len(xs) - 1))))]

    return statistics.median(xs), at(0.2), at(0.8)


def _single(cfg, s, threads):
    torch.set_num_threads(threads)
    q, k, v, do = _inputs(cfg, s)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    times = []
    for i in range(cfg["repeats"] + 1):
        t0 = time.perf_counter()
        out = pyfastattn.attention(q, k, v, causal=cfg["causal"])
        out.backward(do)
        if i:
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
    return _pcts(times)


def _ring_comm_alone(kv, world, repeats):
    """The ring's transfers of one fwd+bwd without compute: P-1 K/V hops
    forward, P-1 K/V hops and P dK/dV (fp32) hops backward."""
    if world == 1:
        return 0.0
    rank = dist.get_rank()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    dkv = kv.float()

    def hop(t):
        r = torch.empty_like(t)
        for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, nxt), dist.P2POp(dist.irecv, r, prv)]):
            req.wait()

    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(2 * (world - 1)):
            hop(kv)
        for _ in range(world):
            hop(dkv)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ulysses_comm_alone(q, k, v, world, repeats):
    if world == 1:
        return 0.0
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        hs = [_seq_to_head(t, world, None) for t in (q, k, v)]  # forward in
        _head_to_seq(hs[0], world, None)  # forward out
        _seq_to_head(q, world, None)  # backward: dout in
        for h in hs:  # backward: dq, dk, dv out
            _head_to_seq(h, world, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _UlyssesCommClock:
    """Seconds this process spends inside Ulysses' communication while the
    block runs: its all-to-alls (forward and backward) and the cross-rank
    input check (one all-gather). The rest of the same run's wall time is its
    compute, so that compute + communication = the run, never below zero.
    (Subtracting the separately timed ``comm`` alone from the total instead
    gave a negative compute at S=256, where the all-to-alls are
    latency-bound and make up nearly all of the run.)"""

    def __init__(self) -> None:
        self.seconds = 0.0

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    def __enter__(self):
        self._saved = (_ulysses._a2a, _cp_comm.check_across_ranks)
        _ulysses._a2a = self._timed(_ulysses._a2a)
        _cp_comm.check_across_ranks = self._timed(_cp_comm.check_across_ranks)
        return self

    def __exit__(self, *exc) -> None:
        _ulysses._a2a, _cp_comm.check_across_ranks = self._saved


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _worker(rank, world, store, cfg, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for s in cfg["seqlens"]:
        for method in cfg["methods"]:
            zigzag = method == "ring"
            q, k, v, do = (shard_sequence(t, rank, world, zigzag=zigzag) for t in _inputs(cfg, s))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            timers = RingTimers()
            totals, computes, waits, exposed_all = [], [], [], []
            for i in range(cfg["repeats"] + 1):
                timers.reset()
                dist.barrier()
                t0 = time.perf_counter()
                if method == "ring":
                    out = ring_attention(q, k, v, causal=cfg["causal"], timers=timers)
                    out.backward(do)
                else:
                    with _UlyssesCommClock() as clock:
                        out = ulysses_attention(q, k, v, causal=cfg["causal"])
                        out.backward(do)
                mine = time.perf_counter() - t0
                if method != "ring":  # clock.seconds: parts of this rank's [t0, now]
                    timers.wait, timers.compute = clock.seconds, mine - clock.seconds
                el = _max_over_ranks(mine)
                q.grad = k.grad = v.grad = None
                if i:
                    totals.append(el)
                    computes.append(_max_over_ranks(timers.compute))
                    exposed_i = 0.0
                    if method == "ring" and world > 1:
                        posts = torch.tensor(timers.posts, dtype=torch.float64)
                        everyone = [torch.empty_like(posts) for _ in range(world)]
                        dist.all_gather(everyone, posts)
                        exposed_i = timers.exposed(everyone[(rank - 1) % world].tolist())
                    exposed_all.append(_max_over_ranks(exposed_i))
                    waits.append(_max_over_ranks(timers.wait))
            if method == "ring":
                kv = torch.cat([k.detach(), v.detach()], -1).contiguous()
                comm = _max_over_ranks(_ring_comm_alone(kv, world, cfg["repeats"]))
                compute = statistics.median(computes)
                exposed = statistics.median(exposed_all)
                waited = statistics.median(waits)
            else:
                comm = _max_over_ranks(
                    _ulysses_comm_alone(q.detach(), k.detach(), v.detach(), world, cfg["repeats"])
                )
                compute = statistics.median(computes)
                exposed = waited = statistics.median(waits)  # nothing overlaps the all-to-alls
            if rank == 0:
                med, p20, p80 = _pcts(totals)
                overlap = 0.0 if comm <= 0 or method != "ring" else max(0.0, min(1.0, 1.0 - exposed / comm))
                queue.put(dict(method=method, procs=world, seqlen=s, total=med, p20=p20, p80=p80,
                               compute=compute, comm=comm, exposed=exposed, waited=waited, overlap=overlap))  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", default="4096,8192,16384,32768")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--methods", default="ring,ulysses")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = dict(seqlens=[int(x) for x in a.seqlens.split(",")], methods=a.methods.split(","), dtype=a.dtype,
               batch=a.batch, heads=a.heads, head_dim=a.head_dim, causal=a.causal, repeats=a.repeats)  # fmt: skip
    procs = [int(x) for x in a.procs.split(",")]
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    single = {}  # (seqlen, threads) -> (median, p20, p80)
    for s in cfg["seqlens"]:
        for th in sorted({1, *procs}):
            single[(s, th)] = _single(cfg, s, th)
            print(f"single process, {th} thread(s), S={s}: {single[(s, th)][0]:.3f} s", flush=True)
    rows = []
    ctx = mp.get_context("spawn")
    for p in procs:
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(p, os.path.join(d, "store"), cfg, queue), nprocs=p, join=True)
        while not queue.empty():
            r = queue.get()
            r["vs_1proc"] = r["total"] / single[(r["seqlen"], p)][0]
            r["single_pthreads"] = single[(r["seqlen"], p)][0]
            rows.append(r)
            print(f"{r['method']:8s} P={p} S={r['seqlen']}: total {r['total']:.3f} s (compute {r['compute']:.3f}, "
                  f"comm alone {r['comm']:.4f}, waited {r['waited']:.4f}, exposed {r['exposed']:.4f}, "
                  f"overlap {r['overlap']:.2f}), "
                  f"{r['vs_1proc']:.3f}x single process with {p} thread(s)", flush=True)  # fmt: skip
    load_after = os.getloadavg()

    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-context-parallel")
    os.makedirs(out, exist_ok=True)
    fields = ["method", "procs", "seqlen", "total", "p20", "p80", "compute", "comm", "waited", "exposed", "overlap",
              "single_pthreads", "vs_1proc"]  # fmt: skip
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dtype", "causal", "heads", "head_dim", "batch", *fields])
        w.writeheader()
        for r in rows:
            w.writerow({"dtype": a.dtype, "causal": a.causal, "heads": a.heads, "head_dim": a.head_dim,
                        "batch": a.batch, **{k: r[k] for k in fields}})  # fmt: skip
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("# Context-parallel attention, CPU, gloo\n\n```\npython " + " ".join(sys.argv) + "\n```\n\n")
        f.write(f"started {started}; host {platform.node()} ({platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores); torch {torch.__version__}; load average (1, 5, 15 min) "
                f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}\n\n")  # fmt: skip
        f.write(f"B={a.batch}, H={a.heads}, D={a.head_dim}, {a.dtype}, causal={a.causal}; one thread per process; "
                "seconds per fwd+bwd (median over repeats, slowest rank)\n\n")  # fmt: skip
        f.write("| S | single 1 thread | single 2 threads |\n| --- | --- | --- |\n")
        for s in cfg["seqlens"]:
            f.write(f"| {s} | {single[(s, 1)][0]:.3f} | {single.get((s, 2), (float('nan'),))[0]:.3f} |\n")
        f.write("\n| method | P | S | total (p20-p80) | compute | comm alone | waited | exposed | overlap | "
                "vs single process, P threads |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")  # fmt: skip
        for r in rows:
            f.write(f"| {r['method']} | {r['procs']} | {r['seqlen']} | {r['total']:.3f} ({r['p20']:.3f}-{r['p80']:.3f}) "
                    f"| {r['compute']:.3f} | {r['comm']:.4f} | {r['waited']:.4f} | {r['exposed']:.4f} | {r['overlap']:.2f} | "
                    f"{r['vs_1proc']:.3f} |\n")  # fmt: skip
    print(f"wrote {out}/results.csv and results.md")


if __name__ == "__main__":
    main()
